"""The training-speed benchmark (evals/perf/train_speed.py): `interleaved_train_speed`, the
side-by-side measurement suites and `mor-bench bench-train` share, timing the training
loop's own optimizer step (`evals.training.loop.TrainStep`)."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest
import torch

import evals.perf.train_speed as train_speed
from evals.perf.train_speed import bench_variants, interleaved_train_speed
from evals.training.loop import TrainConfig, TrainStep
from mor import ModelConfig, build_model
from mor.errors import ConfigError
from tests.import_graph import imports_of, project_modules

SEQ_LEN = 32


def _models(**mor) -> dict[str, torch.nn.Module]:
    out = {}
    for name, kw in {"vanilla": {"family": "vanilla"},
                     "mor-2": {"family": "mor", "num_recursions": 2, **mor}}.items():
        torch.manual_seed(0)
        out[name] = build_model(ModelConfig.from_preset("micro", **kw))
    return out


def _windows(n: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 257, (n, seq_len + 1), generator=g)


@pytest.fixture
def step_spy(monkeypatch):
    """Records (model, step, number of micro-batches, timed?) for every TrainStep call."""
    calls: list[tuple[torch.nn.Module, int, int, bool]] = []
    call, timed = TrainStep.__call__, TrainStep.timed
    in_timed = []

    def spy_call(self, step, micro):
        calls.append((self.model, step, len(micro), bool(in_timed)))
        return call(self, step, micro)

    def spy_timed(self, step, micro):
        in_timed.append(1)
        try:
            return timed(self, step, micro)
        finally:
            in_timed.pop()

    monkeypatch.setattr(TrainStep, "__call__", spy_call)
    monkeypatch.setattr(TrainStep, "timed", spy_timed)
    return calls


def test_interleaved_rows_ratios_and_equal_steps(step_spy, one_thread):
    models = _models()
    tcfg = TrainConfig(batch_size=2, grad_accum=2, device="cpu")
    res = interleaved_train_speed(models, _windows(6), tcfg, rounds=3, steps_per_round=2,
                                  warmup_steps=1, reference="vanilla")
    assert (res["rounds"], res["steps_per_round"], res["reference"]) == (3, 2, "vanilla")
    assert res["tokens_per_step"] == 2 * 2 * SEQ_LEN
    assert set(res["rows"]) == set(models)
    for row in res["rows"].values():
        assert len(row["round_s"]) == 3 and all(t > 0 for t in row["round_s"])
        assert row["step_s"] == pytest.approx(statistics.median(row["round_s"]) / 2)
        assert row["tokens_per_s"] == pytest.approx(res["tokens_per_step"] / row["step_s"])
        ref_s = res["rows"]["vanilla"]["round_s"]
        assert row["rel_tokens_per_s"] == pytest.approx(statistics.median(
            a / b for a, b in zip(ref_s, row["round_s"], strict=True)))
    assert res["rows"]["vanilla"]["rel_tokens_per_s"] == 1.0

    # Every model: 1 untimed + 3 x 2 timed steps of the loop's TrainStep, each over
    # grad_accum micro-batches, steps numbered 0.. in order; rounds alternate the models.
    for name, model in models.items():
        mine = [c for c in step_spy if c[0] is model]
        assert [c[1] for c in mine] == list(range(7)), name
        assert all(c[2] == 2 for c in mine), name
        assert [c[3] for c in mine] == [False] + [True] * 6, name
    order = [next(n for n, m in models.items() if m is c[0]) for c in step_spy if c[3]]
    assert order == ["vanilla"] * 2 + ["mor-2"] * 2 + ["vanilla"] * 2 + ["mor-2"] * 2 + \
        ["vanilla"] * 2 + ["mor-2"] * 2


def test_interleaved_without_reference_and_bad_arguments(one_thread):
    tcfg = TrainConfig(batch_size=2, device="cpu")
    res = interleaved_train_speed(_models(), _windows(2), tcfg, rounds=1, steps_per_round=1,
                                  warmup_steps=0)
    assert res["reference"] is None
    assert all(r["rel_tokens_per_s"] is None for r in res["rows"].values())
    with pytest.raises(ConfigError, match="reference 'nope'"):
        interleaved_train_speed(_models(), _windows(2), tcfg, reference="nope")
    with pytest.raises(ConfigError, match="rounds"):
        interleaved_train_speed(_models(), _windows(2), tcfg, rounds=0)


def test_bench_train_times_the_loops_train_step(step_spy, monkeypatch, one_thread):
    monkeypatch.setattr(train_speed, "measure_matmul_peak", lambda device: 1e9)
    res = bench_variants("micro", "mor", 2, [{}, {"kv": "share"}], seq_len=SEQ_LEN,
                         batch_size=2, grad_accum=3, steps=4, warmup=2, device="cpu")
    timed = [c for c in step_spy if c[3]]
    models = {id(c[0]) for c in step_spy}
    assert len(models) == 2
    for m in models:  # 2 untimed + 4 timed loop steps each, 3 micro-batches per step
        assert [c[3] for c in step_spy if id(c[0]) == m] == [False] * 2 + [True] * 4
    assert len(timed) == 8 and all(c[2] == 3 for c in step_spy)
    assert [r["variant"] for r in res["variants"]] == ["default", "kv=share"]
    for row in res["variants"]:
        assert len(row["step_times_s"]) == 4
        assert row["tokens_per_s"] == pytest.approx(3 * 2 * SEQ_LEN / row["median_step_s"])
        assert row["rel_tokens_per_s"] == pytest.approx(1 / row["step_time_ratio"])
    assert res["variants"][0]["rel_tokens_per_s"] == 1.0


def _ratio(rounds: int, steps: int) -> float:
    tcfg = TrainConfig(batch_size=4, device="cpu")
    res = interleaved_train_speed(_models(), _windows(8), tcfg, rounds=rounds,
                                  steps_per_round=steps, warmup_steps=2, reference="vanilla")
    return res["rows"]["mor-2"]["rel_tokens_per_s"]


def test_ratio_holds_under_a_cpu_busy_loop(one_thread):
    rounds, steps = 9, 3
    quiet = _ratio(rounds, steps)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = _ratio(rounds, steps)
        assert hog.poll() is None, "the busy loop ended before the measurement did"
    finally:
        hog.kill()
        hog.wait()
    assert loaded == pytest.approx(quiet, rel=0.25), (quiet, loaded)


def test_perf_imports_stay_below_the_suite_runner_and_cli():
    # evals.lmeval shares perf's layer (the sweep scores few-shot tasks through it); it
    # never imports evals.perf, so no cycle (tests/test_layering.py checks both).
    allowed = ("evals.perf", "evals.lmeval", "evals.suite.spec", "evals.suite.record",
               "evals.training", "evals.data", "mor")
    modules = project_modules()
    perf = {m: p for m, p in modules.items() if m.startswith("evals.perf")}
    assert "evals.perf.train_speed" in perf and "evals.perf.generation" in perf
    bad = {m: sorted(i for i in imports_of(m, p, modules)
                     if not any(i == a or i.startswith(a + ".") for a in allowed))
           for m, p in perf.items()}
    assert not any(bad.values()), bad
