"""`mor-bench eval` keeps its results (eval_results.json in the run directory), evaluates
every checkpoint of a suite run directory, and shows the paper's average ("paper avg")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mor
from evals.cli.evaluate import eval_rows, paper_average
from mor.config import ModelConfig
from tests.evals.cli.test_cli import assert_one_line_error, run_cli


def _save(directory: Path) -> Path:
    return mor.save_checkpoint(mor.build_model(ModelConfig.from_preset("micro")), directory,
                               extra={"tokenizer": {"kind": "bytes"}})


def _task(metric: str, value: float, n: int, subtasks=()) -> dict:
    return {"metrics": {metric: value}, "stderr": {metric: 0.01}, "n": n,
            "subtasks": list(subtasks)}


def _paper_result(**drop) -> dict:
    tasks = {
        "lambada_openai_local": _task("acc", 0.5, 10),
        "hellaswag_local": _task("acc_norm", 0.4, 10),
        "piqa_local": _task("acc_norm", 0.6, 10),
        "winogrande_local": _task("acc", 0.5, 10),
        "arc_easy_local": _task("acc_norm", 0.8, 30),
        "arc_challenge_local": _task("acc_norm", 0.2, 10),
        "mmlu_local": _task("acc", 0.3, 20, ["mmlu_a_local", "mmlu_b_local"]),
        "mmlu_a_local": _task("acc", 0.9, 10),
        "mmlu_b_local": _task("acc", 0.0, 10),
        "mor_paper_local": {"metrics": {}, "stderr": {}, "n": 92,
                            "subtasks": ["lambada_openai_local", "hellaswag_local"]},
        "mor_synthetic": _task("acc", 1.0, 4),  # not a paper task: never in the average
    }
    for name in drop:
        tasks.pop(name)
    return {"tasks": tasks, "scoring": "plain"}


def test_paper_average_like_the_report():
    # ARC merged item-weighted (0.8 * 30 + 0.2 * 10) / 40 = 0.65, MMLU once (its group)
    expected = (0.5 + 0.4 + 0.6 + 0.5 + 0.65 + 0.3) / 6
    assert paper_average(_paper_result()) == pytest.approx(expected)
    assert paper_average(_paper_result(hellaswag_local=True)) is None  # not all seven
    rows = eval_rows({"default": _paper_result()}, {"default": expected})
    assert rows[-1]["task"] == "paper avg"
    assert rows[-1]["value"] == f"{100 * expected:.2f}"
    assert all(r["task"] != "paper avg" for r in eval_rows({"default": _paper_result()}, {}))


@pytest.mark.slow
def test_eval_results_kept_and_suite_dir(capsys, tmp_path, one_thread):
    suite = tmp_path / "suite"
    a, b = _save(suite / "run-a"), _save(suite / "run-b")
    (suite / "plan.json").write_text("{}")
    cache = str(tmp_path / "cache")
    rc, out, err = run_cli(capsys, "eval", str(suite), "--tasks", "mor_synthetic", "--limit",
                           "1", "--cache-dir", cache, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert [c["checkpoint"] for c in res["checkpoints"]] == [str(a), str(b)]
    for ck in (a, b):
        entries = json.loads((ck / "eval_results.json").read_text())
        assert len(entries) == 1
        entry = entries[0]
        assert entry["tasks"] == ["mor_synthetic"]
        assert (entry["num_fewshot"], entry["limit"]) == (0, 1)
        assert "mor_synthetic" in entry["results"]["default"]["tasks"]
        assert entry["utc"].endswith("+00:00")

    rc, out, err = run_cli(capsys, "eval", str(a), "--tasks", "mor_synthetic", "--limit", "1",
                           "--cache-dir", cache)
    assert rc == 0, err
    assert "mor_synthetic" in out and "eval_results.json" in out
    assert len(json.loads((a / "eval_results.json").read_text())) == 2  # appended
    assert len(json.loads((b / "eval_results.json").read_text())) == 1


def test_empty_suite_dir_is_one_line(capsys, tmp_path):
    (tmp_path / "plan.json").write_text("{}")
    rc, out, err = run_cli(capsys, "eval", str(tmp_path), "--tasks", "mor_synthetic")
    assert rc == 2
    assert_one_line_error(err, str(tmp_path), "no run with a checkpoint")
