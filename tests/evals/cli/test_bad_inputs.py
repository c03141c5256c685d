"""Bad input a researcher meets in a first afternoon: broken checkpoints, unknown or offline
task names, texts longer than the model's window -- each one line on stderr, exit code 2
(or a warning), never a traceback. Also: checkpoint files get ordinary file modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mor
from evals.cli.display import render_routed_text
from evals.lmeval.tasks import check_tasks
from mor.config import ModelConfig
from mor.errors import ConfigError
from tests.evals.cli.test_cli import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[3]


def _save(directory: Path, **overrides) -> Path:
    cfg = ModelConfig.from_preset("micro", family="mor", num_recursions=2, **overrides)
    return mor.save_checkpoint(mor.build_model(cfg), directory,
                               extra={"tokenizer": {"kind": "bytes"}})


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("ckpt") / "mor")


def _corrupt(src: Path, dst: Path, how: str) -> tuple[Path, list[str]]:
    """A copy of `src` broken in one way, and what its error line must name."""
    dst.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    weights, config = dst / "model.safetensors", dst / "config.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
        return dst, [str(weights), "truncated"]
    if how == "empty":
        weights.write_bytes(b"")
        return dst, [str(weights), "truncated"]
    if how == "bad_json":
        config.write_text('{"model": {"family": "mor",')
        return dst, [str(config), "not valid JSON"]
    meta = json.loads(config.read_text())  # "mismatch": shapes that do not fit the weights
    meta["model"]["d_model"] *= 2
    config.write_text(json.dumps(meta))
    return dst, [str(config), "size mismatch", "embed.weight"]


COMMANDS = {
    "eval": lambda ck, tmp: ["eval", str(ck), "--tasks", "mor_synthetic", "--limit", "1",
                             "--cache-dir", str(tmp / "cache")],
    "route": lambda ck, tmp: ["route", str(ck), "--text", "the cat sat"],
    "bench-infer": lambda ck, tmp: ["bench-infer", str(ck)],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("how", ["truncated", "empty", "bad_json", "mismatch"])
def test_broken_checkpoint_is_one_line(capsys, tmp_path, one_thread, good_checkpoint,
                                       command, how):
    ckpt, needles = _corrupt(good_checkpoint, tmp_path / "broken", how)
    rc, out, err = run_cli(capsys, *COMMANDS[command](ckpt, tmp_path))
    assert rc == 2, err
    assert_one_line_error(err, *needles)


def test_good_checkpoint_still_loads(good_checkpoint):
    model = mor.load_checkpoint(good_checkpoint)
    assert model.cfg.family == "mor"


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_files_respect_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        directory = _save(tmp_path / "ck")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert (directory / name).stat().st_mode & 0o777 == mode, name


# --- task names -------------------------------------------------------------------------------
def test_unknown_task_in_eval_suggests_close_names(capsys, tmp_path, one_thread,
                                                   good_checkpoint):
    rc, out, err = run_cli(capsys, "eval", str(good_checkpoint), "--tasks",
                           "mor_synthetic,hellaswg", "--cache-dir", str(tmp_path / "c"))
    assert rc == 2
    assert_one_line_error(err, "hellaswg", "did you mean", "hellaswag")
    assert not (good_checkpoint / "eval_results.json").exists()  # nothing was evaluated


def test_check_tasks_resolves_every_name(tmp_path):
    check_tasks(["hellaswag", "mor_synthetic", "mor_synth_recall"], tmp_path)  # all known
    with pytest.raises(ConfigError) as e:
        check_tasks(["arc_easy", "no_such_task_xyz"], tmp_path, where="suite.toml [eval]: ")
    msg = str(e.value)
    assert msg.startswith("suite.toml [eval]: ")
    assert "no_such_task_xyz" in msg and "arc_easy," not in msg


def test_missing_local_task_still_names_fetch_command(tmp_path):
    with pytest.raises(ConfigError, match="mor-bench data benchmarks"):
        check_tasks(["hellaswag_local"], tmp_path)
    with pytest.raises(ConfigError, match="mor-bench data benchmarks"):
        check_tasks(["mor_paper_local"], tmp_path)  # not a typo of the online mor_paper


def test_typo_of_a_present_task_is_not_a_missing_download(tmp_path):
    with pytest.raises(ConfigError) as e:
        check_tasks(["mor_synthtic"], tmp_path)
    assert "did you mean mor_synthetic?" in str(e.value)
    assert "data benchmarks" not in str(e.value)
    bench = tmp_path / "benchmarks" / "tasks"
    bench.mkdir(parents=True)
    (bench / "hellaswag_local.yaml").write_text("task: hellaswag_local\n")
    check_tasks(["hellaswag_local"], tmp_path)
    with pytest.raises(ConfigError, match="did you mean hellaswag_local"):
        check_tasks(["hellaswg_local"], tmp_path)


@pytest.mark.slow
def test_offline_hub_task_is_one_line(tmp_path, good_checkpoint):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "ds"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "evals.cli.main", "eval",
                           str(good_checkpoint), "--tasks", "hellaswag", "--limit", "1",
                           "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_line_error(proc.stderr, "hellaswag", "Hugging Face Hub", "hellaswag_local",
                          "mor-bench data benchmarks")


# --- route ------------------------------------------------------------------------------------
def test_route_warns_when_text_is_truncated(capsys, tmp_path, one_thread):
    ckpt = _save(tmp_path / "short", max_seq_len=16)
    text = "The cat sat on the mat all day long."  # 36 byte tokens > 16
    rc, out, err = run_cli(capsys, "route", str(ckpt), "--text", text, "--json")
    assert rc == 0, err
    routed = json.loads(out)
    assert routed["truncated"] is True
    assert (routed["tokens_routed"], routed["tokens_total"]) == (16, len(text.encode()))
    assert len(routed["tokens"]) == 16
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "16 of 36 tokens" in lines[0]

    rc, out, err = run_cli(capsys, "route", str(ckpt), "--text", "The cat", "--json")
    assert rc == 0 and err == ""
    assert json.loads(out)["truncated"] is False


def test_route_piped_output_shows_depths(capsys, one_thread, good_checkpoint):
    rc, out, err = run_cli(capsys, "route", str(good_checkpoint), "--text", "The cat")
    assert rc == 0, err  # capsys: stdout is not a terminal
    depths = [t["depth"] for t in json.loads(
        run_cli(capsys, "route", str(good_checkpoint), "--text", "The cat", "--json")[1]
    )["tokens"]]
    expected = "".join(f"{c}[{d}]" for c, d in zip("The cat", depths))
    assert expected in out
    assert "tokens per depth:" in out


def test_render_routed_text_plain():
    routed = {"num_recursions": 2, "tokens": [{"text": "The", "depth": 2},
                                              {"text": " cat", "depth": 1}]}
    text = render_routed_text(routed, plain=True)
    assert text.startswith("The[2] cat[1]")
    assert "0: 0, 1: 1, 2: 1" in text
    assert "[" not in str(render_routed_text(routed))  # the terminal view stays coloured
