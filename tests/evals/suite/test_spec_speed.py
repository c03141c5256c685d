"""The suite's [speed] table and the speed phase's choice of reference runs."""

from __future__ import annotations

import pytest

from evals.suite.phases import speed_references
from evals.suite.spec import SpeedSettings, load_suite, parse_suite
from mor.errors import ConfigError
from tests.conftest import MICRO_SUITE


def test_speed_table_is_optional_and_defaults():
    assert parse_suite(MICRO_SUITE, "t.toml").speed is None
    suite = parse_suite(MICRO_SUITE + "\n[speed]\n", "t.toml")
    assert suite.speed == SpeedSettings(rounds=3, steps_per_round=3, warmup_steps=1)
    suite = parse_suite(MICRO_SUITE + "\n[speed]\nrounds = 5\nwarmup_steps = 0\n", "t.toml")
    assert (suite.speed.rounds, suite.speed.steps_per_round, suite.speed.warmup_steps) == (
        5, 3, 0)


@pytest.mark.parametrize("table,needles", [
    ("rounds = 0", ["t.toml: [speed]", "'rounds'", ">= 1", "0"]),
    ("steps_per_round = 1.5", ["t.toml: [speed]", "'steps_per_round'"]),
    ("warmup_steps = -1", ["t.toml: [speed]", "'warmup_steps'", ">= 0"]),
    ("rounds = true", ["t.toml: [speed]", "'rounds'"]),
    ("repeats = 3", ["t.toml: [speed]", "unknown speed setting", "'repeats'", "rounds"]),
])
def test_bad_speed_table(table, needles):
    with pytest.raises(ConfigError) as e:
        parse_suite(MICRO_SUITE + f"\n[speed]\n{table}\n", "t.toml")
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_speed_must_be_a_table():
    text = MICRO_SUITE.replace('seeds = [0]', 'seeds = [0]\nspeed = 3')
    with pytest.raises(ConfigError, match=r"\[speed\] must be a table"):
        parse_suite(text, "t.toml")


@pytest.mark.parametrize("name", ["smoke", "infer-cpu"])
def test_builtin_suites_measure_training_speed(name):
    speed = load_suite(name).speed
    assert isinstance(speed, SpeedSettings)
    assert speed.rounds >= 3 and speed.steps_per_round >= 3  # a median of enough rounds


def test_speed_reference_is_the_vanilla_run_of_the_same_seed():
    recs = [{"run_id": "mor-s0", "family": "mor", "seed": 0},
            {"run_id": "mor-s1", "family": "mor", "seed": 1},
            {"run_id": "mor-s2", "family": "mor", "seed": 2},
            {"run_id": "vanilla-s0", "family": "vanilla", "seed": 0},
            {"run_id": "vanilla-s1", "family": "vanilla", "seed": 1}]
    assert speed_references(recs) == {
        "mor-s0": "vanilla-s0", "mor-s1": "vanilla-s1",
        "mor-s2": "vanilla-s0",  # no vanilla of seed 2: the first vanilla run
        "vanilla-s0": "vanilla-s0", "vanilla-s1": "vanilla-s1"}
    assert speed_references([r for r in recs if r["family"] == "mor"]) == {
        "mor-s0": None, "mor-s1": None, "mor-s2": None}


def test_a_failed_speed_phase_keeps_the_records_and_leaves_its_error(tmp_path):
    import dataclasses
    import shutil
    from pathlib import Path

    from evals.suite.phases import error_file, run_phase
    from evals.training.loop import TrainConfig

    run_dir = tmp_path / "run"
    shutil.copytree(Path(__file__).resolve().parents[2] / "fixtures" / "records", run_dir)
    before = {p: p.read_text() for p in run_dir.rglob("record.json")}
    lines: list[str] = []
    # The fixture records have no checkpoints: loading the first one fails.
    ok = run_phase("speed", run_dir, (SpeedSettings(), dataclasses.asdict(TrainConfig())),
                   on_log=lines.append)
    assert ok is False
    err = error_file(run_dir, "speed").read_text()
    assert "Traceback" in err and "load_checkpoint" in err
    assert {p: p.read_text() for p in run_dir.rglob("record.json")} == before
    assert not (run_dir / "speed.json").exists()
    with pytest.raises(ValueError, match="unknown phase"):
        run_phase("warmup", run_dir, ())
