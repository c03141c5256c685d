"""Experiment tracking (`evals.training.tracking`): TensorBoard event files read back as
TensorBoard reads them, resume purging, the plan-time check of the settings, and the W&B
path against a fake `wandb` module (the real one is an optional extra)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import sys
import time
import types
from pathlib import Path

import pytest

from evals.training.tracking import Tracker, check_tracking, wandb_run_id
from mor.errors import ConfigError

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under `log_dir` as TensorBoard shows it: (step, value) pairs."""
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def _next_second() -> None:
    """Event file names start with the creation second; a later writer in this same process
    must sort after the earlier one, as a resumed (new) process's file does."""
    t = int(time.time())
    while int(time.time()) == t:
        time.sleep(0.02)


def _tracker(log_dir: Path, **kw) -> Tracker:
    kw = {"run_name": "mor-3-s0", "tensorboard": True, "wandb_project": None,
          "config": {"lr": 3e-3}} | kw
    return Tracker(log_dir, **kw)


# --------------------------------------------------------------------------- TensorBoard

def test_scalars_are_written_to_tensorboard_with_their_steps_and_values(tmp_path):
    log_dir = tmp_path / "run" / "tensorboard"
    with _tracker(log_dir) as tr:
        assert tr.active
        for step in range(5):
            tr.log(step, {"train/loss": 4.0 - 0.5 * step, "train/lr": 1e-3 * (step + 1)})
        tr.log(4, {"val/nll": 2.25, "train/grad_norm": math.inf})
        tr.log(5, {"train/loss": math.nan})
    assert not tr.active
    got = _scalars(log_dir)
    assert set(got) == {"train/loss", "train/lr", "val/nll", "train/grad_norm"}
    loss = got["train/loss"]
    assert [s for s, _ in loss] == [0, 1, 2, 3, 4, 5]
    assert [v for _, v in loss[:5]] == pytest.approx([4.0, 3.5, 3.0, 2.5, 2.0])
    assert math.isnan(loss[5][1])  # non-finite values are logged as they are
    assert [s for s, _ in got["train/lr"]] == [0, 1, 2, 3, 4]
    assert [v for _, v in got["train/lr"]] == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3, 5e-3])
    assert got["val/nll"] == [(4, pytest.approx(2.25))]
    assert got["train/grad_norm"][0][0] == 4 and got["train/grad_norm"][0][1] == math.inf


def _killed_then_resumed(log_dir: Path, resume_step: int | None) -> dict:
    # The killed process: a checkpoint after step 4, then steps 5..9 logged before the kill.
    first = _tracker(log_dir)
    for step in range(10):
        first.log(step, {"train/loss": float(step)})
    first.log(4, {"val/nll": 4.0})
    first.log(8, {"val/nll": 8.0})
    first.close()
    _next_second()
    # The resumed process re-runs from step 5 with different values; its next validation is
    # at step 12, after the killed process's last one.
    with _tracker(log_dir, resume_step=resume_step) as second:
        for step in range(5, 8):
            second.log(step, {"train/loss": 100.0 + step})
        second.log(12, {"val/nll": 12.0})
    return _scalars(log_dir)


def test_resume_purges_the_killed_process_steps_from_the_resume_step_on(tmp_path):
    got = _killed_then_resumed(tmp_path / "tb", resume_step=5)
    assert got["train/loss"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                 (5, 105.0), (6, 106.0), (7, 107.0)]
    # Every tag is purged, including one the resumed process has not logged again yet.
    assert got["val/nll"] == [(4, 4.0), (12, 12.0)]


def test_without_resume_step_a_stale_step_of_the_killed_process_survives(tmp_path):
    # The control for the test above: purge_step is what removes val/nll at step 8.
    got = _killed_then_resumed(tmp_path / "tb", resume_step=None)
    assert (8, 8.0) in got["val/nll"]


def test_disabled_or_all_off_tracker_writes_nothing(tmp_path, fake_wandb):
    for tr in (_tracker(tmp_path / "a" / "tb", wandb_project="p", enabled=False),
               _tracker(tmp_path / "b" / "tb", tensorboard=False)):
        with tr:
            assert not tr.active and tr.wandb_url is None
            tr.log(0, {"train/loss": 1.0})
            tr.flush()
    assert list(tmp_path.iterdir()) == []
    assert fake_wandb.calls == []


def test_log_after_close_raises(tmp_path):
    tr = _tracker(tmp_path / "tb")
    tr.close()
    tr.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        tr.log(1, {"train/loss": 1.0})


def test_resume_step_must_be_a_non_negative_integer(tmp_path):
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="resume_step"):
            _tracker(tmp_path / "tb", resume_step=bad)
    assert not (tmp_path / "tb").exists()


# --------------------------------------------------------------------------- check_tracking

def _hide(monkeypatch, name: str) -> None:
    """Make `name` look uninstalled whether or not it is."""
    real = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a, **k: None if n == name else real(n, *a, **k))


def test_wandb_asked_for_but_not_installed_names_the_field_and_the_fix(monkeypatch, tmp_path):
    _hide(monkeypatch, "wandb")
    with pytest.raises(ConfigError) as e:
        check_tracking(tensorboard=True, wandb_project="mor-bench")
    assert "[train] wandb_project" in str(e.value)
    assert "pip install 'mor-bench[wandb]'" in str(e.value)
    assert "remove the field" in str(e.value)
    check_tracking(tensorboard=True, wandb_project=None)  # not asked for: fine
    # The Tracker checks too, before creating anything.
    with pytest.raises(ConfigError, match=r"\[train\] wandb_project"):
        _tracker(tmp_path / "run" / "tb", wandb_project="mor-bench")
    assert not (tmp_path / "run").exists()


