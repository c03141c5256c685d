"""Tests for the `mor-bench` command line (`evals.cli.main.main`, called in-process).

Only one test starts the installed console script; the rest call `main([...])` directly.
The end-to-end test trains the micro suite (vanilla + MoR, a few steps each, one process
per run as `mor-bench run` always does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from evals.cli.main import main
from evals.data.synthetic import DIFFICULTY_CLASSES
from evals.suite.record import SCHEMA, load_records
from evals.suite.runner import _child_main, make_run_dir
from evals.suite.spec import load_suite, plan_runs
from evals.training.loop import evaluate_nll
from mor import flops, load_checkpoint
from mor.config import PRESETS
from reports.table import render_report

SUBCOMMANDS = ("models", "suites", "run", "report", "check", "route", "peak-flops",
               "bench-train", "bench-infer", "publish")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("mor-bench: error:"), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


# --------------------------------------------------------------------------------------------
# help


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out
    assert "examples:" in out


@pytest.mark.parametrize("command,options", [
    ("models", ["--json", "--seq-len", "--recursions"]),
    ("suites", ["--json"]),
    ("run", ["suite", "--out", "--corpus", "--cache-dir", "--dry-run", "--json"]),
    ("report", ["run_dir", "--json", "--screenshot"]),
    ("check", ["run_dir", "--baseline", "--update", "--json"]),
    ("peak-flops", ["--device", "--size", "--json"]),
    ("route", ["checkpoint", "--text", "--file", "--routing", "--json"]),
    ("bench-train", ["--preset", "--family", "--num-recursions", "--seq-len", "--batch-size",
                     "--steps", "--device", "--json"]),
])
def test_subcommand_help(capsys, command, options):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"mor-bench {command}" in out
    for opt in options:
        assert opt in out, f"{opt} missing from `mor-bench {command} --help`"


def test_console_script_help():
    script = Path(sys.executable).with_name("mor-bench")
    assert script.is_file(), f"console script not installed next to {sys.executable}"
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "usage: mor-bench" in res.stdout
    assert all(name in res.stdout for name in SUBCOMMANDS)


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "usage: mor-bench" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# models, suites


def test_models_json(capsys):
    rc, out, _ = run_cli(capsys, "models", "--json")
    assert rc == 0
    rows = json.loads(out)
    assert {r["preset"] for r in rows} == set(PRESETS)
    for preset in PRESETS:
        fams = {r["family"] for r in rows if r["preset"] == preset}
        assert fams == {"vanilla", "recursive", "mor"}, preset
        vanilla = next(r for r in rows if r["preset"] == preset and r["family"] == "vanilla")
        for r in rows:
            if r["preset"] == preset and r["family"] == "mor":
                # Routing makes MoR cheaper per token than the vanilla backbone.
                assert r["flops_per_token_paper"] < vanilla["flops_per_token_paper"]
    v360 = next(r for r in rows if r["preset"] == "360m" and r["family"] == "vanilla")
    assert v360["params_non_embedding"] == pytest.approx(315e6, rel=0.01)
    assert v360["layers"] == "32"


def test_models_recursions_option(capsys):
    rc, out, _ = run_cli(capsys, "models", "--json", "--recursions", "2")
    assert rc == 0
    rows = json.loads(out)
    assert {r["num_recursions"] for r in rows} == {None, 2}


def test_suites_json(capsys):
    rc, out, _ = run_cli(capsys, "suites", "--json")
    assert rc == 0
    names = {r["name"] for r in json.loads(out)}
    assert {"smoke", "paper-360m", "cpu-small"} <= names


# --------------------------------------------------------------------------------------------
# run --dry-run

PLAN_KEYS = {"family", "num_recursions", "layers", "params_unique", "params_non_embedding",
             "flops_per_token_paper", "tokens", "steps", "batch_tokens"}


def test_dry_run_smoke(capsys):
    rc, out, _ = run_cli(capsys, "run", "smoke", "--dry-run", "--json")
    assert rc == 0
    rows = json.loads(out)
    suite = load_suite("smoke")
    assert [r["model"] for r in rows] == [m.name for m in suite.models]
    for r in rows:
        assert set(r) >= PLAN_KEYS, PLAN_KEYS - set(r)
        assert r["tokens"] == r["steps"] * r["batch_tokens"]
        assert r["flops_used"] <= r["budget"]
    vanilla = next(r for r in rows if r["family"] == "vanilla")
    mors = [r for r in rows if r["family"] == "mor"]
    assert mors
    assert all(r["tokens"] > vanilla["tokens"] for r in mors)


def test_dry_run_paper_360m_matches_the_paper(capsys):
    rc, out, _ = run_cli(capsys, "run", "paper-360m", "--dry-run", "--json")
    assert rc == 0
    rows = {r["model"]: r for r in json.loads(out)}
    # Paper Table 3 (isoFLOP rows at 16.5e18 FLOPs): vanilla 19.8B tokens, MoR N_r=3 29.7B.
    assert rows["vanilla"]["tokens"] == pytest.approx(19.8e9, rel=0.01)
    assert rows["mor-3"]["tokens"] == pytest.approx(29.7e9, rel=0.01)
    assert rows["mor-3"]["layers"] == "1+10+1"
    assert rows["mor-4"]["layers"] == "1+8+1"
    assert rows["mor-3-fixed20b"]["tokens"] == pytest.approx(20e9, rel=0.01)


def test_dry_run_table_output(capsys):
    rc, out, _ = run_cli(capsys, "run", "smoke", "--dry-run")
    assert rc == 0
    assert "plan for suite smoke" in out
    assert "mor-3-1.2e12F-s0" in out


# --------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2, nothing written

BAD_SUITES = {
    "unknown preset": ({'preset = "micro"': 'preset = "micro-xl"'}, ["preset", "'micro-xl'"]),
    "unknown family": ({'family = "vanilla"': 'family = "transformer"'},
                       ["family", "'transformer'", "'vanilla'"]),
    "unknown sharing": ({'family = "vanilla"': 'family = "recursive"\nnum_recursions = 2\n'
                                              'sharing = "zigzag"'}, ["sharing", "'zigzag'"]),
    "N_r too deep": ({"num_recursions = 2": "num_recursions = 3\nn_layers = 3"},
                     ["num_recursions", "n_layers=3", "'mor-2'"]),
    "N_r out of range": ({"num_recursions = 2": "num_recursions = 7"},
                         ["num_recursions", "7"]),
    "capacity out of range": ({"num_recursions = 2": "num_recursions = 2\n"
                                                     "capacities = [1.0, 1.5]"},
                              ["capacities", "1.5"]),
    "malformed TOML": ({"[data]": "[data"}, ["TOML"]),
    "unknown train key": ({"batch_size = 4": "batch_size = 4\nlearning_rate = 1e-3"},
                          ["[train]", "'learning_rate'"]),
    "budget too small": ({"tokens = [1024]": "tokens = [100]"},
                         ["budget", "too small", "128"]),
    "wrong type in [train]": ({"lr = 3e-3": 'lr = "fast"'}, ["[train]", "'lr'", "'fast'"]),
    "wrong type in [data]": ({"seq_len = 32": "seq_len = 32\nval_fraction = \"x\""},
                             ["[data]", "'val_fraction'"]),
    "wrong type in a model": ({'family = "vanilla"': 'family = "vanilla"\nrouter_alpha = "x"'},
                              ["'vanilla'", "'router_alpha'"]),
    "betas of the wrong length": ({"batch_size = 4": "batch_size = 4\nbetas = [0.9]"},
                                  ["[train]", "'betas'", "2 numbers"]),
    "section not a table": ({"seeds = [0]": 'seeds = [0]\ndefaults = "micro"',
                             '[defaults]\npreset = "micro"\n': ""}, ["[defaults]", "table"]),
    # Two runs with the same id would overwrite each other's directory.
    "duplicate seeds": ({"seeds = [0]": "seeds = [0, 0]"}, ["'seeds'", "twice"]),
    "duplicate flops budgets": ({"tokens = [1024]": "flops = [1e9, 1e9]"},
                                ["[budget]", "flops", "same budget twice"]),
    "duplicate token budgets": ({"tokens = [1024]": "tokens = [1024, 1024]"},
                                ["[budget]", "tokens", "same budget twice"]),
    # Equal in the 6 significant digits of the run id tag ("1e+09F" for both).
    "budgets equal to 6 digits": ({"tokens = [1024]": "flops = [1e9, 1.0000001e9]"},
                                  ["[budget]", "same budget twice", "6 significant digits"]),
    "duplicate budgets of a model": ({"num_recursions = 2": "num_recursions = 2\n"
                                                          "budget = {tokens = [2048, 2048]}"},
                                     ["'mor-2' budget", "same budget twice"]),
}


@pytest.mark.parametrize("case", list(BAD_SUITES))
def test_bad_suite_is_one_line_error(capsys, tmp_path, write_suite, case):
    replace, needles = BAD_SUITES[case]
    suite = write_suite(replace=replace, name="bad_suite.toml")
    out_root = tmp_path / "runs"
    for extra in ([], ["--dry-run"]):
        rc, _, err = run_cli(capsys, "run", str(suite), "--out", str(out_root), *extra)
        assert rc == 2, err
        assert_one_line_error(err, "bad_suite.toml", *needles)
    assert not out_root.exists()  # rejected before any directory, data or training


def test_unknown_suite_name(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "run", "no-such-suite", "--out", str(tmp_path / "runs"))
    assert rc == 2
    assert_one_line_error(err, "'no-such-suite'", "smoke")
    assert not (tmp_path / "runs").exists()


def test_missing_corpus_fails_before_training(capsys, tmp_path, write_suite):
    suite = write_suite()
    out_root = tmp_path / "runs"
    rc, _, err = run_cli(capsys, "run", str(suite), "--out", str(out_root),
                         "--corpus", "/nonexistent/x.jsonl", "--cache-dir", str(tmp_path))
    assert rc == 2
    assert_one_line_error(err, "/nonexistent/x.jsonl")
    assert not list(out_root.rglob("record.json"))
    assert not list(out_root.rglob("*.safetensors"))


def test_planning_errors_come_before_data_errors(capsys, tmp_path, write_suite):
    suite = write_suite(replace={"tokens = [1024]": "tokens = [100]"})
    rc, _, err = run_cli(capsys, "run", str(suite), "--out", str(tmp_path / "runs"),
                         "--corpus", "/nonexistent/x.jsonl")
    assert rc == 2
    assert_one_line_error(err, "too small")
    assert not (tmp_path / "runs").exists()


def test_report_of_missing_dir(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "report", str(tmp_path / "nope"))
    assert rc == 2
    assert_one_line_error(err, "nope")


def test_a_malformed_record_is_a_one_line_error(capsys, tmp_path):
    (tmp_path / "run-a").mkdir()
    (tmp_path / "run-a" / "record.json").write_text('{"schema": "something/else"}')
    for command in (["report", str(tmp_path)],
                    ["check", str(tmp_path), "--baseline", str(tmp_path / "b.json"),
                     "--update"]):
        rc, out, err = run_cli(capsys, *command)
        assert rc == 2, (command, err)
        assert out == ""
        assert_one_line_error(err, "record.json", "something/else")


def test_a_bug_is_not_turned_into_a_usage_error(monkeypatch):
    import evals.cli.models

    def broken(args):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(evals.cli.models, "cmd_suites", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["suites"])


def test_only_the_chosen_command_module_is_imported():
    script = ("import sys\nfrom evals.cli.main import main\n"
              "assert main(['suites', '--json']) == 0\n"
              "loaded = sorted(m for m in sys.modules if m.startswith('evals.cli.'))\n"
              "print(loaded)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[3])
    assert res.returncode == 0, res.stderr
    loaded = res.stdout.strip().splitlines()[-1]
    assert "evals.cli.models" in loaded
    for other in ("evals.cli.run", "evals.cli.perf", "evals.cli.evaluate"):
        assert other not in loaded, loaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of device = \"cuda\" "
                    "on a machine without CUDA; this one has CUDA")
def test_cuda_device_without_cuda_fails_before_any_run_dir(capsys, tmp_path, write_suite):
    suite = write_suite(replace={"threads = 1": 'threads = 1\ndevice = "cuda"'})
    out_root = tmp_path / "runs"
    cache = tmp_path / "cache"
    # A real run (not --dry-run): the device is checked before data, directories, training.
    rc, _, err = run_cli(capsys, "run", str(suite), "--out", str(out_root),
                         "--cache-dir", str(cache))
    assert rc == 2
    assert_one_line_error(err, "'cuda'", "device")
    assert not out_root.exists()
    assert not cache.exists() or not any(cache.iterdir())  # no data was prepared either


@pytest.mark.parametrize("suite_arg", ["smoke", None])
def test_dry_run_checks_an_explicit_corpus(capsys, tmp_path, write_suite, suite_arg):
    suite = suite_arg or str(write_suite())
    out_root = tmp_path / "runs"
    rc, out, err = run_cli(capsys, "run", suite, "--dry-run", "--out", str(out_root),
                           "--corpus", "/nonexistent/x.jsonl")
    assert rc == 2
    assert out == ""  # no plan printed for a corpus that cannot be read
    assert_one_line_error(err, "/nonexistent/x.jsonl")
    assert not out_root.exists()


def test_dry_run_with_a_readable_corpus(capsys, tmp_path, write_suite):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to train on\n")
    rc, out, _ = run_cli(capsys, "run", str(write_suite()), "--dry-run", "--json",
                         "--corpus", str(corpus))
    assert rc == 0
    assert [r["model"] for r in json.loads(out)] == ["vanilla", "mor-2"]


# --------------------------------------------------------------------------------------------
# models, peak-flops, bench-train: bad options, and a tiny benchmark


@pytest.mark.parametrize("values", [["9"], ["0"], ["2", "5"]])
def test_models_rejects_recursions_out_of_range(capsys, values):
    rc, out, err = run_cli(capsys, "models", "--recursions", *values)
    assert rc == 2
    assert out == ""
    bad = [v for v in values if not 1 <= int(v) <= 4]
    assert_one_line_error(err, "--recursions", *bad, "1..4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA; this "
                    "machine has CUDA")
def test_peak_flops_cuda_without_cuda(capsys):
    rc, out, err = run_cli(capsys, "peak-flops", "--device", "cuda")
    assert rc == 2
    assert out == ""
    assert_one_line_error(err, "'cuda'", "no CUDA device")


def test_peak_flops_rejects_tiny_size(capsys):
    rc, _, err = run_cli(capsys, "peak-flops", "--size", "8")
    assert rc == 2
    assert_one_line_error(err, "--size 8")


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_bench_train_rejects_no_timed_steps(capsys, steps):
    rc, out, err = run_cli(capsys, "bench-train", "--steps", steps)
    assert rc == 2
    assert out == ""
    assert_one_line_error(err, f"--steps {steps}")


def test_bench_train_json(capsys, monkeypatch, one_thread):
    import evals.perf.train_speed
    from evals.training.device import measure_matmul_peak

    # A real peak measurement, on 256x256 matrices instead of 1024x1024 (seconds saved).
    monkeypatch.setattr(evals.perf.train_speed, "measure_matmul_peak",
                        lambda device, size=1024, repeats=7: measure_matmul_peak(device, 256))
    rc, out, _ = run_cli(capsys, "bench-train", "--preset", "micro", "--steps", "2",
                         "--seq-len", "32", "--batch-size", "2", "--device", "cpu", "--json")
    assert rc == 0
    res = json.loads(out)
    assert (res["preset"], res["family"], res["seq_len"], res["batch_size"], res["steps"]) == (
        "micro", "vanilla", 32, 2, 2)
    assert res["device"] == "cpu" and res["threads"] == 1
    # MFU is taken against the mean of the peaks measured before and after the steps.
    peak = (res["matmul_peak_before"] + res["matmul_peak_after"]) / 2
    assert res["matmul_peak_flops_per_s"] == pytest.approx(peak)
    rows = res.get("variants", [res])  # one row per model variant (a single one here)
    assert len(rows) == 1
    for row in rows:
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(2 * 32 / row["median_step_s"])
        assert row["mfu"] > 0
        assert row["mfu"] == pytest.approx(row["achieved_flops_per_s"] / peak)


# --------------------------------------------------------------------------------------------
# a tiny end-to-end run


def _check_run_dir(run_dir: Path, run_ids: list[str]) -> dict[str, dict]:
    records = {}
    val_windows = torch.from_numpy(np.load(run_dir / "data" / "val.npy").astype(np.int64))
    for run_id in run_ids:
        sub = run_dir / run_id
        rec = json.loads((sub / "record.json").read_text())
        assert rec["status"] == "ok", rec.get("error")
        assert rec["schema"] == SCHEMA
        assert rec["run_id"] == run_id
        m = rec["metrics"]
        assert math.isfinite(m["val_nll"]) and 0 < m["val_nll"] < math.log(257) + 1
        assert m["tokens_per_s"] > 0
        assert m["peak_mem_bytes"] > 0
        assert m["tokens"] == rec["plan"]["tokens"]
        assert m["val_tokens"] == val_windows.shape[0] * (val_windows.shape[1] - 1)
        assert {"git", "versions", "hardware"} <= set(rec["provenance"])
        assert rec["provenance"]["versions"]["torch"] == torch.__version__
        assert rec["loss_curve"] and all(math.isfinite(c["loss"]) for c in rec["loss_curve"])
        assert rec["loss_curve"][-1]["step"] == rec["plan"]["steps"]
        assert (sub / "model.safetensors").is_file() and (sub / "config.json").is_file()

        # The checkpoint reproduces the recorded validation NLL on the saved windows.
        model = load_checkpoint(sub)
        assert model.cfg.to_dict() == rec["config"]
        val = evaluate_nll(model, val_windows, batch_size=rec["train"]["val_batch_size"],
                           device=torch.device("cpu"))
        assert val["val_nll"] == pytest.approx(m["val_nll"], rel=1e-5)
        records[run_id] = rec
    return records


@dataclasses.dataclass(frozen=True)
class E2ERun:
    args: list[str]        # the `mor-bench run ... --json` command line
    rc: int
    stdout: str            # what `main` printed on (Python-level) stdout
    suite_path: Path
    out_root: Path
    run_ids: list[str]

    @property
    def run_dir(self) -> Path:
        return Path(json.loads(self.stdout)["run_dir"])

    def sub(self, family: str) -> Path:
        """The run subdirectory (checkpoint) of the one run of `family` ("vanilla"/"mor")."""
        ids = [i for i in self.run_ids if i.startswith("mor-" if family == "mor" else family)]
        assert len(ids) == 1, ids
        return self.run_dir / ids[0]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, micro_suite_file) -> E2ERun:
    """The micro suite (vanilla + MoR N_r=2, a few steps each), trained ONCE for this module
    by `mor-bench run --json`; tests read its run directory, none trains again except the
    determinism check of test_end_to_end_micro_suite."""
    root = tmp_path_factory.mktemp("e2e")
    out_root = root / "runs"
    args = ["run", str(micro_suite_file), "--out", str(out_root), "--json",
            "--cache-dir", str(root / "cache")]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(args)
    run_ids = [r.run_id for r in plan_runs(load_suite(str(micro_suite_file)))]
    return E2ERun(args, rc, stdout.getvalue(), micro_suite_file, out_root, run_ids)


@pytest.mark.slow
def test_end_to_end_micro_suite(capfd, e2e):
    assert e2e.rc == 0
    payload = json.loads(e2e.stdout)  # stdout holds the JSON document and nothing else
    run_dir = Path(payload["run_dir"])
    out_root = e2e.out_root
    assert run_dir.parent == out_root and run_dir.is_dir()
    assert payload["failed"] == []
    run_ids = e2e.run_ids
    assert sorted(payload["records"]) == sorted(run_ids)
    assert {row["model"] for row in payload["table"]} == {"vanilla", "mor-2"}

    records = _check_run_dir(run_dir, run_ids)
    mor = next(r for r in records.values() if r["family"] == "mor")
    assert {"selected_frac/r1", "selected_frac/r2"} <= set(mor["metrics"]["routing"])

    md = (run_dir / "report.md").read_text()
    assert "| vanilla |" in md and "| mor-2 |" in md  # one table row per model
    assert (run_dir / "report.csv").is_file()
    assert (run_dir / "suite.toml").read_text() == e2e.suite_path.read_text()
    assert len(json.loads((run_dir / "plan.json").read_text())) == len(run_ids)

    rc = main(["report", str(run_dir), "--json"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    report = json.loads(out)
    assert report["n_ok"] == 2 and report["n_failed"] == 0
    assert len(report["table"]) == 2
    assert Path(report["markdown"]) == run_dir / "report.md"

    # The same suite again into the same --out: a new run directory, the same numbers
    # (same seeds, one thread per run).
    rc = main(e2e.args)
    out, err = capfd.readouterr()  # fd-level: includes what the run processes print
    assert rc == 0, err
    run_dir2 = Path(json.loads(out)["run_dir"])  # stdout: the JSON document, nothing else
    assert run_dir2 != run_dir and run_dir2.parent == out_root
    assert run_dir.is_dir() and (run_dir / "report.md").is_file()
    for run_id in run_ids:
        again = json.loads((run_dir2 / run_id / "record.json").read_text())
        assert again["metrics"]["val_nll"] == pytest.approx(
            records[run_id]["metrics"]["val_nll"], rel=1e-6)


@pytest.mark.slow
def test_e2e_writes_the_html_report_and_depth_sample(e2e):
    payload = json.loads(e2e.stdout)
    run_dir = e2e.run_dir
    assert Path(payload["html"]) == run_dir / "index.html"
    page = (run_dir / "index.html").read_text()
    assert "| vanilla |" not in page and "<td>vanilla</td>" in page and "<td>mor-2</td>" in page
    assert payload["figures"] and all(Path(f["png"]).is_file()
                                      for f in payload["figures"].values())
    assert page.count('src="data:image/png;base64,') == len(payload["figures"])
    assert "depth_map" in payload["figures"]  # drawn from the MoR run's depth_sample.json
    sample = json.loads((e2e.sub("mor") / "depth_sample.json").read_text())
    assert len(sample["tokens"]) == len(sample["depths"]) > 0
    assert all(1 <= d <= 2 for d in sample["depths"])  # N_r = 2, step 1 keeps every token
    assert sample["routing"] == "topk" and sample["num_recursions"] == 2
    assert not (e2e.sub("vanilla") / "depth_sample.json").exists()
    assert not (e2e.sub("mor") / "fewshot_items.json").exists()  # the suite has no [eval]


# --------------------------------------------------------------------------------------------
# suite progress: the live table and the plain log (the events' order is tested in
# tests/evals/suite/test_events.py)


def test_live_progress_table_rows_and_eta():
    from rich.console import Console

    from evals.cli.display import SuiteProgress
    from evals.suite.events import RunEvent

    def ev(run_id: str, phase: str, **fields) -> RunEvent:
        return RunEvent(run_id, phase, 0.0, **fields)

    buf = io.StringIO()
    progress = SuiteProgress(live=False, console=Console(file=buf, width=200))
    progress(ev("a", "queued", total=100))
    progress(ev("b", "queued", total=50))
    progress(ev("a", "data"))
    progress(ev("a", "training", step=0, total=100))
    progress.rows["a"]["t_train"] -= 10.0  # 10 s of training so far
    progress(ev("a", "training", step=25, total=100, loss=2.5))
    assert progress.eta(progress.rows["a"]) == pytest.approx(30.0, rel=0.05)
    assert progress.eta(progress.rows["b"]) is None  # queued: no rate yet
    progress.console.print(progress.table())
    text = buf.getvalue()
    assert "0/2 runs finished" in text
    assert "training" in text and "25/100" in text and "2.500" in text and "0:30" in text
    assert "queued" in text
    progress(ev("a", "done", val_nll=1.5, tokens_per_s=1000.0, wall_s=65.0))
    progress(ev("b", "failed", error="boom", wall_s=1.0))
    buf.truncate(0)
    progress.console.print(progress.table())
    assert "2/2 runs finished" in buf.getvalue()
    progress.print_summary([
        {"run_id": "a", "status": "ok", "metrics": {"val_nll": 1.5, "tokens_per_s": 1000.0}},
        {"run_id": "b", "status": "failed", "metrics": {}}])
    summary = buf.getvalue().split("suite summary", 1)[1]
    assert "1.5000" in summary and "1,000" in summary and "1:05" in summary
    assert "failed" in summary


def test_run_dirs_never_collide(tmp_path):
    dirs = {make_run_dir(tmp_path, "same") for _ in range(20)}  # all within one second
    assert len(dirs) == 20 and all(d.is_dir() for d in dirs)


def test_failed_run_writes_failure_record(tmp_path, write_suite):
    suite = load_suite(str(write_suite()))
    spec = plan_runs(suite)[0]
    run_dir = tmp_path / "suite-run"
    run_dir.mkdir()  # no data/ inside: the run cannot load its windows
    suite_info = {"name": suite.name, "source": suite.source, "sha256": suite.sha256,
                  "run_dir": str(run_dir)}
    handlers = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    with pytest.raises(SystemExit) as e:
        _child_main(spec, suite_info, str(run_dir), dataclasses.asdict(suite.train))
    assert e.value.code == 1
    # Signal handling is the run PROCESS's (`_child_process`): called here, nothing changes
    # (a handler left behind would be inherited by every later fork, e.g. lm-eval's pool).
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers

    rec = json.loads((run_dir / spec.run_id / "record.json").read_text())
    assert rec["status"] == "failed"
    assert rec["schema"] == SCHEMA and rec["run_id"] == spec.run_id
    assert rec["error"].startswith("RecordError:") and "data.json" in rec["error"]
    assert "Traceback" in (run_dir / spec.run_id / "error.txt").read_text()
    assert not (run_dir / spec.run_id / "model.safetensors").exists()
    assert load_records(run_dir)[0]["status"] == "failed"

    report = render_report(run_dir)
    assert report["n_failed"] == 1 and report["n_ok"] == 0
    md = (run_dir / "report.md").read_text()
    assert "## Failed runs" in md
    failed_section = md.split("## Failed runs", 1)[1]
    assert spec.run_id in failed_section and "data.json" in failed_section


# --------------------------------------------------------------------------------------------
# route: per-token depths from the MoR checkpoint of the end-to-end run

ROUTE_TEXT = "12 + 39 = 51. the cat sat."


def _route_json(capsys, checkpoint: Path, *extra: str) -> dict:
    rc, out, err = run_cli(capsys, "route", str(checkpoint), "--text", ROUTE_TEXT, "--json",
                           *extra)
    assert rc == 0, err
    return json.loads(out)


def _check_routed(routed: dict, num_recursions: int) -> list[int]:
    tokens = routed["tokens"]
    assert "".join(t["text"] for t in tokens) == ROUTE_TEXT  # byte tokenizer, ASCII text
    assert [t["id"] for t in tokens] == list(ROUTE_TEXT.encode())
    depths = [t["depth"] for t in tokens]
    assert all(type(d) is int and 0 <= d <= num_recursions for d in depths), depths
    assert routed["num_recursions"] == num_recursions
    return depths


@pytest.mark.slow
def test_route_json(capsys, e2e):
    sub = e2e.sub("mor")
    cfg = load_checkpoint(sub).cfg
    assert (cfg.router, cfg.eval_routing, cfg.num_recursions) == ("expert", "topk", 2)
    routed = _route_json(capsys, sub)
    assert routed["routing"] == "topk"  # the checkpoint's own evaluation routing
    depths = _check_routed(routed, 2)
    # Top-k: step 1 (capacity 1) takes every token, step 2 the top floor(T/2) of them.
    t = len(ROUTE_TEXT)
    assert min(depths) == 1
    assert sum(d == 2 for d in depths) == t // 2


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_route_routing_option(capsys, e2e, routing):
    routed = _route_json(capsys, e2e.sub("mor"), "--routing", routing)
    assert routed["routing"] == routing
    depths = _check_routed(routed, 2)
    assert min(depths) == 1  # capacity-1 first step keeps every token in both modes
    if routing == "causal":
        # Causal: a token's depth depends on itself and the tokens BEFORE it only, so the
        # depths of a prefix are the prefix of the depths.
        rc, out, err = run_cli(capsys, "route", str(e2e.sub("mor")), "--json", "--routing",
                               "causal", "--text", ROUTE_TEXT[:10])
        assert rc == 0, err
        assert [tok["depth"] for tok in json.loads(out)["tokens"]] == depths[:10]


@pytest.mark.slow
def test_route_file_equals_text(capsys, tmp_path, e2e):
    text_file = tmp_path / "text.txt"
    text_file.write_text(ROUTE_TEXT)
    rc, out, err = run_cli(capsys, "route", str(e2e.sub("mor")), "--file", str(text_file),
                           "--json")
    assert rc == 0, err
    assert json.loads(out) == _route_json(capsys, e2e.sub("mor"))


@pytest.mark.slow
def test_route_terminal_output(capsys, e2e):
    rc, out, err = run_cli(capsys, "route", str(e2e.sub("mor")), "--text", ROUTE_TEXT)
    assert rc == 0, err
    assert "depth:" in out  # the legend
    # piped (not a terminal): every byte-token followed by its depth, e.g. "t[1]h[2]e[1]"
    assert "the cat sat." in re.sub(r"\[\d\]", "", out)
    assert re.search(r"t\[\d\]h\[\d\]e\[\d\]", out)
    assert "routing topk" in out
    assert "tokens per depth:" in out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["both", "neither"])
def test_route_needs_exactly_one_text_source(capsys, tmp_path, e2e, how):
    text_file = tmp_path / "text.txt"
    text_file.write_text(ROUTE_TEXT)
    extra = ["--text", ROUTE_TEXT, "--file", str(text_file)] if how == "both" else []
    rc, out, err = run_cli(capsys, "route", str(e2e.sub("mor")), *extra)
    assert rc == 2
    assert out == ""
    assert_one_line_error(err, "--text", "--file")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vanilla checkpoint", "missing file", "not a checkpoint",
                                  "empty text"])
def test_route_bad_input(capsys, tmp_path, e2e, case):
    checkpoint, extra, needles = {
        "vanilla checkpoint": (e2e.sub("vanilla"), ["--text", ROUTE_TEXT],
                               ["only MoR models route tokens", "a vanilla model"]),
        "missing file": (e2e.sub("mor"), ["--file", str(tmp_path / "nope.txt")],
                         ["nope.txt", "does not exist"]),
        "not a checkpoint": (e2e.run_dir, ["--text", ROUTE_TEXT], ["not a mor-bench checkpoint"]),
        "empty text": (e2e.sub("mor"), ["--text", ""], ["empty"]),
    }[case]
    rc, out, err = run_cli(capsys, "route", str(checkpoint), *extra)
    assert rc == 2
    assert out == ""
    assert_one_line_error(err, *needles)


# --------------------------------------------------------------------------------------------
# what the end-to-end run recorded for MoR


@pytest.mark.slow
def test_e2e_records_routing_fields(e2e):
    recs = {r["family"]: r for r in load_records(e2e.run_dir)}
    mor, vanilla = recs["mor"], recs["vanilla"]
    assert (mor["router"], mor["kv"], mor["eval_routing"]) == ("expert", "cache", "topk")
    for key in ("router", "kv", "eval_routing"):
        assert key in vanilla and vanilla[key] is None

    m = mor["metrics"]
    # Expert-choice is evaluated under both routings; val_nll is the configured (top-k) one.
    assert set(m["val_nll_by_routing"]) == {"topk", "causal"}
    assert all(math.isfinite(v) for v in m["val_nll_by_routing"].values())
    assert m["val_nll"] == m["val_nll_by_routing"]["topk"]
    assert set(m["val_routing_by_mode"]) == {"topk", "causal"}
    assert 0 <= m["val_routing_by_mode"]["topk"]["sampling_acc"] <= 1
    assert vanilla["metrics"]["val_nll_by_routing"] == {}
    assert vanilla["metrics"]["depth_by_mode"] == {}

    # What reports need of the model, written at run time (they never import model code).
    for rec in (mor, vanilla):
        cfg = load_checkpoint(e2e.run_dir / rec["run_id"]).cfg
        seq_len = rec["data"]["seq_len"]
        assert rec["kv_cache"] == {"seq_len": seq_len, "bytes_per_seq": flops.kv_cache_bytes(
            cfg, seq_len, batch_size=1)}
        assert rec["data"]["difficulty_classes"] == list(DIFFICULTY_CLASSES)
    # MoR caches only the tokens routed to each step: less than vanilla's full cache.
    assert mor["kv_cache"]["bytes_per_seq"] < vanilla["kv_cache"]["bytes_per_seq"]

    val_tokens = m["val_tokens"]
    assert set(m["depth_by_mode"]) == {"topk", "causal"}
    for mode, summary in m["depth_by_mode"].items():
        assert 1 <= summary["mean_depth"] <= 2, mode  # N_r = 2, step 1 keeps every token
        assert sum(summary["depth_share"].values()) == pytest.approx(1.0)
        assert summary["depth_share"]["0"] == 0.0
        by_class = summary["by_class"]  # the synthetic corpus labels token difficulty
        assert by_class and set(by_class) <= set(DIFFICULTY_CLASSES), mode
        assert sum(c["tokens"] for c in by_class.values()) == val_tokens
        mean = sum(c["mean_depth"] * c["tokens"] for c in by_class.values()) / val_tokens
        assert mean == pytest.approx(summary["mean_depth"], rel=1e-5)
    # Top-k at evaluation keeps floor(T/2) of every T-token window at step 2.
    seq_len = mor["data"]["seq_len"]
    assert m["depth_by_mode"]["topk"]["mean_depth"] == pytest.approx(
        1 + (seq_len // 2) / seq_len)

    for rec in (mor, vanilla):
        eff = rec["metrics"]["flops_per_token_effective"]
        assert math.isfinite(eff) and eff > 0
        assert rec["metrics"]["flops_used_effective"] == pytest.approx(
            eff * rec["metrics"]["tokens"])
    assert vanilla["metrics"]["flops_per_token_effective"] == vanilla["plan"]["flops_per_token"]
    assert m["flops_per_token_effective"] < vanilla["metrics"]["flops_per_token_effective"]


@pytest.mark.slow
def test_e2e_report_columns(e2e):
    table = render_report(e2e.run_dir)["table"]
    for col in ("router", "kv", "eval_routing", "sampling_acc", "dead_token_ratio",
                "rel_params", "rel_tokens", "rel_flops_per_token"):
        assert col in table.columns, col
    rows = {r["family"]: r for r in table.to_dict(orient="records")}
    mor, vanilla = rows["mor"], rows["vanilla"]
    assert (mor["router"], mor["kv"], mor["eval_routing"]) == ("expert", "cache", "topk")
    assert vanilla["router"] is None or pd.isna(vanilla["router"])
    assert vanilla["rel_params"] == vanilla["rel_tokens"] == vanilla["rel_flops_per_token"] == 1
    assert mor["rel_params"] < 1  # shared layers
    assert mor["rel_tokens"] == 1  # a token budget: both trained on the same tokens
    assert mor["rel_flops_per_token"] < 1
    assert 0 <= mor["sampling_acc"] <= 1 and 0 <= mor["dead_token_ratio"] <= 1
    assert math.isnan(vanilla["sampling_acc"]) and math.isnan(vanilla["dead_token_ratio"])
    md = (e2e.run_dir / "report.md").read_text()
    assert "| expert | cache |" in md


@pytest.mark.parametrize("flag,value,want", [
    ("--limit", "0", "a positive integer, got 0"),
    ("--limit", "-5", "a positive integer, got -5"),
    ("--batch-size", "0", "a positive integer, got 0"),
    ("--num-fewshot", "-1", "an integer >= 0, got -1"),
    ("--limit", "ten", "a positive integer, got 'ten'"),
])
def test_eval_rejects_bad_numbers_before_loading_anything(capsys, tmp_path, flag, value, want):
    """argparse refuses them (exit 2, one error line after the usage) before the
    checkpoint -- here one that does not exist -- is even looked at."""
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path / "nothing"), "--tasks", "piqa_local", f"{flag}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"mor-bench eval: error: argument {flag}: must be {want}"
    assert "Traceback" not in err
