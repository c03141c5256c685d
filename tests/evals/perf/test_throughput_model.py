"""The analytic throughput model (evals/perf/throughput_model.py): byte and FLOP counts against
hand counts, call counts against what the engine really issues (a TorchDispatchMode), and the
device profiles and projection."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from evals.perf.throughput_model import (
    DEVICE_PROFILES,
    OPS,
    Workload,
    calibrate_cpu,
    engine_ops,
    ops_diff,
    project,
    roofline_card,
    simulate,
)
from mor import ModelConfig, build_model
from mor.decode import Engine, Request

# A tiny shape for hand counts: d=16, 2 query heads, 1 KV head, head_dim 8, d_ff 24, V 32.
TINY = dict(vocab_size=32, d_model=16, n_heads=2, n_kv_heads=1, d_ff=24, max_seq_len=16)
E = 4  # fp32
LAYER = 16 * (2 + 2 * 1) * 8 + 16 * 16 + 16 * 2 * 24 + 24 * 16  # qkv, o, gate/up, down
NORMS = 2 * 16
HEAD = 32 * 16 + 16  # tied output matrix + final norm
KV_TOKEN = 2 * 1 * 8 * E  # K and V of one token in one layer


def test_vanilla_bytes_and_flops_equal_a_hand_count() -> None:
    cfg = ModelConfig(n_layers=2, family="vanilla", **TINY)
    c = simulate(cfg, Workload([3], temperature=0.0), "sequence", 1)
    assert c.iterations == 3 and c.tokens == 3
    # Every iteration reads both layers and the head once.
    assert c.weight_total == 3 * (2 * (LAYER + NORMS) + HEAD) * E
    # Token t attends over t + 1 keys in each of the 2 layers, and stores one.
    assert c.kv_read_bytes == (1 + 2 + 3) * 2 * KV_TOKEN
    assert c.kv_read_ideal_bytes == c.kv_read_bytes
    assert c.kv_write_bytes == 3 * 2 * KV_TOKEN
    # 2 x params of every matmul per token, QK^T and AV over the keys, the head.
    assert c.flops_linear == 3 * 2 * 2 * LAYER
    assert c.flops_attention == 2 * 4 * (1 + 2 + 3) * 2 * 8
    assert c.flops_head == 3 * 2 * 16 * 32


@pytest.mark.parametrize("scheduler", ["sequence", "depth"])
@pytest.mark.parametrize("kv", ["cache", "share"])
def test_mor_bytes_follow_the_depth_trace(scheduler: str, kv: str) -> None:
    # 1 + 1 + 1 layers, N_r = 2; tokens take 2, 1, 2 recursion steps.
    cfg = ModelConfig(n_layers=4, family="mor", num_recursions=2, kv=kv, **TINY)
    c = simulate(cfg, Workload([3], depths=[[2, 1, 2]], temperature=0.0,
                               kv_capacity="full"), scheduler, 1)
    assert c.tokens == 3 and c.depth_sum == 5
    wb = c.weight_bytes
    assert wb["first"] == 3 * (LAYER + NORMS) * E
    assert wb["last"] == 3 * (LAYER + NORMS + HEAD) * E
    if kv == "cache":
        assert wb["shared"] == 5 * (LAYER + NORMS) * E
        # first and last layer: widths 1, 2, 3; step 1: tokens 0, 1, 2 (1, 2, 3); step 2:
        # tokens 0 and 2 only (1, 2).
        assert c.kv_read_bytes == (6 + 6 + 6 + 3) * KV_TOKEN
        assert c.kv_write_bytes == (3 + 3 + 3 + 2) * KV_TOKEN
    else:
        # Step 2 computes no K/V projection and reads step 1's entry (tokens 0 and 2
        # see 1 and 3 keys); it stores nothing.
        no_kv = LAYER - 16 * 2 * 8
        assert wb["shared"] == (3 * (LAYER + NORMS) + 2 * (no_kv + NORMS)) * E
        assert c.kv_read_bytes == (6 + 6 + 6 + 4) * KV_TOKEN
        assert c.kv_write_bytes == (3 + 3 + 3) * KV_TOKEN
    steps = 5 * (LAYER if kv == "cache" else 0) + (3 * LAYER + 2 * (LAYER - 256)
                                                     if kv == "share" else 0)
    routers = c.flops_linear - 2 * (3 * LAYER + steps + 3 * LAYER)
    assert routers > 0  # expert-choice routers on every decision


def _requests(lengths, seed0: int = 0) -> list[Request]:
    return [Request(prompt=[1], max_new_tokens=n, id=k, seed=seed0 + k)
            for k, n in enumerate(lengths)]


CASES = {
    "vanilla": (dict(family="vanilla"), ["sequence"]),
    "expert": (dict(family="mor", num_recursions=3), ["sequence", "depth"]),
    "token": (dict(family="mor", num_recursions=2, router="token"), ["sequence", "depth"]),
    "share": (dict(family="mor", num_recursions=3, kv="share"), ["sequence", "depth"]),
    "aux-mlp": (dict(family="mor", num_recursions=2, expert_aux="router", router_arch="mlp"),
                ["depth"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_call_counts_equal_what_the_engine_issues(case: str) -> None:
    kw, schedulers = CASES[case]
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("micro", **kw)
    model = build_model(cfg).eval()
    lengths = [1, 5, 3, 6, 2, 4, 7]
    for scheduler in schedulers:
        for temperature, batch in ((1.0, 3), (0.0, 7)):
            engine = Engine(model, max_batch=batch, max_len=max(lengths) + 1,
                            temperature=temperature)
            ops, outs, shapes = engine_ops(engine, _requests(lengths), scheduler,
                                           shapes=True)
            wl = Workload.from_completions(outs, max_len=max(lengths) + 1,
                                           temperature=temperature)
            c = simulate(cfg, wl, scheduler, batch)
            where = f"{case}, {scheduler}, batch {batch}, temperature {temperature}"
            diff = ops_diff(ops, c.aten_ops())
            assert not diff, f"{where}:\n{diff}"
            for key in ("iterations", "passes", "shared_calls", "shared_items"):
                got = c.iterations if key == "iterations" else c.stats[key]
                assert got == engine.stats[key], (where, key)
            # The same matmul shapes and attention (rows, width): the byte and FLOP counts
            # rest on these.
            assert shapes["linear"] == c.linear_shapes, where
            assert shapes["attention"] == Counter((m, w) for m, w, _, _ in c.sdpa), where


def test_ops_diff_names_the_pieces_to_update() -> None:
    assert ops_diff(Counter(mul=3), Counter(mul=3)) == ""
    text = ops_diff(Counter(mul=3, roll=2), Counter(mul=4))
    assert "mul" in text and "(+1)" in text and "layer.qkv" in text
    assert "roll" in text and "(-2)" in text


def _mor(nr: int = 3, **kw) -> ModelConfig:
    return ModelConfig.from_preset("micro", family="mor", num_recursions=nr, **kw)


@pytest.mark.parametrize("scheduler", ["sequence", "depth"])
def test_more_depth_costs_more(scheduler: str) -> None:
    cfg = _mor()
    lengths = [12, 9, 15, 7, 11, 14]
    runs = [simulate(cfg, Workload.from_lengths(lengths, cfg, mean_depth=md, seed=1,
                                                kv_capacity="full"), scheduler, 3)
            for md in (1.0, 2.0, 3.0)]
    for lo, hi in zip(runs, runs[1:]):
        assert hi.depth_sum > lo.depth_sum
        assert hi.weight_bytes["shared"] > lo.weight_bytes["shared"]
        assert hi.flops > lo.flops
        assert hi.calls > lo.calls
        assert hi.kv_read_bytes > lo.kv_read_bytes
    # The first and last layers do not depend on depth.
    assert runs[0].weight_bytes["first"] == runs[2].weight_bytes["first"]


def test_depth_distribution_from_fractions() -> None:
    cfg = _mor()
    wl = Workload.from_lengths([4000], cfg, fractions=[1.0, 0.5, 0.25], seed=0)
    depths = wl.depths[0]
    assert set(depths) <= {1, 2, 3}
    share = [sum(d >= r for d in depths) / len(depths) for r in (1, 2, 3)]
    assert share[0] == 1.0 and abs(share[1] - 0.5) < 0.03 and abs(share[2] - 0.25) < 0.03


def test_device_profiles_have_sources() -> None:
    assert {"h100-sxm", "h200", "a100-80gb"} <= set(DEVICE_PROFILES)
    for p in DEVICE_PROFILES.values():
        assert "datasheet" in p.source and "ASSUMPTION" in p.source
        assert p.mem_bandwidth_bytes_per_s > 1e12 and p.peak_flops_per_s > 1e14
        assert 0 < p.per_call_overhead_s < 1e-4
    bw = {k: p.mem_bandwidth_bytes_per_s for k, p in DEVICE_PROFILES.items()}
    assert bw["h200"] > bw["h100-sxm"] > bw["a100-80gb"]


def test_projection_and_roofline_card() -> None:
    cfg = _mor(kv="share")
    wl = Workload([30] * 16)
    gpu = DEVICE_PROFILES["h100-sxm"]
    small = project(cfg, wl, "depth", 4, gpu, mean_depth=2.0)
    big = project(cfg, wl, "depth", 16, gpu, mean_depth=2.0)
    assert small["tokens"] == big["tokens"] == 480
    assert big["iterations"] < small["iterations"]
    assert big["tokens_per_s"] > small["tokens_per_s"] > 0
    card = roofline_card(big, measured_tokens_per_s=1000.0)
    per_token = big["per_token"]
    assert card["mbu"] == pytest.approx(
        (per_token["weight_bytes"] + per_token["kv_bytes"]) * 1000.0
        / gpu.mem_bandwidth_bytes_per_s)
    assert card["mfu"] == pytest.approx(per_token["flops"] * 1000.0 / gpu.peak_flops_per_s)
    assert card["model_error"] == pytest.approx(big["tokens_per_s"] / 1000.0 - 1)
    assert card["ceiling_memory_tokens_per_s"] > big["tokens_per_s"]
    assert sum(big["breakdown_share"].values()) == pytest.approx(1.0)
    # bf16 on a GPU profile: half the weight bytes of the fp32 CPU workload.
    fp32 = project(cfg, Workload([30] * 16, bytes_per_elem=4), "depth", 16, gpu,
                   mean_depth=2.0)
    assert fp32["totals"]["weight_bytes"] == 2 * big["totals"]["weight_bytes"]


def test_calibrate_cpu_quick() -> None:
    p = calibrate_cpu(threads=1, quick=True, host_run=False)
    for value in (p.mem_bandwidth_bytes_per_s, p.peak_flops_per_s, p.per_call_overhead_s,
                  p.matmul_flops_per_s, p.attn_flops_per_s, p.copy_bandwidth_bytes_per_s):
        assert 0 < value < math.inf
    assert p.overlap is False and p.attention == "bmm" and p.bytes_per_elem == 4
    assert set(p.overheads) == {"view", "kernel", "sync", "token"}
    assert "measured" in p.source and p.threads == 1
    res = project(ModelConfig.from_preset("micro", family="vanilla"), Workload([10] * 4),
                  "sequence", 4, p)
    assert 0 < res["tokens_per_s"] < math.inf


def test_ops_table_uses_known_pseudo_entries() -> None:
    pseudo = {"SET", "SLICE", "ROUTER", "GATE", "NORM"}
    for key, seq in OPS.items():
        for name in seq:
            assert name in pseudo or name.startswith("@") or name.islower(), (key, name)
