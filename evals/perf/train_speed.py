"""Training-throughput benchmark: tokens/s, FLOPs and MFU of model variants, no data needed.

    mor-bench bench-train --preset small --family vanilla --steps 20
    mor-bench bench-train --preset small --family mor -n 3 --variant kv=cache --variant kv=share

Each variant is the preset with `key=value` overrides. Untimed warm-up steps, then `steps`
timed optimizer steps per variant on the same random tokens, INTERLEAVED (A B A B ...) so a
noisy machine slows all variants alike; the median step time gives tokens/s, and ratios to
the first variant are the figures to quote. MFU = (3 x exact forward FLOPs per token x
tokens/s) / matmul peak, the peak being square fp32 (CPU) or bf16 (CUDA) matmuls measured
in the same process before AND after the steps (their mean; both are reported).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from evals.training.device import measure_matmul_peak, resolve_device
from evals.training.loop import TrainConfig, param_groups
from mor import ModelConfig, build_model
from mor.errors import ConfigError


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["kv=share", "router_alpha=0.5"] -> {"kv": "share", "router_alpha": 0.5}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"variant override {item!r}: expected KEY=VALUE, e.g. kv=share")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if raw in ("true", "false"):
            value = raw == "true"
        out[key.strip()] = value
    return out


def _time_step(model, opt, x, dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        out = model(x[:, :-1], x[:, 1:])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_variants(preset: str, family: str = "vanilla", num_recursions: int = 1,
                   variants: list[dict[str, Any]] | None = None, *, seq_len: int = 256,
                   batch_size: int = 16, steps: int = 20, warmup: int = 3,
                   device: str = "auto", seed: int = 0) -> dict[str, Any]:
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    dev = resolve_device(TrainConfig(device=device).device)
    variants = variants or [{}]
    models = []
    for overrides in variants:
        # Overrides may change the family too (e.g. family=recursive beside MoR variants).
        cfg = ModelConfig.from_preset(preset, **{"family": family,
                                                 "num_recursions": num_recursions, **overrides})
        if seq_len > cfg.max_seq_len:
            cfg = cfg.replace(max_seq_len=seq_len)
        torch.manual_seed(seed)
        model = build_model(cfg).to(dev).train()
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
        models.append((overrides, cfg, model, opt))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, models[0][1].vocab_size, (batch_size, seq_len + 1),
                      generator=g).to(dev)
    peak_before = measure_matmul_peak(dev.type)
    times: list[list[float]] = [[] for _ in models]
    for i in range(warmup + steps):
        for j, (_, _, model, opt) in enumerate(models):  # interleaved: A B A B ...
            dt = _time_step(model, opt, x, dev)
            if i >= warmup:
                times[j].append(dt)
    peak_after = measure_matmul_peak(dev.type)
    peak = (peak_before + peak_after) / 2
    rows = []
    for (overrides, cfg, model, _), ts in zip(models, times):
        step_s = statistics.median(ts)
        tokens_per_s = batch_size * seq_len / step_s
        fpt_exact = model.flops_per_token(seq_len, "exact")
        achieved = 3 * fpt_exact * tokens_per_s
        rows.append({
            "variant": ",".join(f"{k}={v}" for k, v in overrides.items()) or "default",
            "layers": cfg.layer_plan, "median_step_s": step_s, "tokens_per_s": tokens_per_s,
            "flops_per_token_paper": model.flops_per_token(seq_len, "paper"),
            "flops_per_token_exact": fpt_exact, "achieved_flops_per_s": achieved,
            "mfu": achieved / peak,
        })
    for row in rows:
        row["step_time_ratio"] = row["median_step_s"] / rows[0]["median_step_s"]
        row["exact_flops_ratio"] = row["flops_per_token_exact"] / rows[0]["flops_per_token_exact"]
    return {
        "preset": preset, "family": family, "num_recursions": num_recursions,
        "seq_len": seq_len, "batch_size": batch_size, "device": str(dev),
        "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup,
        "matmul_peak_flops_per_s": peak, "matmul_peak_before": peak_before,
        "matmul_peak_after": peak_after, "variants": rows,
    }
