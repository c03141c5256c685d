"""Everything `mor-bench` shows on the terminal: rich tables sized for terminals and CI
logs, the suite's live progress table (`SuiteProgress`), the plain log lines of a suite run
(`PlainLog`), the regression gate's table and MoR's depth-coloured text.

The library never prints; it hands typed events (`evals.suite.events`) to these views.
rich is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from evals.suite.events import RunEvent, SuiteEvent


def _console(stderr: bool = False, width: int | None = None):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal (CI logs, pipes) rich would wrap at 80 columns and elide numbers.
    return Console(stderr=stderr, width=None if stream.isatty() else (width or 200))


def rich_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        left = c in ("model", "preset", "family", "layers", "variant", "run_id", "budget")
        table.add_column(c, justify="left" if left else "right")
    for row in rows:
        table.add_row(*["-" if row.get(c) is None else str(row.get(c)) for c in columns])
    _console().print(table)


def print_json(data: Any) -> None:
    import json

    print(json.dumps(data, indent=2, default=str))


class TaskProgress:
    """`mor-bench eval`'s view of `run_tasks` (its `on_progress(task, done, total)`): on a
    terminal one rich progress bar per task -- requests scored, requests/s, elapsed -- and
    off a terminal one stderr line per finished task. Use as a context manager."""

    def __init__(self, label: str = "", live: bool | None = None):
        self.label = label
        self.live = sys.stderr.isatty() if live is None else live
        self._bars: dict[str, Any] = {}
        self._t0: dict[str, float] = {}
        self._progress = None

    def __enter__(self) -> TaskProgress:
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                console=_console(stderr=True))
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, task: str, done: int, total: int) -> None:
        key = f"{self.label}{task}"
        now = time.perf_counter()
        t0 = self._t0.setdefault(key, now)
        rate = _rate(done / (now - t0) if now > t0 else None)
        if self._progress is not None:
            if key not in self._bars:
                self._bars[key] = self._progress.add_task(key, total=total, rate=rate)
            self._progress.update(self._bars[key], completed=done, total=total, rate=rate)
        elif done >= total:
            print(f"{key}: {total:,} requests in {now - t0:.1f}s ({rate})", file=sys.stderr,
                  flush=True)


# --------------------------------------------------------------------------------------------
# a suite run


def _rate(rate: float | None) -> str:
    return "- req/s" if rate is None else f"{rate:,.0f} req/s"


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"


class SuiteProgress:
    """The view of a suite run, fed with its events (`__call__`).

    live=True (a terminal): a rich table on stderr, one row per run -- model, phase,
    step/total, loss, elapsed, ETA -- refreshed in place. live=False: nothing is drawn
    (`PlainLog` prints the log lines). Either way `summary()` is the final table (model,
    status, val NLL, tokens/s, time) and `rows` holds the latest state of every run."""

    def __init__(self, live: bool | None = None, console=None):
        from rich.console import Console

        self.live = sys.stderr.isatty() if live is None else live
        self.console = console or Console(stderr=True, width=None if sys.stderr.isatty()
                                          else 160)
        self.rows: dict[str, dict[str, Any]] = {}
        self._live = None
        self._t0 = time.perf_counter()

    def __call__(self, event: RunEvent | SuiteEvent) -> None:
        if not isinstance(event, RunEvent):
            return
        row = self.rows.setdefault(event.run_id, {"run_id": event.run_id})
        phase = event.phase
        now = time.perf_counter()
        if phase != row.get("phase"):
            row["phase"] = phase
            if phase != "queued" and row.get("t_start") is None:
                row["t_start"] = now
            if phase == "training":
                row["t_train"] = now
            if phase in ("done", "failed"):
                row["t_end"] = now
        if phase == "few-shot":  # requests of the current task, beside the training steps
            row.update(task=event.task, rate=event.rate,
                       requests=f"{event.step:,}/{event.total:,} req" if event.total else None)
        else:
            for key in ("model", "step", "total", "loss", "val_nll", "tokens_per_s", "error",
                        "wall_s"):
                value = getattr(event, key)
                if value is not None:
                    row[key] = value
        if self._live is not None:
            self._live.update(self.table(), refresh=phase in ("done", "failed"))

    def start(self) -> None:
        if self.live and self._live is None:
            from rich.live import Live

            self._live = Live(self.table(), console=self.console, refresh_per_second=4,
                              get_renderable=self.table, transient=False)
            self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.update(self.table(), refresh=True)
            self._live.stop()
            self._live = None

    def eta(self, row: dict[str, Any]) -> float | None:
        """Seconds left in the training phase, from the step rate so far."""
        if row.get("phase") != "training" or not row.get("step") or not row.get("total"):
            return None
        elapsed = time.perf_counter() - row.get("t_train", time.perf_counter())
        return elapsed * (row["total"] - row["step"]) / row["step"]

    def table(self):
        from rich.table import Table

        done = sum(r.get("phase") in ("done", "failed") for r in list(self.rows.values()))
        table = Table(title=f"suite: {done}/{len(self.rows)} runs finished, "
                            f"{_clock(time.perf_counter() - self._t0)} elapsed",
                      title_justify="left")
        for col in ("model", "phase", "step", "loss", "elapsed", "ETA"):
            table.add_column(col, justify="left" if col in ("model", "phase") else "right")
        styles = {"done": "green", "failed": "bold red", "queued": "grey50"}
        for row in list(self.rows.values()):  # the refresh thread reads while events arrive
            phase = row.get("phase", "queued")
            step = (f"{row['step']}/{row['total']}" if row.get("total") and row.get("step")
                    else "-")
            end = row.get("t_end") or time.perf_counter()
            elapsed = end - row["t_start"] if row.get("t_start") else None
            loss = row.get("loss")
            if phase == "few-shot" and row.get("task"):  # requests of the current task
                phase = f"few-shot {row['task']}, {_rate(row.get('rate'))}"
                step = row.get("requests") or step
            table.add_row(row["run_id"], f"[{styles.get(row.get('phase'), 'bold')}]{phase}[/]",
                          step,
                          "-" if loss is None else f"{loss:.3f}", _clock(elapsed),
                          _clock(self.eta(row)))
        return table

    def summary(self, records: list[dict[str, Any]]):
        """The final table: one row per run with status, val NLL, tokens/s and time."""
        from rich.table import Table

        table = Table(title="suite summary", title_justify="left")
        for col in ("model", "status", "val NLL", "tokens/s", "time"):
            table.add_column(col, justify="left" if col in ("model", "status") else "right")
        for rec in records:
            m = rec.get("metrics") or {}
            row = self.rows.get(rec.get("run_id"), {})
            ok = rec.get("status") == "ok"
            nll, tps = m.get("val_nll"), m.get("tokens_per_s")
            table.add_row(rec.get("run_id", "?"), "[green]ok[/]" if ok else "[bold red]failed[/]",
                          "-" if nll is None else f"{nll:.4f}",
                          "-" if tps is None else f"{tps:,.0f}", _clock(row.get("wall_s")))
        return table

    def print_summary(self, records: list[dict[str, Any]]) -> None:
        self.console.print(self.summary(records))


_PHASE_TITLES = {"infer": "inference", "speed": "training speed", "sweep": "knob sweep"}


class PlainLog:
    """The log lines of a suite run, from its events: what a CI log keeps. Suite-level
    lines go to `out` (stdout, or stderr under --json so stdout holds only the JSON);
    training steps, failures and the after-training phases' own lines go to stderr.

    live=True (a live table is drawn): only the suite-level lines; the table shows the
    per-run progress instead."""

    def __init__(self, out: TextIO | None = None, live: bool = False):
        self.out = out
        self.live = live
        self.run_dir: str | None = None

    def _print(self, line: str, err: bool = False) -> None:
        stream = sys.stderr if err else (self.out or sys.stdout)
        print(line, file=stream, flush=True)

    def __call__(self, event: RunEvent | SuiteEvent) -> None:
        if isinstance(event, SuiteEvent):
            self._suite(event)
        elif not self.live:
            self._run(event)

    def _run(self, e: RunEvent) -> None:
        if e.phase == "training" and e.milestone:
            self._print(f"  {e.run_id}: step {e.step}/{e.total} loss {e.loss:.4f} "
                        f"lr {e.lr:.2e} ({e.train_s:.0f}s)", err=True)
        elif e.phase == "few-shot" and e.milestone:
            self._print(f"  {e.run_id}: few-shot {e.task}: {e.total:,} requests in "
                        f"{e.train_s:.1f}s ({_rate(e.rate)})", err=True)
        elif e.phase == "failed":
            where = f"{self.run_dir}/{e.run_id}/error.txt" if self.run_dir else "error.txt"
            self._print(f"run {e.run_id} failed: {e.error} (see {where})", err=True)

    def _suite(self, e: SuiteEvent) -> None:
        i = e.info
        self.run_dir = e.run_dir
        title = _PHASE_TITLES.get(e.phase or "", e.phase)
        if e.kind == "start":
            self._print(f"suite {e.suite}: {i['runs']} runs -> {e.run_dir}")
        elif e.kind == "data":
            self._print(f"data: {i['corpus']} / {i['tokenizer']}: {i['train_tokens']:,} train "
                        f"tokens, {i['val_windows']} val windows ({i['seconds']:.1f}s)")
        elif e.kind == "run" and not self.live:
            self._print(f"[{i['index']}/{i['count']}] {i['run_id']}: {i['family']} "
                        f"{i['layers']}, {i['steps']} steps x {i['tokens_per_step']} tokens")
        elif e.kind == "finished":
            self._print(f"suite {e.suite}: {i['ok']}/{i['count']} runs ok in "
                        f"{i['seconds']:.0f}s")
        elif e.kind == "phase" and e.phase == "infer":
            self._print(f"inference: {i['samples']} samples x ~{i['gen_mean']:g} tokens per "
                        f"model, batch {i['batch_size']}, {i['repeats']} interleaved round(s)")
        elif e.kind == "phase" and e.phase == "sweep":
            values = ", ".join(i["values"]) or "the trained capacities"
            self._print(f"{title}: knob {i['knob']} over {values} on {', '.join(i['models'])}")
        elif e.kind == "phase":
            self._print(f"{title}: {i['rounds']} interleaved round(s) x "
                        f"{i['steps_per_round']} steps per model "
                        f"(+{i['warmup_steps']} warm-up)")
        elif e.kind == "phase_log":
            self._print(i["message"], err=True)
        elif e.kind == "phase_done":
            self._print(f"{title}: done in {i['seconds']:.0f}s -> {i['file']}")
        elif e.kind == "phase_failed":
            self._print(f"{title} phase failed (see {i['error_file']}); training results kept")
        elif e.kind == "warning":
            self._print(f"warning: {i['message']}", err=True)
        elif e.kind == "resume":
            self._print(f"resuming {e.run_dir}: {i['done']} run(s) done, {i['todo']} to run")
        elif e.kind == "skip":
            self._print(f"  {i['run_id']}: {i['reason']}", err=True)
        elif e.kind == "interrupted":
            where = (f" at step {i['step']} (checkpoint saved)" if i.get("step") is not None
                     else "")
            self._print(f"interrupted: {i.get('run_id') or 'suite'}{where}", err=True)


# --------------------------------------------------------------------------------------------
# check, route


def check_table(result: dict[str, Any]) -> None:
    """The regression gate's comparison (`reports.gate.check_run`) as a table."""
    from rich.table import Table

    rec = result.get("recorded") or {}
    table = Table(title=f"{result['run_dir']} vs {result['baseline']} (recorded on "
                        f"{rec.get('hardware') or '?'}, commit {str(rec.get('commit'))[:10]})",
                  title_justify="left")
    for col in ("model", "metric", "baseline", "now", "delta", "tolerance", "verdict"):
        table.add_column(col, justify="left" if col in ("model", "metric", "verdict")
                         else "right")
    styles = {"regression": "bold red", "missing": "bold red", "failed": "bold red",
              "improved": "green", "new": "cyan", "ok": "", "contended": "yellow"}
    for r in result["rows"]:
        verdict = r["verdict"] + (f" ({r['note']})" if r.get("note") else "")
        style = styles.get(r["verdict"], "")
        table.add_row(r["model"], r["metric"], r["baseline"], r["now"], r["delta"],
                      r["tolerance"], f"[{style}]{verdict}[/]" if style else verdict)
    _console().print(table)


