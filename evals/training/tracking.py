"""Experiment tracking: training metrics streamed to TensorBoard and Weights & Biases.

Two sinks, both optional and both fed by `Tracker.log(step, metrics)`:

* TensorBoard (`[train] tensorboard`, on by default): `torch.utils.tensorboard.SummaryWriter`
  event files under the run directory (the runner passes RUN_DIR/<run_id>/tensorboard), so
  `tensorboard --logdir runs/` shows every run of every suite.
* Weights & Biases (`[train] wandb_project = "..."`, needs `pip install 'mor-bench[wandb]'`):
  one W&B run per mor-bench run, with an id derived from the run directory and run name so
  that a resumed run continues the same W&B run.

`check_tracking` validates the settings when a suite is planned, before any compute, so a
missing package fails at once with the fix in the message. Only rank 0 of a distributed run
tracks (`enabled=False` on the others). Nothing here prints; W&B is started silent and its
page is `Tracker.wandb_url` for the caller to show. docs/tracking.md is the user's page.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from mor.errors import ConfigError

__all__ = ["FLUSH_SECS", "Tracker", "check_tracking", "wandb_run_id"]

FLUSH_SECS = 10
"""How often (seconds) the TensorBoard writer flushes its queue to disk: a live
`tensorboard` view lags training by at most this much (torch's default is 120)."""


def _installed(name: str) -> bool:
    """Whether `import name` would find a module, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # already in sys.modules with no __spec__ (e.g. a module made in code)
        return sys.modules.get(name) is not None


def check_tracking(tensorboard: bool, wandb_project: str | None) -> None:
    """Plan-time check of the tracking settings (`TrainConfig.tensorboard`,
    `TrainConfig.wandb_project`): raises `ConfigError` naming the field and the fix when a
    sink is asked for but its package is not installed, or the project name is empty.
    Imports neither package."""
    if wandb_project is not None:
        if not isinstance(wandb_project, str) or not wandb_project.strip():
            raise ConfigError(f"[train] wandb_project: must be a non-empty project name, got "
                              f"{wandb_project!r}; remove the field to log to TensorBoard only")
        if not _installed("wandb"):
            raise ConfigError(f"[train] wandb_project = {wandb_project!r} asks for Weights & "
                              "Biases but the 'wandb' package is not installed: run "
                              "pip install 'mor-bench[wandb]', or remove the field")
    if tensorboard and not _installed("tensorboard"):
        raise ConfigError("[train] tensorboard = true needs the 'tensorboard' package, which is "
                          "not installed: run pip install 'tensorboard>=2.14' (a dependency of "
                          "mor-bench; reinstall with pip install -e .), or set "
                          "tensorboard = false")


def wandb_run_id(run_dir: Path, run_name: str) -> str:
    """The W&B run id of the mor-bench run in `run_dir` named `run_name`: the same for
    every process that trains that run (so a resumed run continues its W&B run), different
    for the same run name in another run directory. Letters, digits, '-' and '_' only."""
    key = f"{Path(run_dir).resolve()}\0{run_name}".encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-")[:40]
    return f"{slug}-{digest}" if slug else digest


class Tracker:
    """Streams scalar metrics of one training run to TensorBoard and/or W&B.

    `log_dir` is the TensorBoard directory (RUN_DIR/<run_id>/tensorboard); W&B keeps its
    local files in `log_dir.parent` (the run directory). `config` is recorded as the W&B
    run's config. `resume_step`: the first step this process will log when it resumes from
    a checkpoint; TensorBoard then hides every event of an earlier process at a step >=
    `resume_step` (`SummaryWriter(purge_step=...)`), so the curves show the steps after the
    checkpoint once, as re-run. W&B cannot rewrite logged steps: steps below the one W&B
    expects next are not sent (W&B would drop them), and its curves keep the killed
    process's values for them. With both sinks off, or `enabled=False` (every rank but 0),
    the tracker creates nothing and `log` does nothing. Use it as a context manager, or call
    `close()`."""

    def __init__(self, log_dir: Path, *, run_name: str, tensorboard: bool,
                 wandb_project: str | None, config: dict[str, Any],
                 resume_step: int | None = None, enabled: bool = True) -> None:
        if resume_step is not None and (isinstance(resume_step, bool)
                                        or not isinstance(resume_step, int) or resume_step < 0):
            raise ValueError(f"resume_step must be an integer >= 0 or None, got {resume_step!r}")
        self.log_dir = Path(log_dir)
        self.run_name = run_name
        self.resume_step = resume_step
        self._writer: Any = None
        self._wandb_run: Any = None
        self._wandb_next_step = 0
        self._closed = False
        if not enabled:
            return
        check_tracking(tensorboard, wandb_project)
        try:
            if wandb_project is not None:
                self._start_wandb(wandb_project, config)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=resume_step,
                                             flush_secs=FLUSH_SECS)
        except BaseException:
            self.close(failed=True)
            raise

    def _start_wandb(self, project: str, config: dict[str, Any]) -> None:
        import wandb

        run_dir = self.log_dir.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        errors = getattr(wandb, "errors", None)
        setup_errors = tuple(getattr(errors, n) for n in ("UsageError", "CommError",
                                                          "AuthenticationError")
                             if isinstance(getattr(errors, n, None), type))
        try:
            self._wandb_run = wandb.init(
                project=project, name=self.run_name, config=dict(config), dir=str(run_dir),
                id=wandb_run_id(run_dir, self.run_name), resume="allow",
                settings=wandb.Settings(silent=True))
        except setup_errors as e:
            raise ConfigError(f"[train] wandb_project = {project!r}: Weights & Biases could not "
                              f"start a run ({e}); log in with `wandb login` or set "
                              "WANDB_API_KEY (WANDB_MODE=offline logs locally), or remove the "
                              "field") from e
        # A resumed W&B run accepts steps from its last logged step + 1 on.
        self._wandb_next_step = int(getattr(self._wandb_run, "step", 0) or 0)

    @property
    def active(self) -> bool:
        """Whether any sink is open (False for a disabled or closed tracker)."""
        return self._writer is not None or self._wandb_run is not None

    @property
    def wandb_url(self) -> str | None:
        """The W&B run's page, for the caller to show (None without W&B)."""
        if self._wandb_run is None:
            return None
        return getattr(self._wandb_run, "url", None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Log scalar `metrics` (e.g. "train/loss", "train/lr", "train/grad_norm",
        "val/nll") at optimizer step `step`. Values are converted with `float`; NaN and
        infinities are logged as they are (a diverging run should show it)."""
        if self._closed:
            raise RuntimeError(f"Tracker for run {self.run_name!r} is closed")
        if not self.active or not metrics:
            return
        values = {k: float(v) for k, v in metrics.items()}
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, global_step=step)
        if self._wandb_run is not None and step >= self._wandb_next_step:
            self._wandb_run.log(values, step=step)

    def flush(self) -> None:
        """Write pending TensorBoard events to disk now (e.g. before a checkpoint)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self, *, failed: bool = False) -> None:
        """Flush and close every sink; safe to call twice. `failed` marks the W&B run as
        exited with an error (the context manager passes it when the block raised)."""
        self._closed = True
        writer, self._writer = self._writer, None
        run, self._wandb_run = self._wandb_run, None
        try:
            if writer is not None:
                writer.close()
        finally:
            if run is not None and failed:
                run.finish(exit_code=1)
            elif run is not None:
                run.finish()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=exc_type is not None)

