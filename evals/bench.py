"""Training-throughput benchmark: tokens/s and MFU of one preset, no data needed.

    mor-bench bench-train --preset small --family vanilla --steps 20

Untimed warm-up steps, then `steps` timed optimizer steps on random tokens; the median step
time gives tokens/s. MFU = (3 x exact forward FLOPs per token x tokens/s) / measured matmul
peak, the peak being the median of square fp32 (CPU) or bf16 (CUDA) matmuls measured in the
same process right before AND after the steps (their mean is the denominator; both are
reported, so a noisy machine shows itself).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from evals.runner import measure_matmul_peak
from evals.train import TrainConfig, param_groups, resolve_device
from mor import ModelConfig, build_model


def bench_train(preset: str, family: str = "vanilla", num_recursions: int = 1, *,
                seq_len: int = 256, batch_size: int = 16, steps: int = 20, warmup: int = 3,
                device: str = "auto", seed: int = 0) -> dict[str, Any]:
    dev = resolve_device(TrainConfig(device=device).device)
    cfg = ModelConfig.from_preset(preset, family=family, num_recursions=num_recursions)
    if seq_len > cfg.max_seq_len:
        cfg = cfg.replace(max_seq_len=seq_len)
    torch.manual_seed(seed)
    model = build_model(cfg).to(dev).train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=g).to(dev)
    peak_before = measure_matmul_peak(dev.type)
    times = []
    for i in range(warmup + steps):
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
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak_after = measure_matmul_peak(dev.type)
    step_s = statistics.median(times)
    tokens_per_s = batch_size * seq_len / step_s
    fpt_exact = model.flops_per_token(seq_len, "exact")
    achieved = 3 * fpt_exact * tokens_per_s
    peak = (peak_before + peak_after) / 2
    return {
        "preset": preset, "family": family, "num_recursions": num_recursions,
        "layers": cfg.layer_plan, "seq_len": seq_len, "batch_size": batch_size,
        "device": str(dev), "threads": torch.get_num_threads(), "steps": steps,
        "median_step_s": step_s, "tokens_per_s": tokens_per_s,
        "train_flops_per_token": 3 * fpt_exact, "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peak, "matmul_peak_before": peak_before,
        "matmul_peak_after": peak_after, "mfu": achieved / peak,
    }
