"""`mor-bench run`'s plan-time checks, the load each run trained under, --threads, the
suite status marker, and the run processes' fate when the suite process is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evals.cli.main import main
from tests.conftest import MICRO_SUITE

BAD_EVAL = MICRO_SUITE + '\n[eval]\ntasks = ["mor_synth_fillr"]\n'


# --------------------------------------------------------------------------------------------
# 1. plan-time checks


def test_dry_run_refuses_synthetic_corpus_for_require_corpus_suite(capsys, tmp_path):
    assert main(["run", "cpu-study", "--dry-run", "--cache-dir", str(tmp_path)]) == 2
    assert "--corpus" in capsys.readouterr().err


def test_real_run_refuses_synthetic_corpus_before_any_work(capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["run", "cpu-study", "--out", str(out), "--cache-dir", str(tmp_path)]) == 2
    assert "--corpus" in capsys.readouterr().err
    assert not out.exists()  # nothing made: no data prepared, no run directory


def test_dry_run_refuses_unknown_eval_task(write_suite, capsys, tmp_path):
    path = write_suite(BAD_EVAL)
    assert main(["run", str(path), "--dry-run", "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "mor_synth_fillr" in err and "[eval]" in err and "mor_synth_filler" in err


def test_dry_run_notes_unfetched_benchmarks_real_run_refuses(write_suite, capsys, tmp_path):
    path = write_suite(MICRO_SUITE + '\n[eval]\ntasks = ["hellaswag_local"]\n')
    empty = str(tmp_path / "empty-cache")
    assert main(["run", str(path), "--dry-run", "--json", "--cache-dir", empty]) == 0
    assert "note:" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--cache-dir", empty]) == 2
    assert "mor-bench data benchmarks" in capsys.readouterr().err and not out.exists()


def test_dry_run_accepts_known_synthetic_task(write_suite, capsys, tmp_path):
    path = write_suite(MICRO_SUITE + '\n[eval]\ntasks = ["mor_synth_filler"]\n')
    assert main(["run", str(path), "--dry-run", "--json",
                 "--cache-dir", str(tmp_path / "c")]) == 0
    assert "vanilla-1024T-s0" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# 2. the load each run trained under

LOAD_KEYS = {"cpu_s", "wall_s", "threads", "cpu_util", "loadavg_start", "loadavg_end",
             "contended", "reason"}
ONE_MODEL = MICRO_SUITE.split("[[models]]\nname = \"mor-2\"")[0]


def _run(suite_path, tmp_path, **kw):
    from evals.suite.runner import run_suite
    from evals.suite.spec import load_suite

    events = []
    run_dir, records, failed = run_suite(load_suite(str(suite_path)), tmp_path / "runs",
                                         cache_dir=tmp_path / "cache",
                                         on_event=events.append, **kw)
    return run_dir, records, failed, events


def test_classify_load_thresholds():
    from evals.suite.status import LOADAVG_MARGIN, MIN_CPU_UTIL, classify_load

    assert classify_load(0.95, [1.0, 1, 1], [1.9, 1, 1], cpu_count=2) == (False, None)
    contended, why = classify_load(MIN_CPU_UTIL - 0.01, [0.1] * 3, [0.1] * 3, cpu_count=2)
    assert contended and "utilisation" in why
    contended, why = classify_load(0.99, [2 + LOADAVG_MARGIN + 0.1] * 3, [0.1] * 3,
                                   cpu_count=2)
    assert contended and "load average" in why and "start" in why
    contended, why = classify_load(0.99, [0.1] * 3, [3.0, 0, 0], cpu_count=2)
    assert contended and "end" in why
    assert classify_load(None, None, None, cpu_count=2) == (False, None)


def test_load_meter_measures_a_busy_phase():
    from evals.suite.status import LoadMeter

    meter = LoadMeter().start()
    x = 0
    for i in range(300_000):
        x += i * i
    load = meter.stop(threads=1)
    assert set(load) == LOAD_KEYS
    assert load["cpu_s"] > 0 and load["wall_s"] > 0 and 0 < load["cpu_util"] <= 1.5
    assert len(load["loadavg_start"]) == len(load["loadavg_end"]) == 3


@pytest.mark.slow
def test_micro_run_records_its_load_and_finished_status(write_suite, tmp_path):
    from evals.suite.status import suite_status

    run_dir, records, failed, _ = _run(write_suite(ONE_MODEL), tmp_path)
    assert not failed
    status = suite_status(run_dir)  # (5.) the suite status marker
    assert status["status"] == "finished" and status["pid"] == os.getpid()
    (rec,) = records
    load = rec["load"]
    assert set(load) == LOAD_KEYS
    assert load["cpu_util"] > 0 and load["threads"] == 1 and load["cpu_s"] > 0
    assert all(isinstance(v, float) for v in load["loadavg_start"] + load["loadavg_end"])
    assert isinstance(load["contended"], bool)
    assert (load["reason"] is None) == (not load["contended"])


@pytest.mark.slow
def test_run_beside_busy_loop_is_flagged_contended(write_suite, tmp_path):
    path = write_suite(ONE_MODEL, replace={"threads = 1": "threads = 2",
                                           "tokens = [1024]": "tokens = [2048]"})
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 1)]
    try:
        _, records, failed, _ = _run(path, tmp_path)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert not failed
    load = records[0]["load"]
    assert load["threads"] == 2
    assert load["contended"] is True and load["reason"]


# --------------------------------------------------------------------------------------------
# 3. --threads and the busy-machine warning


def test_busy_cores_warning_threshold():
    from evals.suite.status import busy_cores_warning

    # 2 cores, 1 thread per run: warn above 2 - 1 + 0.5 = 1.5
    assert busy_cores_warning(1, cpu_count=2, avg=[1.4, 0, 0]) is None
    msg = busy_cores_warning(1, cpu_count=2, avg=[1.6, 0, 0])
    assert msg and "1.60" in msg and "--threads" in msg
    assert busy_cores_warning(2, cpu_count=2, avg=[0.6, 0, 0]) is not None  # 2 threads


def test_busy_warning_only_when_busy(monkeypatch, write_suite):
    import dataclasses

    from evals.suite.runner import _busy_warning
    from evals.suite.spec import load_suite

    suite = load_suite(str(write_suite()))
    suite = dataclasses.replace(suite, train=dataclasses.replace(suite.train, threads=1))
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (cores - 1 + 0.4, 0.0, 0.0))
    assert _busy_warning(suite) is None
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 7.25, 0.0, 0.0))
    info = _busy_warning(suite)
    assert f"{cores + 7.25:.2f}" in info["message"]
    assert "--threads" in info["message"] and info["threads"] == 1


class _Stop(Exception):
    pass


@pytest.mark.parametrize("busy_before", [False, True])
def test_busy_warning_samples_the_load_before_the_suite_prepares_its_data(
        monkeypatch, write_suite, tmp_path, busy_before):
    """The suite's own data preparation (tokenizer training: a minute at full load) must
    not set off the warning about OTHER work; load that was there before it does."""
    import dataclasses

    from evals.suite import runner
    from evals.suite.spec import load_suite

    suite = load_suite(str(write_suite()))
    suite = dataclasses.replace(suite, train=dataclasses.replace(suite.train, threads=1))
    cores = os.cpu_count() or 1
    load = [cores + 5.0 if busy_before else 0.0]
    monkeypatch.setattr(os, "getloadavg", lambda: (load[0], 0.0, 0.0))
    events = []

    def fake_prepare(*args, **kwargs):
        load[0] = cores + 5.0  # the data preparation's own work
        return (tmp_path, [], {}, lambda kind, **info: events.append(kind))

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(runner, "_prepare", fake_prepare)
    monkeypatch.setattr(runner, "_announce", stop)
    with pytest.raises(_Stop):
        runner.run_suite(suite, tmp_path, warn_busy=True)
    assert events == (["warning"] if busy_before else [])


def test_threads_flag_rejects_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "smoke", "--threads", "0", "--dry-run"])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err


@pytest.mark.slow
def test_run_threads_flag_overrides_suite_and_warns_when_busy(monkeypatch, write_suite,
                                                              tmp_path, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (99.5, 1.0, 1.0))  # the suite process only
    monkeypatch.setenv("MOR_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["run", str(write_suite(ONE_MODEL)), "--threads", "2", "--out", str(out),
                 "--json"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "99.50" in err and "--threads" in err
    (run_dir,) = [p for p in out.iterdir() if not p.is_symlink()]
    rec = json.loads((run_dir / "vanilla-1024T-s0" / "record.json").read_text())
    assert rec["train"]["threads"] == 2 and rec["load"]["threads"] == 2


# --------------------------------------------------------------------------------------------
# 4. the run process dies with the suite process (PR_SET_PDEATHSIG)

LONG = ONE_MODEL.replace("tokens = [1024]", "tokens = [65536]")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "evals.cli.main", *args]


def _children(pid: int) -> list[int]:
    try:
        import psutil
    except ImportError:
        done = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split()]
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait(condition, proc: subprocess.Popen, timeout: float, what: str):
    t0 = time.monotonic()
    while True:
        got = condition()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"suite ended before {what}: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _start_suite(tmp_path: Path, text: str, out: Path) -> subprocess.Popen:
    suite = tmp_path / "long.toml"
    suite.write_text(text)
    env = {**os.environ, "MOR_BENCH_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(_cli("run", str(suite), "--out", str(out)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _training_child(proc: subprocess.Popen, out: Path) -> int:
    """The run process, once it has reached its own run directory (it is training)."""
    def found():
        kids = [c for c in _children(proc.pid) if "spawn_main" in _cmdline(c)
                and "resource_tracker" not in _cmdline(c)]
        started = out.is_dir() and any(out.glob("micro-*/vanilla-*/"))
        return kids[0] if kids and started else None
    return _wait(found, proc, 180, "the run process")


def _cleanup(proc: subprocess.Popen, pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


@pytest.mark.slow
def test_sigkill_of_suite_process_kills_its_run_process(tmp_path):
    from evals.suite.status import suite_status

    out = tmp_path / "out"
    proc = _start_suite(tmp_path, LONG, out)
    child = None
    try:
        child = _training_child(proc, out)
        assert _alive(child)
        (run_dir,) = out.glob("micro-*")
        assert suite_status(run_dir)["status"] == "running"
        os.kill(proc.pid, signal.SIGKILL)  # the suite process alone, not its group
        proc.wait(10)
        # (5.) the marker still says "running"; suite_status sees the process is gone
        status = suite_status(run_dir)
        assert status["status"] == f"interrupted (process {proc.pid} gone)", status
        t0 = time.monotonic()
        while _alive(child) and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert not _alive(child), f"run process {child} outlived the suite process"
    finally:
        _cleanup(proc, [child] if child else [])


# --------------------------------------------------------------------------------------------
# 5. the suite status marker


def test_suite_status_reads_marker_and_detects_gone_process(tmp_path):
    from evals.suite.status import STATUS_FILE, suite_status, write_suite_status

    assert suite_status(tmp_path) == {"status": "unknown"}
    doc = write_suite_status(tmp_path, "running")
    assert suite_status(tmp_path)["status"] == "running" and doc["pid"] == os.getpid()
    assert write_suite_status(tmp_path, "finished")["started"] == doc["started"]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    marker = json.loads((tmp_path / STATUS_FILE).read_text())
    (tmp_path / STATUS_FILE).write_text(json.dumps({**marker, "status": "running",
                                                    "pid": gone.pid}))
    status = suite_status(tmp_path)
    assert status["status"] == f"interrupted (process {gone.pid} gone)" and status["stale"]


@pytest.mark.slow
def test_sigterm_marks_suite_interrupted(tmp_path):
    from evals.suite.status import suite_status

    out = tmp_path / "out"
    proc = _start_suite(tmp_path, LONG, out)
    child = None
    try:
        child = _training_child(proc, out)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        (run_dir,) = out.glob("micro-*")
        status = suite_status(run_dir)
        assert status["status"] == "interrupted" and status["signal"] == signal.SIGTERM
        assert status["pid"] == proc.pid
    finally:
        _cleanup(proc, [child] if child else [])


# --------------------------------------------------------------------------------------------
# 6. a run process killed by SIGKILL (the out-of-memory killer)


@pytest.mark.slow
def test_sigkilled_run_process_explains_oom_in_error_txt(tmp_path):
    out = tmp_path / "out"
    proc = _start_suite(tmp_path, LONG, out)
    child = None
    try:
        child = _training_child(proc, out)
        time.sleep(1.0)  # its first events relayed: the suite process has read its memory
        os.kill(child, signal.SIGKILL)  # as the OOM killer would: the run process alone
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err
        (run_dir,) = [p for p in out.iterdir() if not p.is_symlink()]
        text = (run_dir / "vanilla-65536T-s0" / "error.txt").read_text()
        assert "SIGKILL" in text and "out-of-memory" in text
        assert "batch_size" in text and "grad_accum" in text and "smaller preset" in text
        assert "Peak resident memory last seen: " in text and " MiB" in text
        rec = json.loads((run_dir / "vanilla-65536T-s0" / "record.json").read_text())
        assert rec["status"] == "failed" and "SIGKILL" in rec["error"]
    finally:
        _cleanup(proc, [child] if child else [])


def test_killed_error_names_peak_memory_when_seen(tmp_path):
    from evals.suite.runner import _PeakMemory, _write_killed_error

    peak = _PeakMemory(os.getpid())
    seen = []
    peak.watching(seen.append)("event")
    assert seen == ["event"] and peak.bytes and peak.bytes > 10 * 2**20  # this interpreter
    error = _write_killed_error(tmp_path / "a", 4242, 3 * 2**30)
    assert "SIGKILL" in error and "out-of-memory" in error
    text = (tmp_path / "a" / "error.txt").read_text()
    assert "Peak resident memory last seen: 3,072 MiB" in text and "4242" in text
    _write_killed_error(tmp_path / "b", 4242, None)
    assert "peak memory is unknown" in (tmp_path / "b" / "error.txt").read_text()


# --------------------------------------------------------------------------------------------
# 7. the checkpoint is saved before the few-shot evaluation


def test_fewshot_failure_keeps_the_saved_checkpoint(monkeypatch, write_suite, tmp_path,
                                                    one_thread):
    import dataclasses

    from evals.suite import runner
    from evals.suite.spec import load_suite
    from evals.training.loop import for_world

    suite = load_suite(str(write_suite(ONE_MODEL + '\n[eval]\ntasks = ["mor_synth_filler"]\n')))
    run_dir, runs, suite_info, _ = runner._prepare(suite, tmp_path / "runs", None,
                                                   tmp_path / "cache", None, 1, lambda e: None)
    assert suite_info["eval"]["tasks"]

    def exploding_fewshot(*args, **kwargs):
        raise RuntimeError("lm-eval exploded")

    monkeypatch.setattr(runner, "_fewshot", exploding_fewshot)
    (spec,) = runs
    with pytest.raises(SystemExit) as e:  # in this process: `_child_main`, not a spawn
        runner._child_main(spec, suite_info, str(run_dir),
                           dataclasses.asdict(for_world(suite.train, 1)))
    assert e.value.code == 1
    out = run_dir / spec.run_id
    assert "lm-eval exploded" in (out / "error.txt").read_text()
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "failed" and "lm-eval exploded" in rec["error"]
    # Trained and saved before the few-shot phase: a resume reuses the weights.
    assert (out / "model.safetensors").is_file() and (out / runner.TRAIN_RESULT).is_file()
    assert runner.run_state(run_dir, spec.run_id) == ("run", 1)


def test_resume_refuses_a_directory_whose_suite_process_still_runs(write_suite, tmp_path):
    from evals.suite.runner import _check_resumable
    from evals.suite.spec import load_suite
    from evals.suite.status import STATUS_FILE, write_suite_status
    from mor.errors import ConfigError

    suite = load_suite(str(write_suite()))
    run_dir = tmp_path / "micro-x"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "suite.toml").write_text(suite.text)
    (run_dir / "plan.json").write_text("[]")
    (run_dir / "data" / "data.json").write_text("{}")
    doc = write_suite_status(run_dir, "running")
    assert _check_resumable(suite, run_dir, None) == run_dir  # this very process: fine
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / STATUS_FILE).write_text(json.dumps({**doc, "pid": other.pid}))
        with pytest.raises(ConfigError, match=f"suite process {other.pid} is still running"):
            _check_resumable(suite, run_dir, None)
    finally:
        other.kill()
        other.wait()
    assert _check_resumable(suite, run_dir, None) == run_dir  # gone: resumable
