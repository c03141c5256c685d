"""The training-speed comparison with Hugging Face Llama (benchmarks/train_vs_hf.py) and the
fused eager functions of mor/layers.py it measures.

Correctness only, no timing: the benchmark's weight mapping gives HF the same model (equal
losses and gradients), the script runs end to end, and the fused functions (RMSNorm, fused
QKV + RoPE, the transposed SwiGLU MLP, the fused head + cross-entropy) agree with the plain
formulas (`mor.layers.FUSED = False`) in value and gradient for every family."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mor.layers
from baselines.vanilla import to_hf_state_dict
from mor import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "train_vs_hf.py"


def _bench():
    spec = importlib.util.spec_from_file_location("train_vs_hf", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _batch(cfg: ModelConfig, b: int = 3, t: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=g)
    return w[:, :-1], w[:, 1:]


# --- the benchmark's weight mapping: the same model in HF ------------------------------------
def test_hf_copy_has_equal_losses_and_gradients():
    pytest.importorskip("transformers")
    bench = _bench()
    cfg = ModelConfig.from_preset("micro", family="vanilla")
    ours, hf = bench.build_pair(cfg, seed=0)
    with torch.no_grad():  # perturbed norms: a swapped or ignored norm weight would show
        g = torch.Generator().manual_seed(2)
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        hf.load_state_dict({k: v.clone() for k, v in to_hf_state_dict(ours.state_dict()).items()
                            if k != "lm_head.weight"}, strict=False)
    assert ours.training and hf.training
    assert hf.config._attn_implementation == "sdpa"
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    adapter = bench.HFTrainAdapter(hf)
    x, y = _batch(cfg)
    y = y.clone()
    y[0, :5] = -100  # ignored targets count alike in both losses
    lo, lh = ours(x, y).loss, adapter(x, y).loss
    assert abs(lo.item() - lh.item()) <= 1e-5
    lo.backward()
    lh.backward()
    ours_grads = to_hf_state_dict({n: p.grad for n, p in ours.named_parameters()})
    hf_params = dict(hf.named_parameters())
    assert set(hf_params) == set(ours_grads) - {"lm_head.weight"}
    for name, p in hf_params.items():
        torch.testing.assert_close(ours_grads[name], p.grad, atol=1e-5, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_hf_adapter_gets_the_loops_parameter_groups():
    pytest.importorskip("transformers")
    from evals.training.loop import param_groups

    bench = _bench()
    ours, hf = bench.build_pair(ModelConfig.from_preset("micro", family="vanilla"))
    adapter = bench.HFTrainAdapter(hf)
    bench.check_optimizer_groups(ours, adapter, 0.1)  # raises if they differ
    decay, no_decay = param_groups(adapter, 0.1)
    assert hf.model.embed_tokens.weight in no_decay["params"]
    assert all(p.ndim == 2 for p in decay["params"]) and len(decay["params"]) == 7 * 6


def test_benchmark_runs_end_to_end_and_gates_on_the_target():
    pytest.importorskip("transformers")
    args = [sys.executable, str(SCRIPT), "--preset", "micro", "--rounds", "1", "--steps",
            "1", "--warmup", "1", "--batch-size", "4", "--seq-len", "32", "--json"]
    res = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode in (0, 1), res.stderr
    out = json.loads(res.stdout)
    assert math.isfinite(out["ratio"]) and out["ratio"] > 0
    assert out["first_loss"]["abs_diff"] <= 1e-5
    assert out["hf_attn_implementation"] == "sdpa"
    assert out["tokens_per_step"] == 4 * 32
    assert out["passed"] == (out["ratio"] >= 1.3) == (res.returncode == 0)
    gate = subprocess.run(args + ["--target", "1e9"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert gate.returncode == 1 and json.loads(gate.stdout)["passed"] is False


# --- the fused functions agree with the plain formulas ----------------------------------------
FAMILIES = {
    "vanilla": dict(family="vanilla"),
    "recursive": dict(family="recursive", num_recursions=2),
    "mor-expert": dict(family="mor", num_recursions=3),
    "mor-kv-share": dict(family="mor", num_recursions=3, kv="share"),
    "mor-token": dict(family="mor", num_recursions=2, router="token"),
}


def _loss_and_grads(model, x, y, fused: bool, monkeypatch, **kw):
    monkeypatch.setattr(mor.layers, "FUSED", fused)
    model.zero_grad(set_to_none=True)
    out = model(x, y, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fused_training_forward_matches_the_plain_formulas(name, monkeypatch):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("micro", **FAMILIES[name])).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    x, y = _batch(model.cfg, t=48)
    y = y.clone()
    y[1, -7:] = -100
    kw = {"step": 3} if model.cfg.family == "mor" else {}
    plain, g_plain = _loss_and_grads(model, x, y, False, monkeypatch, **kw)
    fused, g_fused = _loss_and_grads(model, x, y, True, monkeypatch, **kw)
    torch.testing.assert_close(fused.logits, plain.logits, atol=2e-5, rtol=0)
    torch.testing.assert_close(fused.loss, plain.loss, atol=2e-6, rtol=0)
    assert g_fused.keys() == g_plain.keys()
    for n in g_plain:
        torch.testing.assert_close(g_fused[n], g_plain[n], atol=2e-6, rtol=1e-4,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_fused_head_loss_matches_cross_entropy_with_a_gradient_through_logits():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)  # 300 rows: several row blocks on CPU
    t = torch.randint(0, 300, (37,))
    t[[0, 5, 36]] = -100
    extra = torch.randn(37, 300)

    def run(fused: bool):
        h.grad = w.grad = None
        if fused:
            logits, loss = mor.layers.head_and_loss(h, w, t)
        else:
            logits = F.linear(h, w)
            loss = F.cross_entropy(logits, t, ignore_index=-100)
        (0.5 * loss + (logits * extra).mean()).backward()  # both outputs carry gradient
        return logits.detach(), loss.detach(), h.grad.clone(), w.grad.clone()

    old = mor.layers._HeadLossFn.BLOCK_BYTES
    mor.layers._HeadLossFn.BLOCK_BYTES = 8 * 4 * 300  # 8-row blocks: the last one partial
    try:
        got = run(True)
    finally:
        mor.layers._HeadLossFn.BLOCK_BYTES = old
    for a, b in zip(got, run(False)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_paths_under_cpu_autocast_match_the_plain_ones(monkeypatch):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("micro", family="vanilla")).train()
    x, y = _batch(model.cfg)
    res = {}
    for fused in (False, True):
        monkeypatch.setattr(mor.layers, "FUSED", fused)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, y)
        out.loss.backward()
        res[fused] = (out.logits.dtype, out.loss.detach(), model.embed.weight.grad.clone(),
                      model.layers[2].mlp.up_proj.weight.grad.clone())
    assert res[True][0] == res[False][0] == torch.bfloat16
    torch.testing.assert_close(res[True][1], res[False][1], atol=2e-2, rtol=0)
    for a, b in zip(res[True][2:], res[False][2:]):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=3e-2 * b.abs().max().item(), rtol=0)


def test_hooks_on_projections_see_the_plain_calls():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("micro", family="vanilla")).train()
    x, y = _batch(model.cfg)
    fused = model(x, y).loss
    seen = []
    handle = model.layers[1].attn.k_proj.register_forward_hook(
        lambda m, i, o: seen.append(i[0].shape))
    try:
        hooked = model(x, y).loss
    finally:
        handle.remove()
    assert seen == [torch.Size([x.shape[0], x.shape[1], model.cfg.d_model])]
    torch.testing.assert_close(hooked, fused, atol=1e-6, rtol=0)
