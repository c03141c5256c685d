"""Inference-throughput benchmark: the paper's generation workload, scaled by settings.

    mor-bench bench-infer runs/smoke-latest            # every checkpoint of a suite run
    mor-bench bench-infer CKPT_A CKPT_B --batch-size max --json

The workload (docs/protocol.md §6): `samples` sequences generated from no prompt (each starts
from the tokenizer's EOS id, the document separator the models were trained with), their
lengths drawn from Normal(gen_mean, gen_std) (paper: 1000 samples, mean 256), sampled at
`temperature` from each request's own random stream. Vanilla and recursive models decode
with continuous sequence-wise batching, MoR with continuous depth-wise batching
(`mor.decode`); `scheduler = "both"` also times MoR sequence-wise.

Batch: a fixed `batch_size`, or "max": the largest batch whose parameter bytes plus
KV-cache bytes fit `memory_budget_mb` -- by default the memory the reference (vanilla)
model needs at batch `reference_batch` (the paper's fixed batch 32), so every model gets the
same memory and MoR's smaller parameters and KV cache turn into a larger batch.

Timing: one untimed warm-up per model, then `repeats` rounds in which every model decodes
the SAME requests, interleaved (A B C A B C ...) so machine noise hits all alike; medians.
Headline: tokens/s relative to the vanilla model of the same unrolled depth (same n_layers
and d_model) in the same process.

Beside every measurement, the throughput model's projection of the same workload (the
requests and the depth every token took in the last timed round) on this device, and its
roofline card: weight and KV bytes per decode iteration, the memory-bandwidth ceiling, the
achieved MBU / MFU and the model's error (`throughput_model`; docs/throughput_model.md).
Measured and modelled figures are kept in separate fields. With `scheduler = "auto"` a MoR
model decodes with the scheduler the model predicts is faster (projected from the warm-up's
depths), and the row says which and why.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evals.suite.spec import InferSettings
from evals.training.device import hardware_info, resolve_device
from mor import flops
from mor.errors import ConfigError


@dataclass
class BenchModel:
    name: str
    model: Any
    bos_id: int
    source: str


def load_models(paths: list[str | Path]) -> list[BenchModel]:
    """Checkpoints (directories or .safetensors), or suite run directories (their ok runs)."""
    from evals.suite.record import read_json
    from mor.checkpoint import load_checkpoint, read_checkpoint_meta

    ckpts: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw)
        if (p / "plan.json").is_file():  # a suite run directory
            found = []
            for rec_file in sorted(p.glob("*/record.json")):
                rec = read_json(rec_file)  # RecordError naming the file if broken
                if rec.get("status") == "ok" and (rec_file.parent / "config.json").is_file():
                    found.append((rec.get("run_id", rec_file.parent.name), rec_file.parent))
            if not found:
                raise ConfigError(f"suite run directory '{p}' holds no successful run with a "
                                  "checkpoint")
            ckpts += found
        else:
            directory, _ = read_checkpoint_meta(p)  # raises a clear error if not one
            ckpts.append((directory.name, directory))
    names = [n for n, _ in ckpts]
    if len(set(names)) != len(names):  # same run ids from two suite runs
        ckpts = [(f"{d.parent.name}/{n}", d) for n, d in ckpts]
    out = []
    for name, directory in ckpts:
        _, meta = read_checkpoint_meta(directory)
        tok = (meta.get("extra") or {}).get("tokenizer") or {}
        model = load_checkpoint(directory)
        bos = tok.get("eos_id")
        if bos is None:
            from evals.data.tokenizer import tokenizer_from_spec

            bos = tokenizer_from_spec(tok).eos_id if tok else model.cfg.vocab_size - 1
        out.append(BenchModel(name, model, int(bos), str(directory)))
    return out


def draw_lengths(settings: InferSettings, cap: int) -> list[int]:
    """Generation lengths ~ Normal(mean, std), rounded, clipped to [1, cap]."""
    g = torch.Generator().manual_seed(settings.seed)
    raw = torch.normal(settings.gen_mean, settings.gen_std, (settings.samples,), generator=g)
    return [int(min(cap, max(1, round(x)))) for x in raw.tolist()]


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _kv_bytes_per_seq(cfg, max_len: int, kv_capacity: str, elem: int) -> int:
    steps = ([max_len] * cfg.num_recursions
             if cfg.family == "mor" and kv_capacity == "full" else None)
    return flops.kv_cache_bytes(cfg, max_len, 1, elem, steps)


def memory_plan(models: list[BenchModel], settings: InferSettings, max_len: int
                ) -> tuple[list[int], float | None]:
    """Batch per model and the memory budget (bytes; None for a fixed batch)."""
    if settings.batch_size != "max":
        return [int(settings.batch_size)] * len(models), None
    # The cache holds keys/values in the models' own dtype.
    elem = next(models[0].model.parameters()).element_size()

    def need(m: BenchModel, batch: int) -> int:
        return (_param_bytes(m.model)
                + batch * _kv_bytes_per_seq(m.model.cfg, max_len, settings.kv_capacity, elem))

    if settings.memory_budget_mb is not None:
        budget = settings.memory_budget_mb * 2**20
    else:
        ref = next((m for m in models if m.model.cfg.family == "vanilla"), models[0])
        budget = need(ref, settings.reference_batch)
    batches = []
    for m in models:
        per_seq = _kv_bytes_per_seq(m.model.cfg, max_len, settings.kv_capacity, elem)
        b = math.floor((budget - _param_bytes(m.model)) / per_seq)
        if b < 1:
            raise ConfigError(f"memory budget of {budget / 2**20:.1f} MiB does not hold model "
                              f"'{m.name}' ({_param_bytes(m.model) / 2**20:.1f} MiB of "
                              f"parameters) and one sequence's KV cache; raise "
                              "memory_budget_mb")
        batches.append(b)
    return batches, budget


def _reference_of(i: int, models: list[BenchModel]) -> int | None:
    """The vanilla model with the same unrolled depth and width as model i."""
    cfg = models[i].model.cfg
    for j, m in enumerate(models):
        c = m.model.cfg
        if c.family == "vanilla" and c.n_layers == cfg.n_layers and c.d_model == cfg.d_model:
            return j
    return None


def selected_fractions(depths: list[list[int]], num_recursions: int) -> list[float]:
    """Per recursion step r = 1..N_r, the fraction of generated tokens whose pass took step r
    (depth >= r), from `Completion.depths`."""
    flat = [d for ds in depths for d in ds]
    if not flat:
        return [0.0] * num_recursions
    return [sum(d >= r for d in flat) / len(flat) for r in range(1, num_recursions + 1)]


def depth_histogram(depths: list[list[int]], num_recursions: int) -> list[int]:
    """Counts of generated tokens by depth 0..N_r."""
    hist = [0] * (num_recursions + 1)
    for ds in depths:
        for d in ds:
            hist[d] += 1
    return hist


_GPU_PROFILES = (("H200", "h200"), ("H100", "h100-sxm"), ("A100", "a100-80gb"))


def device_profile_for(settings: InferSettings, device: torch.device):
    """(DeviceProfile or None, where its figures come from) for `settings.throughput_model`
    on `device`: a calibration of this CPU, a GPU's datasheet profile, or None."""
    from evals.perf.throughput_model import calibrate_cpu, device_profile

    mode = settings.throughput_model
    if mode == "off":
        return None, "throughput_model = off"
    if device.type == "cpu":
        quick = mode == "quick"
        prof = calibrate_cpu(threads=settings.threads, quick=quick, host_run=not quick)
        return prof, f"calibrated on this CPU ({'quick, ~1 s' if quick else 'full'})"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, prof_name in _GPU_PROFILES:
            if key in name:
                return (device_profile(prof_name),
                        f"datasheet figures of {prof_name} for {name!r} (per-call overhead "
                        "assumed, see docs/throughput_model.md)")
        return None, f"no device profile for {name!r}"
    return None, f"no device profile for {device.type}"