def test_tensorboard_asked_for_but_not_installed_names_the_field(monkeypatch):
    _hide(monkeypatch, "tensorboard")
    with pytest.raises(ConfigError) as e:
        check_tracking(tensorboard=True, wandb_project=None)
    assert "[train] tensorboard" in str(e.value)
    assert "tensorboard = false" in str(e.value)
    check_tracking(tensorboard=False, wandb_project=None)


def test_empty_wandb_project_is_rejected(fake_wandb):
    with pytest.raises(ConfigError, match=r"\[train\] wandb_project"):
        check_tracking(tensorboard=False, wandb_project="  ")
    check_tracking(tensorboard=False, wandb_project="p")  # the fake counts as installed


# --------------------------------------------------------------------------- W&B (fake)

class _FakeRun:
    def __init__(self, calls: list, step: int) -> None:
        self.calls = calls
        self.step = step
        self.url = "https://wandb.example/run"

    def log(self, data, step=None):
        self.calls.append(("log", dict(data), step))

    def finish(self, exit_code=None):
        self.calls.append(("finish", exit_code))


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module in sys.modules that records init / log / finish.
    `mod.resume_at` is the step the next `init` reports (a resumed W&B run's next step)."""
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    mod.calls = []
    mod.resume_at = 0

    class UsageError(Exception):
        pass

    mod.errors = types.SimpleNamespace(UsageError=UsageError)
    mod.Settings = lambda **kw: ("Settings", kw)
    mod.fail_with = None

    def init(**kw):
        if mod.fail_with is not None:
            raise mod.fail_with
        mod.calls.append(("init", kw))
        return _FakeRun(mod.calls, mod.resume_at)

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def _inits(mod) -> list[dict]:
    return [c[1] for c in mod.calls if c[0] == "init"]


def test_wandb_run_is_started_logged_and_finished(tmp_path, fake_wandb):
    run_dir = tmp_path / "runs" / "mor-3-s0"
    with _tracker(run_dir / "tensorboard", tensorboard=False, wandb_project="mor-bench",
                  config={"lr": 3e-3, "family": "mor"}) as tr:
        assert tr.active and tr.wandb_url == "https://wandb.example/run"
        tr.log(0, {"train/loss": 4.0, "train/lr": 1e-4})
        tr.log(10, {"val/nll": math.nan})
    (init,) = _inits(fake_wandb)
    assert init["project"] == "mor-bench"
    assert init["name"] == "mor-3-s0"
    assert init["config"] == {"lr": 3e-3, "family": "mor"}
    assert init["resume"] == "allow"
    assert Path(init["dir"]) == run_dir
    assert init["id"] == wandb_run_id(run_dir, "mor-3-s0")
    assert init["settings"] == ("Settings", {"silent": True})  # wandb prints nothing
    logs = [c for c in fake_wandb.calls if c[0] == "log"]
    assert [c[2] for c in logs] == [0, 10]
    assert logs[0][1] == {"train/loss": 4.0, "train/lr": 1e-4}
    assert math.isnan(logs[1][1]["val/nll"])
    assert fake_wandb.calls[-1] == ("finish", None)
    assert not (run_dir / "tensorboard").exists()  # TensorBoard was off


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, fake_wandb):
    run_dir = tmp_path / "runs" / "mor-3-s0"
    with _tracker(run_dir / "tensorboard", wandb_project="p") as tr:
        for step in range(9):
            tr.log(step, {"train/loss": float(step)})
    # W&B reports that it already holds steps 0..8: the resumed process (from a checkpoint
    # at step 5) skips 5..8 instead of sending steps W&B would drop, then logs on.
    fake_wandb.resume_at = 9
    fake_wandb.calls.append(("kill",))
    with _tracker(run_dir / "tensorboard", wandb_project="p", resume_step=5) as tr:
        for step in range(5, 12):
            tr.log(step, {"train/loss": 100.0 + step})
    first, second = _inits(fake_wandb)
    assert first["id"] == second["id"] and first["name"] == second["name"]
    after_kill = fake_wandb.calls[fake_wandb.calls.index(("kill",)):]
    assert [c[2] for c in after_kill if c[0] == "log"] == [9, 10, 11]
    # Another run name, or the same name in another run directory, is another W&B run.
    assert wandb_run_id(run_dir, "mor-2-s0") != first["id"]
    assert wandb_run_id(tmp_path / "other" / "mor-3-s0", "mor-3-s0") != first["id"]
    assert all(ch.isalnum() or ch in "-_" for ch in wandb_run_id(run_dir, "a/b.c d:e"))


def test_wandb_run_is_marked_failed_when_training_raises(tmp_path, fake_wandb):
    with pytest.raises(FloatingPointError), _tracker(tmp_path / "r" / "tb", tensorboard=False,
                                                     wandb_project="p") as tr:
        tr.log(0, {"train/loss": 1.0})
        raise FloatingPointError("diverged")
    assert fake_wandb.calls[-1] == ("finish", 1)


def test_wandb_login_failure_is_a_config_error_and_opens_nothing(tmp_path, fake_wandb):
    fake_wandb.fail_with = fake_wandb.errors.UsageError("api_key not configured (no-tty)")
    with pytest.raises(ConfigError) as e:
        _tracker(tmp_path / "r" / "tb", wandb_project="p")
    assert "[train] wandb_project" in str(e.value) and "wandb login" in str(e.value)
    assert not (tmp_path / "r" / "tb").exists()
