"""Tests for the `mor-bench` command line (`evals.cli.main`, called in-process).

Only one test starts the installed console script; the rest call `main([...])` directly.
The end-to-end test trains the micro suite (vanilla + MoR, a few steps each, one process
per run as `mor-bench run` always does).
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evals.cli import main
from evals.records import SCHEMA, load_records
from evals.runner import _child_main, make_run_dir
from evals.suite import load_suite, plan_runs
from evals.train import evaluate_nll
from mor import load_checkpoint
from mor.config import PRESETS
from reports.table import render_report

SUBCOMMANDS = ("models", "suites", "run", "report", "peak-flops")


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
    ("report", ["run_dir", "--json"]),
    ("peak-flops", ["--device", "--size", "--json"]),
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


@pytest.mark.slow
def test_end_to_end_micro_suite(capfd, tmp_path, write_suite):
    suite_path = write_suite()
    out_root = tmp_path / "runs"
    args = ["run", str(suite_path), "--out", str(out_root), "--json",
            "--cache-dir", str(tmp_path / "cache")]
    rc = main(args)
    out, err = capfd.readouterr()  # fd-level: includes what the run processes print
    assert rc == 0, err
    payload = json.loads(out)  # stdout holds the JSON document and nothing else
    run_dir = Path(payload["run_dir"])
    assert run_dir.parent == out_root and run_dir.is_dir()
    assert payload["failed"] == []
    run_ids = [r.run_id for r in plan_runs(load_suite(str(suite_path)))]
    assert sorted(payload["records"]) == sorted(run_ids)
    assert {row["model"] for row in payload["table"]} == {"vanilla", "mor-2"}

    records = _check_run_dir(run_dir, run_ids)
    mor = next(r for r in records.values() if r["family"] == "mor")
    assert {"selected_frac/r1", "selected_frac/r2"} <= set(mor["metrics"]["routing"])

    md = (run_dir / "report.md").read_text()
    assert "| vanilla |" in md and "| mor-2 |" in md  # one table row per model
    assert (run_dir / "report.csv").is_file()
    assert (run_dir / "suite.toml").read_text() == suite_path.read_text()
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
    rc = main(args)
    out, err = capfd.readouterr()
    assert rc == 0, err
    run_dir2 = Path(json.loads(out)["run_dir"])
    assert run_dir2 != run_dir and run_dir2.parent == out_root
    assert run_dir.is_dir() and (run_dir / "report.md").is_file()
    for run_id in run_ids:
        again = json.loads((run_dir2 / run_id / "record.json").read_text())
        assert again["metrics"]["val_nll"] == pytest.approx(
            records[run_id]["metrics"]["val_nll"], rel=1e-6)


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
    with pytest.raises(SystemExit) as e:
        _child_main(spec, suite_info, str(run_dir), dataclasses.asdict(suite.train), None)
    assert e.value.code == 1

    rec = json.loads((run_dir / spec.run_id / "record.json").read_text())
    assert rec["status"] == "failed"
    assert rec["schema"] == SCHEMA and rec["run_id"] == spec.run_id
    assert "FileNotFoundError" in rec["error"]
    assert "Traceback" in (run_dir / spec.run_id / "error.txt").read_text()
    assert not (run_dir / spec.run_id / "model.safetensors").exists()
    assert load_records(run_dir)[0]["status"] == "failed"

    report = render_report(run_dir)
    assert report["n_failed"] == 1 and report["n_ok"] == 0
    md = (run_dir / "report.md").read_text()
    assert "## Failed runs" in md
    failed_section = md.split("## Failed runs", 1)[1]
    assert spec.run_id in failed_section and "FileNotFoundError" in failed_section
