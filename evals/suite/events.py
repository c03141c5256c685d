"""What a suite run reports while it works: typed progress events.

The runner never prints. It passes every event to the caller's `on_event` callback -- the
command line draws them (a live table on a terminal, plain log lines in CI logs, see
`evals.cli.display`); tests collect them in a list.

Two kinds, both plain frozen dataclasses (they cross process boundaries pickled):

* `RunEvent`: one run's progress -- its phase (`PHASES`, in order) and, while training,
  step/total/loss. Sent by the run's own process through a queue and relayed in order.
* `SuiteEvent`: the suite as a whole -- started, data ready, a run started, all runs
  finished, an after-training phase ([infer], [speed], [sweep]) started / logged /
  finished / failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PHASES = ("queued", "data", "training", "saving", "validation", "few-shot", "done", "failed")
"""The phases a run goes through, in order ("failed" can follow any of them)."""

SUITE_KINDS = ("start", "data", "run", "finished", "phase", "phase_log", "phase_done",
               "phase_failed", "warning", "resume", "skip", "interrupted")
"""`SuiteEvent.kind` values. "phase*" events name the after-training phase in `phase`.
"warning": something the user should know (info["message"]), e.g. an unusable checkpoint;
"resume": a suite run directory is being continued; "skip": a run already done there;
"interrupted": SIGTERM/SIGINT stopped the suite, its state saved (info["run_id"],
info["step"])."""


@dataclass(frozen=True)
class RunEvent:
    """One run's progress. `phase` is one of `PHASES`; the other fields are set where they
    apply (None otherwise)."""

    run_id: str
    phase: str
    time: float
    """time.time() when the event was made."""
    model: str | None = None
    """The suite's model name ("queued" events)."""
    step: int | None = None
    """Training steps done ("training" events; 0 at the start); requests scored so far
    ("few-shot" events)."""
    total: int | None = None
    """Planned training steps ("queued" and "training" events); the requests of the
    current few-shot call ("few-shot" events)."""
    task: str | None = None
    """"few-shot" events: the lm-eval task and routing mode being scored ("hellaswag_local
    (causal)")."""
    rate: float | None = None
    """"few-shot" events: requests per second of the current task so far."""
    loss: float | None = None
    lr: float | None = None
    train_s: float | None = None
    """Seconds since training started ("training" events with a step)."""
    milestone: bool = False
    """A training step worth a line in a plain log (every ~10% of the steps, and the last;
    for "few-shot" events, a finished task); other step events are throttled updates for a
    live view."""
    val_nll: float | None = None
    """"done" events."""
    tokens_per_s: float | None = None
    """"done" events: training throughput."""
    wall_s: float | None = None
    """"done" / "failed" events: the run process's wall time."""
    error: str | None = None
    """"failed" events: "ExceptionType: message"."""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"unknown run phase {self.phase!r}; known: {', '.join(PHASES)}")


@dataclass(frozen=True)
class SuiteEvent:
    """The suite's progress. `info` holds the numbers of each kind:

    start: runs (count); data: corpus, tokenizer, train_tokens, val_windows, seconds;
    run: index, count, run_id, family, layers, steps, tokens_per_step;
    finished: ok, count, seconds; phase: the phase's settings (see `evals.suite.phases`);
    phase_log: message (a line the phase's process logged); phase_done: seconds, file;
    phase_failed: error_file."""

    kind: str
    suite: str
    run_dir: str
    phase: str | None = None
    """"infer", "speed" or "sweep" for the phase* kinds."""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SUITE_KINDS:
            raise ValueError(f"unknown suite event {self.kind!r}; known: "
                             f"{', '.join(SUITE_KINDS)}")


Event = RunEvent | SuiteEvent
OnEvent = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The default `on_event`: drop the event."""