_DEPTH_STYLES = ["grey50", "cyan", "green", "yellow", "bold magenta", "bold red"]


def render_routed_text(routed: dict[str, Any], plain: bool = False) -> Any:
    """A `rich.text.Text` of a `route_text` result (`evals.suite.depths`): every token
    coloured by its recursion depth, plus a legend and the token count per depth. With
    `plain` (output that is not a terminal, where colours are lost) a `str` instead: every
    token followed by its depth in brackets, e.g. "The[2] cat[1]", and the counts."""
    nr = routed["num_recursions"]
    counts = [0] * (nr + 1)
    for tok in routed["tokens"]:
        counts[min(tok["depth"], nr)] += 1
    per_depth = "tokens per depth: " + ", ".join(f"{d}: {c}" for d, c in enumerate(counts))
    if plain:
        body = "".join(f"{tok['text']}[{tok['depth']}]" for tok in routed["tokens"])
        return f"{body}\n\n{per_depth}"
    from rich.text import Text

    text = Text()
    for tok in routed["tokens"]:
        text.append(tok["text"], style=_DEPTH_STYLES[min(tok["depth"], len(_DEPTH_STYLES) - 1)])
    legend = Text("\n\ndepth: ")
    for depth in range(nr + 1):
        legend.append(f" {depth} ",
                      style=f"reverse {_DEPTH_STYLES[min(depth, len(_DEPTH_STYLES) - 1)]}")
    legend.append("   " + per_depth)
    return text + legend
