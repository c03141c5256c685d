"""Tests for budgets (`evals.training.budget`) and the training loop (`evals.training.loop`).

The golden test pins the per-step losses of 20 training steps of the micro vanilla and MoR
models to tests/golden/losses_20steps.json. Regenerate that file (after an intended change
to the models, the data pipeline or the optimizer) with

    MOR_BENCH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest \
        tests/evals/training/test_train.py -k golden
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import resource
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evals.data.corpus import iterate_batches
from evals.training.budget import Budget, TrainPlan, plan_training, wsd_lr
from evals.training.loop import TrainConfig, evaluate_nll, param_groups, peak_memory, train
from mor import ConfigError, ModelConfig, build_model
from mor.flops import flops_per_token

SEQ_LEN = 32  # the window length of the `micro_data` fixture (tests/conftest.py)
CPU = torch.device("cpu")
GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "losses_20steps.json"
UPDATE_GOLDEN = os.environ.get("MOR_BENCH_UPDATE_GOLDEN") == "1"


def _micro(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("micro", **overrides)


def _build(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg)


def _assert_close(actual, expected, name: str, **tol) -> None:
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{name}: {m}", **tol)


# --------------------------------------------------------------------------------------------
# Budget and plan_training


@pytest.mark.parametrize("kwargs", [{}, {"flops": 1e12, "tokens": 1000}, {"flops": -1.0},
                                    {"tokens": 0}, {"tokens": -5}, {"flops": 0.0},
                                    {"tokens": True}])
def test_budget_rejects_invalid(kwargs):
    with pytest.raises(ConfigError, match="budget"):
        Budget(**kwargs)


def test_budget_kind_and_value():
    assert (Budget(flops=2e13).kind, Budget(flops=2e13).value) == ("flops", 2e13)
    assert (Budget(tokens=4096).kind, Budget(tokens=4096).value) == ("tokens", 4096.0)
    assert Budget(flops=2e13).tag != Budget(tokens=int(2e13)).tag  # F vs T suffix


@pytest.mark.parametrize("family,nr", [("vanilla", 1), ("recursive", 2), ("mor", 2), ("mor", 3)])
def test_plan_flops_budget_rounds_steps_down(family, nr):
    cfg = _micro(family=family, num_recursions=nr)
    seq, batch = 32, 4
    fpt = flops_per_token(cfg, seq, "paper")
    tokens_per_step = batch * seq
    # 7.9 steps' worth of FLOPs: rounding down gives 7, rounding to nearest would give 8.
    budget = 7.9 * tokens_per_step * fpt
    plan = plan_training(cfg, Budget(flops=budget), seq, batch)
    assert isinstance(plan, TrainPlan)
    assert plan.steps == math.floor(budget / fpt / tokens_per_step) == 7
    assert plan.tokens_per_step == tokens_per_step
    assert plan.tokens == plan.steps * tokens_per_step
    assert plan.flops_per_token == fpt
    assert plan.flops_per_token_exact == flops_per_token(cfg, seq, "exact")
    assert plan.flops_used == plan.tokens * fpt
    assert plan.flops_used <= budget


def test_plan_flops_used_never_exceeds_budget():
    cfg = _micro(family="mor", num_recursions=2)
    fpt = flops_per_token(cfg, 32, "paper")
    for budget in [fpt * 128 * k + extra for k in (1, 2, 5, 13, 100)
                   for extra in (0.0, 1.0, fpt * 127, fpt * 128 - 1)]:
        plan = plan_training(cfg, Budget(flops=budget), 32, 4)
        assert plan.flops_used <= budget
        # ...and it is the largest whole number of steps that fits.
        assert (plan.steps + 1) * 128 * fpt > budget


def test_plan_tokens_budget():
    cfg = _micro()
    plan = plan_training(cfg, Budget(tokens=1000), 32, 4)  # 128 tokens per step
    assert plan.steps == 1000 // 128
    assert plan.tokens == plan.steps * 128 <= 1000
    assert plan.flops_used == plan.tokens * flops_per_token(cfg, 32, "paper")


def test_plan_grad_accum_multiplies_tokens_per_step():
    cfg = _micro()
    one = plan_training(cfg, Budget(tokens=100_000), 32, 4, grad_accum=1)
    four = plan_training(cfg, Budget(tokens=100_000), 32, 4, grad_accum=4)
    assert four.tokens_per_step == 4 * one.tokens_per_step == 4 * 4 * 32
    assert four.steps == 100_000 // four.tokens_per_step
    assert four.steps < one.steps


@pytest.mark.parametrize("kind", ["flops", "tokens"])
def test_plan_too_small_budget_names_the_amount_needed(kind):
    cfg = _micro()
    fpt = flops_per_token(cfg, 32, "paper")
    need = 4 * 32 * (fpt if kind == "flops" else 1)
    budget = Budget(flops=need * 0.99) if kind == "flops" else Budget(tokens=int(need) - 1)
    with pytest.raises(ConfigError, match="too small") as e:
        plan_training(cfg, budget, 32, 4)
    assert f"{need:.3g}" in str(e.value)
    # Exactly the amount needed is enough for one step.
    exact = Budget(flops=need) if kind == "flops" else Budget(tokens=int(need))
    assert plan_training(cfg, exact, 32, 4).steps == 1


def test_plan_rejects_seq_len_beyond_model():
    cfg = _micro()
    with pytest.raises(ConfigError, match="max_seq_len"):
        plan_training(cfg, Budget(tokens=10**6), cfg.max_seq_len + 1, 1)


@pytest.mark.parametrize("nr", [2, 3, 4])
def test_mor_gets_more_tokens_than_vanilla_at_equal_flops(nr):
    vanilla = ModelConfig.from_preset("tiny")
    mor = ModelConfig.from_preset("tiny", family="mor", num_recursions=nr)
    budget = Budget(flops=1e12)
    pv = plan_training(vanilla, budget, 128, 16)
    pm = plan_training(mor, budget, 128, 16)
    assert pm.flops_per_token < pv.flops_per_token
    assert pm.tokens > pv.tokens
    assert pm.flops_used <= 1e12 and pv.flops_used <= 1e12


# --------------------------------------------------------------------------------------------
# Learning-rate schedule


@pytest.mark.parametrize("total,warmup", [(50, 5), (100, 10), (37, 3)])
def test_wsd_lr_phases(total, warmup):
    peak = 3e-3
    lrs = [wsd_lr(s, peak_lr=peak, total_steps=total, warmup_steps=warmup)
           for s in range(total)]
    decay_steps = round(0.2 * total)
    decay_start = total - decay_steps

    ramp = lrs[:warmup]
    assert ramp[-1] == pytest.approx(peak)  # peak reached at step warmup - 1
    assert ramp[0] == pytest.approx(peak / warmup)
    assert all(b > a for a, b in zip(ramp, ramp[1:]))
    assert all(b - a == pytest.approx(peak / warmup) for a, b in zip(ramp, ramp[1:]))

    assert lrs[warmup:decay_start] == [peak] * (decay_start - warmup)

    tail = lrs[decay_start:]
    assert len(tail) == decay_steps
    assert all(b < a for a, b in zip(tail, tail[1:]))
    assert tail[0] < peak  # the decay starts below the peak
    step = peak / (decay_steps + 1)
    assert all(a - b == pytest.approx(step) for a, b in zip(tail, tail[1:]))
    assert tail[-1] == pytest.approx(step)
    assert all(0 < lr <= peak * (1 + 1e-12) for lr in lrs)


def test_wsd_lr_decays_even_with_one_decay_step():
    lrs = [wsd_lr(s, peak_lr=1.0, total_steps=7, warmup_steps=1) for s in range(7)]
    assert lrs[:6] == [1.0] * 6 and lrs[6] == pytest.approx(0.5)


def test_wsd_lr_decay_fraction():
    lrs = [wsd_lr(s, peak_lr=1.0, total_steps=100, warmup_steps=1, decay_frac=0.5)
           for s in range(100)]
    assert lrs[:50] == [1.0] * 50  # decay starts at step 50, already below the peak
    assert lrs[50] == pytest.approx(50 / 51) and lrs[99] == pytest.approx(1 / 51)
    no_decay = [wsd_lr(s, peak_lr=1.0, total_steps=20, warmup_steps=2, decay_frac=0.0)
                for s in range(2, 20)]
    assert no_decay == [1.0] * 18


# --------------------------------------------------------------------------------------------
# Weight decay groups


@pytest.mark.parametrize("family,nr", [("vanilla", 1), ("recursive", 2), ("mor", 2)])
def test_param_groups(family, nr):
    model = build_model(_micro(family=family, num_recursions=nr))
    groups = param_groups(model, 0.1)
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(g["weight_decay"] in (0.0, 0.1) for g in groups)

    listed = [id(p) for g in groups for p in g["params"]]
    named = dict(model.named_parameters())
    assert len(listed) == len(set(listed)) == len(named)  # every parameter exactly once
    assert set(listed) == {id(p) for p in named.values()}

    for name, p in named.items():
        if name == "embed.weight" or name.endswith("norm.weight"):
            assert id(p) in no_decay, name
        elif any(k in name for k in ("_proj.weight", "routers.")):
            assert id(p) in decay, name
        else:
            pytest.fail(f"parameter {name} is not covered by this test")
    assert id(model.embed.weight) in no_decay
    assert id(model.norm.weight) in no_decay
    if family == "mor":
        assert {id(p) for p in model.routers.parameters()} <= decay


# --------------------------------------------------------------------------------------------
# Gradient accumulation and the auxiliary router loss


def _accumulated_grads(model, x, y, accum: int, divide_aux: bool = True) -> dict[str, torch.Tensor]:
    """Gradients after backward over `accum` equal slices of the batch, each loss divided by
    `accum` (the training loop's rule). divide_aux=False divides only the LM loss: the
    defect of the reference code that makes the aux weight depend on `accum`."""
    model.zero_grad(set_to_none=True)
    for xs, ys in zip(x.chunk(accum), y.chunk(accum)):
        out = model(xs, ys)
        loss = out.loss / accum if divide_aux else out.lm_loss / accum + out.aux_loss
        loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_grad_accum_matches_full_batch_for_mor(micro_data):
    # A large aux weight makes the router loss a visible part of the router gradient, so
    # the test below can tell a correctly scaled aux loss from a mis-scaled one.
    model = _build(_micro(family="mor", num_recursions=2, aux_loss_coef=0.5))
    model.train()
    w = micro_data.train.windows[:4]
    x, y = w[:, :-1], w[:, 1:]
    full = _accumulated_grads(model, x, y, 1)
    halves = _accumulated_grads(model, x, y, 2)
    assert full.keys() == halves.keys()
    router_names = [n for n in full if n.startswith("routers.")]
    assert len(router_names) == 2
    for n in router_names:
        assert full[n].abs().sum() > 0
        torch.testing.assert_close(halves[n], full[n], atol=1e-6, rtol=1e-5)
    for n in full:
        _assert_close(halves[n], full[n], n, atol=1e-6, rtol=1e-5)

    # Sensitivity: an aux loss that is NOT divided by the accumulation count changes the
    # router gradients beyond the tolerance used above.
    wrong = _accumulated_grads(model, x, y, 2, divide_aux=False)
    assert any(not torch.allclose(wrong[n], full[n], atol=1e-6, rtol=1e-5)
               for n in router_names)


def _first_step_grads(monkeypatch, micro_data, batch_size: int, grad_accum: int):
    """Run `evals.training.loop.train` for one step and capture the gradients the optimizer sees."""
    captured: list[dict[int, torch.Tensor]] = []

    class CapturingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            captured.append({id(p): p.grad.detach().clone() for g in self.param_groups
                             for p in g["params"] if p.grad is not None})
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", CapturingAdamW)
    cfg = _micro(family="mor", num_recursions=2, aux_loss_coef=0.5)
    model = _build(cfg)
    w = micro_data.train.windows[:4]
    batches = iter([(s[:, :-1], s[:, 1:]) for s in w.split(batch_size)])
    tcfg = TrainConfig(batch_size=batch_size, grad_accum=grad_accum, lr=1e-3, device="cpu")
    plan = plan_training(cfg, Budget(tokens=4 * SEQ_LEN), SEQ_LEN, batch_size, grad_accum)
    assert plan.steps == 1
    train(model, batches, plan, tcfg, warmup_steps=1, device=CPU)
    assert len(captured) == 1
    return {n: captured[0][id(p)] for n, p in model.named_parameters()}


def test_train_loop_accumulation_matches_full_batch(monkeypatch, micro_data):
    full = _first_step_grads(monkeypatch, micro_data, batch_size=4, grad_accum=1)
    accum = _first_step_grads(monkeypatch, micro_data, batch_size=2, grad_accum=2)
    for n in full:
        _assert_close(accum[n], full[n], n, atol=1e-6, rtol=1e-5)


def test_train_with_grad_accum_runs(micro_data):
    cfg = _micro(family="mor", num_recursions=2)
    model = _build(cfg)
    plan = plan_training(cfg, Budget(tokens=2 * 2 * 4 * SEQ_LEN), SEQ_LEN, 4, grad_accum=2)
    assert plan.steps == 2
    tcfg = TrainConfig(batch_size=4, grad_accum=2, log_every=1, device="cpu")
    result = train(model, iterate_batches(micro_data.train.windows, 4, seed=0), plan, tcfg,
                   warmup_steps=1, device=CPU)
    assert result.steps == 2
    assert result.tokens == 2 * plan.tokens_per_step == 2 * 2 * 4 * SEQ_LEN
    assert [c["step"] for c in result.loss_curve] == [1, 2]
    assert [c["tokens"] for c in result.loss_curve] == [plan.tokens_per_step,
                                                       2 * plan.tokens_per_step]
    assert all(math.isfinite(c["loss"]) for c in result.loss_curve)
    assert result.final_train_loss == result.loss_curve[-1]["loss"]
    assert result.tokens_per_s > 0 and result.peak_mem_bytes > 0
    assert set(result.routing) >= {"selected_frac/r1", "selected_frac/r2"}


def test_train_log_every_and_nan_guard(micro_data):
    cfg = _micro()
    model = _build(cfg)
    plan = plan_training(cfg, Budget(tokens=7 * 4 * SEQ_LEN), SEQ_LEN, 4)
    tcfg = TrainConfig(batch_size=4, log_every=3, device="cpu")
    seen = []
    result = train(model, iterate_batches(micro_data.train.windows, 4, seed=0), plan, tcfg,
                   warmup_steps=1, device=CPU, on_step=lambda s, loss, lr: seen.append(s))
    # Logged every 3 steps (0-based 0, 3, 6) and always at the last step.
    assert [c["step"] for c in result.loss_curve] == [1, 4, 7]
    assert seen == list(range(7))

    with torch.no_grad():
        model.embed.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="learning rate"):
        train(model, iterate_batches(micro_data.train.windows, 4, seed=0), plan, tcfg,
              warmup_steps=1, device=CPU)


# --------------------------------------------------------------------------------------------
# Golden losses


GOLDEN_STEPS, GOLDEN_BATCH, GOLDEN_WARMUP, GOLDEN_LR = 20, 4, 2, 3e-3
GOLDEN_MODELS = {"vanilla": {"family": "vanilla"},
                 "mor-2": {"family": "mor", "num_recursions": 2}}
GOLDEN_SETTINGS = {
    "preset": "micro", "models": GOLDEN_MODELS, "corpus": "synthetic",
    "synthetic_docs": 200, "tokenizer": "bytes", "seq_len": SEQ_LEN,
    "batch_size": GOLDEN_BATCH, "steps": GOLDEN_STEPS, "warmup_steps": GOLDEN_WARMUP,
    "lr": GOLDEN_LR, "seed": 0,
}


def _golden_losses(name: str, micro_data) -> list[float]:
    spec = micro_data.spec
    assert (spec.corpus, spec.tokenizer, spec.seq_len, spec.synthetic_docs, spec.seed) == (
        GOLDEN_SETTINGS["corpus"], GOLDEN_SETTINGS["tokenizer"], SEQ_LEN,
        GOLDEN_SETTINGS["synthetic_docs"], GOLDEN_SETTINGS["seed"])
    cfg = _micro(**GOLDEN_MODELS[name])
    model = _build(cfg, seed=0)
    plan = plan_training(cfg, Budget(tokens=GOLDEN_STEPS * GOLDEN_BATCH * SEQ_LEN), SEQ_LEN,
                         GOLDEN_BATCH)
    assert plan.steps == GOLDEN_STEPS
    tcfg = TrainConfig(batch_size=GOLDEN_BATCH, lr=GOLDEN_LR, log_every=1, device="cpu")
    result = train(model, iterate_batches(micro_data.train.windows, GOLDEN_BATCH, seed=0),
                   plan, tcfg, warmup_steps=GOLDEN_WARMUP, device=CPU)
    assert [c["step"] for c in result.loss_curve] == list(range(1, GOLDEN_STEPS + 1))
    return [c["loss"] for c in result.loss_curve]


def test_golden_losses(micro_data, one_thread):
    losses = {name: _golden_losses(name, micro_data) for name in GOLDEN_MODELS}
    if UPDATE_GOLDEN:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({
            "about": "per-step training losses of "
                     "tests/evals/training/test_train.py::test_golden_losses; "
                     "regenerate with MOR_BENCH_UPDATE_GOLDEN=1",
            "torch": torch.__version__, "settings": GOLDEN_SETTINGS, "losses": losses,
        }, indent=2) + "\n")
    assert GOLDEN.is_file(), f"{GOLDEN} is missing; run with MOR_BENCH_UPDATE_GOLDEN=1"
    golden = json.loads(GOLDEN.read_text())
    assert golden["settings"] == json.loads(json.dumps(GOLDEN_SETTINGS)), (
        "the golden file was made with other settings; regenerate it")
    assert set(golden["losses"]) == set(GOLDEN_MODELS)
    for name, expected in golden["losses"].items():
        assert len(losses[name]) == len(expected) == GOLDEN_STEPS
        # rtol 2e-4: BLAS kernels on different CPUs (AVX2 vs AVX-512, other vendors) sum
        # fp32 products in different orders; over 20 AdamW steps those rounding differences
        # grow to ~1e-5 relative in the loss. Any real change to the model, the data or the
        # optimizer moves the losses by far more than 2e-4.
        _assert_close(torch.tensor(losses[name], dtype=torch.float64),
                      torch.tensor(expected, dtype=torch.float64), name, rtol=2e-4, atol=0.0)
    # The models learn something in 20 steps (guards against a golden file of garbage).
    for name, curve in losses.items():
        assert curve[-1] < curve[0] - 0.5, name


def test_training_is_bit_identical_in_process(micro_data, one_thread):
    for name in GOLDEN_MODELS:
        assert _golden_losses(name, micro_data) == _golden_losses(name, micro_data), name


# --------------------------------------------------------------------------------------------
# Validation NLL


def test_evaluate_nll_vanilla(micro_data):
    model = _build(_micro())
    windows = micro_data.val.windows[:6]  # 6 windows in batches of 4: one partial batch
    model.train()
    res = evaluate_nll(model, windows, batch_size=4, device=CPU)
    assert math.isfinite(res["val_nll"])
    assert res["val_tokens"] == 6 * SEQ_LEN
    assert model.training  # evaluation restores the mode it found...
    model.eval()
    evaluate_nll(model, windows, batch_size=4, device=CPU)
    assert not model.training  # ...eval mode included
    # The token-weighted mean over batches equals the mean over all windows at once.
    with torch.no_grad():
        whole = model(windows[:, :-1], windows[:, 1:]).lm_loss.item()
    assert res["val_nll"] == pytest.approx(whole, rel=1e-5)
    assert not any(k.startswith("val_selected_frac") for k in res)


def test_evaluate_nll_mor_has_routing_stats(micro_data):
    cfg = _micro(family="mor", num_recursions=2)
    model = _build(cfg)
    windows = micro_data.val.windows[:5]
    res = evaluate_nll(model, windows, batch_size=2, device=CPU)
    assert math.isfinite(res["val_nll"])
    assert res["val_tokens"] == 5 * SEQ_LEN
    for r, cap in enumerate(cfg.step_capacities, 1):
        assert res[f"val_selected_frac/r{r}"] == pytest.approx(
            max(1, math.floor(cap * SEQ_LEN)) / SEQ_LEN)
        assert 0 < res[f"val_gate_mean/r{r}"] < cfg.router_alpha


# --------------------------------------------------------------------------------------------
# peak memory

MB = 2**20
ON_LINUX = sys.platform.startswith("linux") and Path("/proc/self/status").is_file()
needs_proc = pytest.mark.skipif(not ON_LINUX, reason="the CPU peak is VmHWM from "
                                "/proc/self/status, which only Linux provides")


def _proc_status(field: str) -> int:
    """A memory field of /proc/self/status (VmHWM, VmRSS) in bytes, read independently."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            kb, unit = line.split()[1:3]
            assert unit == "kB"
            return int(kb) * 1024
    raise AssertionError(f"no {field} line in /proc/self/status")


def _vm_hwm() -> int:
    return _proc_status("VmHWM")


@needs_proc
def test_cpu_peak_memory_is_this_process_peak():
    rss_before = _proc_status("VmRSS")
    big = np.ones(100 * MB // 8)  # 100 MB on top of what is resident now, pages touched
    try:
        peak, kind = peak_memory(CPU)
        hwm_after = _vm_hwm()
    finally:
        del big
    assert kind == "process_peak_rss"
    assert rss_before + 95 * MB <= peak <= hwm_after


@needs_proc
def test_cpu_peak_memory_is_per_process():
    """A run process started with "spawn" (as the runner starts them) reports its own peak,
    not the peak its parent reached before starting it (ru_maxrss would: Linux carries it
    over fork and exec)."""
    big = np.ones(400 * MB // 8)  # 400 MB, touched
    try:
        parent_hwm = _vm_hwm()
        assert parent_hwm >= 400 * MB
        with mp.get_context("spawn").Pool(1) as pool:
            child_peak, child_kind = pool.apply(peak_memory, (CPU,))
    finally:
        del big
    assert child_kind == "process_peak_rss"
    assert 0 < child_peak < parent_hwm - 300 * MB, (child_peak / MB, parent_hwm / MB)


def test_cpu_peak_memory_falls_back_to_max_rss(monkeypatch):
    import evals.training.loop

    class NoProc(type(Path())):
        def read_text(self, *args, **kwargs):
            raise OSError("no /proc here")

    monkeypatch.setattr(evals.training.loop, "Path", NoProc)
    peak, kind = peak_memory(CPU)
    assert kind == "process_max_rss"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak == (rss if sys.platform == "darwin" else rss * 1024)


@needs_proc
def test_train_records_cpu_peak_kind(micro_data, one_thread):
    cfg = _micro()
    plan = plan_training(cfg, Budget(tokens=2 * 4 * SEQ_LEN), SEQ_LEN, 4)
    res = train(_build(cfg), iterate_batches(micro_data.train.windows, 4, seed=0), plan,
                TrainConfig(batch_size=4), warmup_steps=1, device=CPU)
    assert res.peak_mem_kind == "process_peak_rss"
    assert 0 < res.peak_mem_bytes <= _vm_hwm()