def _finite(v: Any) -> Any:
    """JSON-safe: an infinite or NaN float becomes None (in dicts and lists too)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def _workload(model, settings: InferSettings, lengths: list[int], max_len: int,
              depths: list[list[int]] | None = None, fractions: list[float] | None = None):
    from evals.perf.throughput_model import Workload

    elem = next(model.parameters()).element_size()
    kw = dict(max_len=max_len, temperature=settings.temperature,
              kv_capacity=settings.kv_capacity, bytes_per_elem=elem)
    if depths is not None:
        return Workload(list(lengths), depths, **kw)
    return Workload.from_lengths(lengths, model.cfg, fractions=fractions,
                                 seed=settings.seed, **kw)


def choose_scheduler(model, settings: InferSettings, lengths: list[int], max_len: int,
                     batch: int, prof, warm_depths: list[list[int]]) -> dict[str, Any]:
    """The `auto` choice for a MoR model: project both schedulers on the workload (depths drawn
    per token from the per-step fractions the warm-up decoding selected) and take the faster;
    depth-wise (the paper's) when there is no device profile."""
    from evals.perf.throughput_model import project

    if prof is None:
        return {"chosen": "depth", "why": "no throughput model on this device: the "
                "paper's depth-wise batching", "modelled_tokens_per_s": None}
    fr = selected_fractions(warm_depths, model.cfg.num_recursions)
    wl = _workload(model, settings, lengths, max_len, fractions=fr)
    modelled = {s: project(model.cfg, wl, s, batch, prof)["tokens_per_s"]
                for s in ("depth", "sequence")}
    chosen = max(modelled, key=modelled.get)
    return {"chosen": chosen, "modelled_tokens_per_s": modelled,
            "why": f"the throughput model ({prof.name}) projects {chosen}-wise batching "
                   f"faster: {modelled[chosen]:,.0f} vs "
                   f"{modelled['sequence' if chosen == 'depth' else 'depth']:,.0f} tokens/s"}


def modelled_row(model, settings: InferSettings, lengths: list[int], max_len: int,
                 batch: int, scheduler: str, prof, source: str,
                 depths: list[list[int]] | None, measured: float) -> dict[str, Any]:
    """The throughput model's roofline card for one measured row (same requests, same
    per-token depths, same batch and scheduler), JSON-safe."""
    from evals.perf.throughput_model import project, roofline_card

    wl = _workload(model, settings, lengths, max_len, depths=depths)
    proj = project(model.cfg, wl, scheduler, batch, prof)
    card = {k: _finite(v) for k, v in roofline_card(proj, measured).items()}
    card["source"] = source
    card["breakdown_share"] = {k: round(v, 4) for k, v in proj["breakdown_share"].items()}
    return card


def bench_models(models: list[BenchModel], settings: InferSettings, *, log=None,
                 profile: bool = False) -> dict[str, Any]:
    """Decode the workload with every model, interleaved; returns {"settings", "rows",
    "budget_bytes", "max_len", "lengths", ...}. `profile`: also time each engine stage."""
    from mor.decode import Engine, Request

    if not models:
        raise ConfigError("bench-infer needs at least one checkpoint")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    for m in models:
        m.model.to(device)
    cap = min(m.model.cfg.max_seq_len for m in models) - 1
    if settings.max_len is not None:
        cap = min(cap, settings.max_len - 1)
    lengths = draw_lengths(settings, cap)
    max_len = max(lengths) + 1
    batches, budget = memory_plan(models, settings, max_len)
    prof, prof_source = device_profile_for(settings, device)
    if log and prof is not None:
        log(f"  throughput model: {prof.name}, {prof_source}")
    runs = []  # (model index, scheduler); "auto" is resolved after the warm-up
    for i, m in enumerate(models):
        if m.model.cfg.family != "mor" or settings.scheduler in ("sequence",):
            runs.append((i, "sequence"))
        elif settings.scheduler == "both":
            runs += [(i, "depth"), (i, "sequence")]
        else:
            runs.append((i, settings.scheduler))
    engines = {}
    for i, _ in runs:
        m = models[i]
        if i not in engines:
            engines[i] = Engine(m.model, max_batch=min(batches[i], settings.samples),
                                max_len=max_len, kv_capacity=settings.kv_capacity,
                                temperature=settings.temperature)
    requests = {i: [Request(prompt=[m.bos_id], max_new_tokens=n, id=k,
                            seed=settings.seed * 1_000_003 + k)
                    for k, n in enumerate(lengths)] for i, m in enumerate(models)}
    warm = max(1, settings.samples // 8)
    choices: dict[int, dict[str, Any]] = {}
    for k, (i, sched) in enumerate(runs):  # untimed warm-up
        outs = engines[i].generate(requests[i][:warm], "depth" if sched == "auto" else sched)
        if sched == "auto":
            choices[i] = choose_scheduler(models[i].model, settings, lengths, max_len,
                                          engines[i].max_batch, prof,
                                          [list(o.depths) for o in outs])
            runs[k] = (i, choices[i]["chosen"])
            if log:
                log(f"  {models[i].name}: scheduler auto -> {choices[i]['chosen']} "
                    f"({choices[i]['why']})")
            if runs[k][1] != "depth":
                engines[i].generate(requests[i][:warm], runs[k][1])
    times: dict[tuple[int, str], list[float]] = {r: [] for r in runs}
    stats: dict[tuple[int, str], dict] = {}
    stage: dict[tuple[int, str], dict] = {}
    traces: dict[tuple[int, str], list[list[int]]] = {}
    for rep in range(settings.repeats):
        for i, sched in runs:
            eng = engines[i]
            eng.profile = profile
            t0 = time.perf_counter()
            outs = eng.generate(requests[i], sched)
            dt = time.perf_counter() - t0
            times[(i, sched)].append(dt)
            stats[(i, sched)] = dict(eng.stats)
            traces[(i, sched)] = [list(o.depths) for o in outs]
            if profile:
                stage[(i, sched)] = dict(eng.stage_times)
            n_tok = sum(len(o.tokens) for o in outs)
            if n_tok != sum(lengths):
                raise RuntimeError(f"{models[i].name}: generated {n_tok} tokens, the workload "
                                   f"asked for {sum(lengths)}")
            if log:
                log(f"  round {rep + 1}/{settings.repeats} {models[i].name} ({sched}): "
                    f"{n_tok / dt:,.0f} tokens/s")
    total = sum(lengths)
    rows = []
    for i, sched in runs:
        m, eng = models[i], engines[i]
        cfg, st = m.model.cfg, stats[(i, sched)]
        med = statistics.median(times[(i, sched)])
        row = {
            "model": m.name, "family": cfg.family, "layers": cfg.layer_plan,
            "N_r": cfg.num_recursions if cfg.family != "vanilla" else None,
            "router": cfg.router if cfg.family == "mor" else None,
            "kv": cfg.kv if cfg.family == "mor" else None,
            "scheduler": sched, "batch_size": eng.max_batch,
            "tokens": total, "time_s": med, "times_s": times[(i, sched)],
            "tokens_per_s": total / med, "ms_per_token": 1000 * med / total,
            "ms_per_iteration": 1000 * med / max(1, st["iterations"]),
            "iterations": st["iterations"],
            "kv_cache_bytes": eng.cache.nbytes(), "param_bytes": _param_bytes(m.model),
            # The engine's own fused Q/K/V and gate/up copies (it never re-points the
            # model's weights): reported, but not part of the memory plan, which counts
            # parameters + KV cache as the paper's comparison does.
            "engine_fused_bytes": eng.fused_bytes,
            "mean_depth": (st["depth_sum"] / st["passes"]
                           if cfg.family == "mor" and st["passes"] else None),
            "shared_batch_fill": (st["shared_items"] / (st["shared_calls"] * eng.max_batch)
                                  if st["shared_calls"] else None),
            "capped_frac": st["capped"] / st["passes"] if st["passes"] else 0.0,
            "routing": ("causal" if cfg.family == "mor" and cfg.router == "expert"
                        else ("token" if cfg.family == "mor" else None)),
            "source": m.source, "device": str(device),
        }
        if cfg.family == "mor":
            row["selected_fractions"] = selected_fractions(traces[(i, sched)],
                                                           cfg.num_recursions)
            row["depth_histogram"] = depth_histogram(traces[(i, sched)], cfg.num_recursions)
        if i in choices:
            row["scheduler_choice"] = choices[i]
        row["modelled"] = (modelled_row(
            m.model, settings, lengths, max_len, eng.max_batch, sched, prof, prof_source,
            traces[(i, sched)] if cfg.family == "mor" else None, row["tokens_per_s"])
            if prof is not None else None)
        if profile:
            row["stage_s"] = stage[(i, sched)]
        rows.append(row)
    for row, (i, _) in zip(rows, runs):
        j = _reference_of(i, models)
        ref = (next((r for r, (k, _) in zip(rows, runs) if k == j), None)
               if j is not None else None)
        row["reference"] = ref["model"] if ref else None
        row["rel_tokens_per_s"] = row["tokens_per_s"] / ref["tokens_per_s"] if ref else None
    return {"settings": dataclasses.asdict(settings), "rows": rows, "lengths": lengths,
            "max_len": max_len, "budget_bytes": budget,
            "hardware": hardware_info(), "torch_threads": torch.get_num_threads(),
            "throughput_model": {"profile": _finite(prof.to_dict()) if prof is not None else None,
                                 "source": prof_source}}

