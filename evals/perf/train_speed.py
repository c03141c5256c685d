"""Training-throughput benchmark: tokens/s, FLOPs and MFU of model variants, no data needed.

    mor-bench bench-train --preset small --family vanilla --steps 20
    mor-bench bench-train --preset small --family mor -n 3 --variant kv=cache --variant kv=share

Each variant is the preset with `key=value` overrides. Every variant trains with the
suites' own optimizer step (`evals.training.loop.TrainStep`: grad accumulation, WSD LR,
clipping, `after_optimizer_step`) on the same random tokens: untimed warm-up steps, then
`steps` timed optimizer steps per variant, INTERLEAVED (A B A B ...) by
`interleaved_train_speed` -- the same measurement suites use -- so a noisy machine slows all
variants alike; the median step time gives tokens/s, and ratios to the first variant are
the figures to quote. MFU = (3 x exact forward FLOPs per token x tokens/s) / matmul peak, the
peak being square fp32 (CPU) or bf16 (CUDA) matmuls measured in the same process before AND
after the steps (their mean; both are reported).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from evals.training.device import measure_matmul_peak, resolve_device
from evals.training.loop import TrainConfig, TrainStep, make_optimizer
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


def _micro_batches(windows: torch.Tensor, tcfg: TrainConfig, n_steps: int,
                   seed: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """`n_steps` steps of `grad_accum` micro-batches of `batch_size` windows each, drawn in a
    seeded order cycling through `windows` (every model trains on the same batches)."""
    n = windows.shape[0]
    per_step = tcfg.batch_size * tcfg.grad_accum
    g = torch.Generator().manual_seed(seed)
    reps = -(-n_steps * per_step // n)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])
    steps = []
    for s in range(n_steps):
        idx = order[s * per_step:(s + 1) * per_step]
        micro = []
        for m in range(tcfg.grad_accum):
            w = windows[idx[m * tcfg.batch_size:(m + 1) * tcfg.batch_size]]
            micro.append((w[:, :-1], w[:, 1:]))
        steps.append(micro)
    return steps


def paired_speed_ratio(reference_round_s: list[float], round_s: list[float]) -> float:
    """Throughput of a model relative to a reference measured in the same interleaved
    rounds: the median over rounds of reference time / model time (equal work per round)."""
    return statistics.median(a / b for a, b in zip(reference_round_s, round_s, strict=True))


def interleaved_train_speed(models: dict[str, torch.nn.Module], windows: torch.Tensor,
                            tcfg: TrainConfig, *, rounds: int = 3, steps_per_round: int = 3,
                            warmup_steps: int = 1, reference: str | None = None,
                            seed: int = 0, log: Callable[[str], None] | None = None
                            ) -> dict[str, Any]:
    """Training speed of several models measured side by side in this process.

    Every model gets a fresh AdamW over the loop's parameter groups and is trained with the
    loop's own `TrainStep` (batch_size / grad_accum / LR schedule / clipping from `tcfg`, on
    `tcfg.device`): `warmup_steps` untimed steps each, then `rounds` rounds in which every
    model in turn (A B A B ...) does `steps_per_round` timed steps, so load from neighbours
    hits all models alike. `windows`: int tensor [N, seq_len+1]; all models train on the
    same seeded sequence of batches drawn from it. The models are trained IN PLACE (and
    left on the device, in train mode).

    Returns {"rounds", "steps_per_round", "tokens_per_step", "reference", "rows": {name:
    {"tokens_per_s", "step_s", "round_s", "rel_tokens_per_s"}}}: `round_s` the seconds of
    each round's steps, `step_s` = median(round_s) / steps_per_round, `tokens_per_s` =
    tokens_per_step / step_s, `rel_tokens_per_s` = the median over rounds of the reference's
    round time / this model's round time (paired by round; None without a reference)."""
    if not models:
        raise ConfigError("interleaved_train_speed needs at least one model")
    for name, v in (("rounds", rounds), ("steps_per_round", steps_per_round)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    if warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if reference is not None and reference not in models:
        raise ConfigError(f"reference {reference!r} is not one of the models "
                          f"{sorted(models)}")
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ConfigError(f"windows must be [N, seq_len+1] with seq_len >= 1, got "
                          f"{list(windows.shape)}")
    dev = resolve_device(tcfg.device)
    seq_len = windows.shape[1] - 1
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * seq_len
    total = warmup_steps + rounds * steps_per_round
    batches = _micro_batches(windows, tcfg, total, seed)
    lr_warmup = max(1, round(tcfg.warmup_frac * total))
    steppers: dict[str, TrainStep] = {}
    for name, model in models.items():
        model.to(dev).train()
        steppers[name] = TrainStep(model, make_optimizer(model, tcfg, dev), tcfg,
                                   total_steps=total, warmup_steps=lr_warmup, device=dev)
    for stepper in steppers.values():  # untimed warm-up
        for s in range(warmup_steps):
            stepper(s, batches[s])
    round_s: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        first = warmup_steps + r * steps_per_round
        for name, stepper in steppers.items():  # interleaved: A B A B ...
            elapsed = 0.0
            for s in range(first, first + steps_per_round):
                _, dt = stepper.timed(s, batches[s])
                elapsed += dt
            round_s[name].append(elapsed)
            if log:
                log(f"  round {r + 1}/{rounds} {name}: "
                    f"{tokens_per_step * steps_per_round / elapsed:,.0f} tokens/s")
    rows: dict[str, dict[str, Any]] = {}
    for name, times in round_s.items():
        step_s = statistics.median(times) / steps_per_round
        rows[name] = {"tokens_per_s": tokens_per_step / step_s, "step_s": step_s,
                      "round_s": times, "rel_tokens_per_s": None}
    if reference is not None:
        # Paired by round: a model and the reference ran back to back in the same round, so
        # their time ratio cancels load that changes between rounds; the median over rounds
        # then drops a round a neighbour disturbed for one of them only.
        for name, row in rows.items():
            row["rel_tokens_per_s"] = paired_speed_ratio(round_s[reference], round_s[name])
    return {"rounds": rounds, "steps_per_round": steps_per_round,
            "tokens_per_step": tokens_per_step, "rows": rows, "reference": reference}


def bench_variants(preset: str, family: str = "vanilla", num_recursions: int = 1,
                   variants: list[dict[str, Any]] | None = None, *, seq_len: int = 256,
                   batch_size: int = 16, steps: int = 20, warmup: int = 3,
                   grad_accum: int = 1, device: str = "auto", seed: int = 0,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`steps` timed optimizer steps per variant (the suites' `TrainStep`, with the default
    `TrainConfig` but for batch_size / grad_accum / device), one per round of
    `interleaved_train_speed`; ratios are to the first variant."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    tcfg = TrainConfig(batch_size=batch_size, grad_accum=grad_accum, device=device)
    dev = resolve_device(tcfg.device)
    variants = variants or [{}]
    entries = []
    for i, overrides in enumerate(variants):
        # Overrides may change the family too (e.g. family=recursive beside MoR variants).
        cfg = ModelConfig.from_preset(preset, **{"family": family,
                                                 "num_recursions": num_recursions, **overrides})
        if seq_len > cfg.max_seq_len:
            cfg = cfg.replace(max_seq_len=seq_len)
        torch.manual_seed(seed)
        name = ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"
        key = name if all(e[0] != name for e in entries) else f"{name} #{i + 1}"
        entries.append((key, name, cfg, build_model(cfg)))
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, entries[0][2].vocab_size,
                            (batch_size * grad_accum, seq_len + 1), generator=g)
    peak_before = measure_matmul_peak(dev.type)
    speed = interleaved_train_speed({key: model for key, _, _, model in entries}, windows,
                                    tcfg, rounds=steps, steps_per_round=1,
                                    warmup_steps=warmup, reference=entries[0][0], seed=seed,
                                    log=log)
    peak_after = measure_matmul_peak(dev.type)
    peak = (peak_before + peak_after) / 2
    rows = []
    for key, name, cfg, model in entries:
        sp = speed["rows"][key]
        fpt_exact = model.flops_per_token(seq_len, "exact")
        achieved = 3 * fpt_exact * sp["tokens_per_s"]
        rows.append({
            "variant": name, "layers": cfg.layer_plan, "median_step_s": sp["step_s"],
            "step_times_s": sp["round_s"], "tokens_per_s": sp["tokens_per_s"],
            "rel_tokens_per_s": sp["rel_tokens_per_s"],
            "flops_per_token_paper": model.flops_per_token(seq_len, "paper"),
            "flops_per_token_exact": fpt_exact, "achieved_flops_per_s": achieved,
            "mfu": achieved / peak,
        })
    for row in rows:
        row["step_time_ratio"] = 1 / row["rel_tokens_per_s"]  # paired by round, as rel
        row["exact_flops_ratio"] = row["flops_per_token_exact"] / rows[0]["flops_per_token_exact"]
    return {
        "preset": preset, "family": family, "num_recursions": num_recursions,
        "seq_len": seq_len, "batch_size": batch_size, "grad_accum": grad_accum,
        "tokens_per_step": speed["tokens_per_step"], "device": str(dev),
        "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup,
        "matmul_peak_flops_per_s": peak, "matmul_peak_before": peak_before,
        "matmul_peak_after": peak_after, "variants": rows,
    }
