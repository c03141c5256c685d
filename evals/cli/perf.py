"""`mor-bench peak-flops`, `bench-train` and `bench-infer`: throughput measurements (the
measurements live in `evals.training.device` and `evals.perf`; this module parses and
displays)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from evals.cli.display import print_json, rich_table
from evals.cli.errors import nonneg_int, positive_int


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    if command == "peak-flops":
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        p.add_argument("--size", type=positive_int, default=1024, help="matrix size (default 1024)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    elif command == "bench-train":
        p.add_argument("--preset", default="small", help="model preset (default small)")
        p.add_argument("--family", default="vanilla", help="vanilla | recursive | mor")
        p.add_argument("-n", "--num-recursions", type=positive_int, default=1,
                       help="N_r (recursive/mor)")
        p.add_argument("--variant", action="append", default=[],
                       metavar="KEY=VALUE[,KEY=VALUE]", help="model-config overrides of one "
                       "variant; repeat to compare variants")
        p.add_argument("--seq-len", type=positive_int, default=256)
        p.add_argument("--batch-size", type=positive_int, default=16)
        p.add_argument("--steps", type=int, default=20,
                       help="timed steps (after 3 warm-up)")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--json", action="store_true", help="machine-readable output")
    elif command == "bench-infer":
        _bench_infer_arguments(p)


def cmd_peak_flops(args: argparse.Namespace) -> int:
    """Measure the fp32 (CPU) or bf16 (CUDA) square-matmul peak used as MFU denominator."""
    from evals.training.device import measure_matmul_peak, resolve_device
    from mor.errors import MorBenchError

    if args.size < 64:
        raise MorBenchError(f"--size {args.size} is too small to measure a peak; use >= 64")
    peak = measure_matmul_peak(resolve_device(args.device).type, size=args.size)
    if args.json:
        print_json({"device": args.device, "size": args.size, "flops_per_s": peak})
    else:
        print(f"{args.device} matmul {args.size}x{args.size}: {peak / 1e9:.1f} GFLOP/s")
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    """Training throughput, FLOPs and MFU of one preset, or of several variants of it timed
    side by side (interleaved A B A B, medians) on random tokens -- no data needed.

    Variants are KEY=VALUE overrides of the model config, one --variant per model, e.g.
      mor-bench bench-train --preset small --family mor -n 3 --variant kv=cache --variant kv=share
    Ratios are to the first variant."""
    from evals.perf.train_speed import bench_variants, parse_overrides
    from mor.errors import MorBenchError

    if args.steps < 1:
        raise MorBenchError(f"--steps {args.steps}: need at least 1 timed step")
    variants = [parse_overrides(v.split(",")) for v in args.variant] or [{}]
    res = bench_variants(args.preset, args.family, args.num_recursions, variants,
                         seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
                         device=args.device)
    if args.json:
        print_json(res)
        return 0
    print(f"{res['preset']} {res['family']} N_r={res['num_recursions']}, seq {res['seq_len']} x "
          f"batch {res['batch_size']} on {res['device']} ({res['threads']} threads), "
          f"{res['steps']} timed steps each, matmul peak "
          f"{res['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
    rows = [{"variant": r["variant"], "layers": r["layers"],
             "step (s)": f"{r['median_step_s']:.4f}", "tokens/s": f"{r['tokens_per_s']:,.0f}",
             "exact FLOPs/tok": f"{r['flops_per_token_exact']:.3g}",
             "paper FLOPs/tok": f"{r['flops_per_token_paper']:.3g}",
             "MFU": f"{100 * r['mfu']:.1f}%", "time ratio": f"{r['step_time_ratio']:.3f}",
             "FLOPs ratio": f"{r['exact_flops_ratio']:.3f}"} for r in res["variants"]]
    rich_table("training step benchmark", rows, list(rows[0]))
    return 0


# --------------------------------------------------------------------------------------------
# bench-infer


def _bench_infer_arguments(p: argparse.ArgumentParser) -> None:
    """The `mor-bench bench-infer` options (defaults: `InferSettings`)."""
    from evals.suite.spec import SCHEDULER_CHOICES, THROUGHPUT_MODEL_CHOICES, InferSettings

    d = InferSettings()
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint directories, or suite run directories (all their runs)")
    p.add_argument("--samples", type=positive_int, default=d.samples,
                   help=f"sequences per model and round (default {d.samples}; paper 1000)")
    p.add_argument("--gen-mean", type=float, default=d.gen_mean,
                   help=f"mean generation length (default {d.gen_mean:g}; paper 256)")
    p.add_argument("--gen-std", type=float, default=d.gen_std,
                   help=f"std of the generation length (default {d.gen_std:g})")
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="cache length per sequence (default: longest drawn length + 1)")
    p.add_argument("--batch-size", default=str(d.batch_size),
                   help="sequence slots: an integer, or 'max' = the largest batch whose "
                        "parameter + KV-cache bytes fit --memory-budget-mb (default 32)")
    p.add_argument("--memory-budget-mb", type=float, default=None,
                   help="memory per model for --batch-size max (default: what the vanilla "
                        "model needs at --reference-batch)")
    p.add_argument("--reference-batch", type=positive_int, default=d.reference_batch,
                   help="the vanilla batch that defines the default budget (default 32)")
    p.add_argument("--repeats", type=positive_int, default=d.repeats,
                   help="timed rounds per model, interleaved; medians (default 3)")
    p.add_argument("--seed", type=nonneg_int, default=d.seed)
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="sampling temperature, 0 = greedy (default 1)")
    p.add_argument("--kv-capacity", choices=("routed", "full"), default=d.kv_capacity,
                   help="MoR cache per recursion step: routed = c_r * max_len tokens (the "
                        "paper's memory), full = max_len (default routed)")
    p.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=d.scheduler,
                   help="MoR: depth-wise batching, sequence-wise, both, or auto: the one the "
                        "throughput model predicts is faster here (default auto; depth-wise "
                        "without a model)")
    p.add_argument("--throughput-model", choices=THROUGHPUT_MODEL_CHOICES,
                   default=d.throughput_model,
                   help="project each measurement and print its roofline card: auto (CPU: "
                        "calibrate this CPU first, ~12 s; H100/H200/A100: datasheet "
                        "figures), quick (~1 s CPU calibration), off (default auto)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=d.device,
                   help="where to decode (default cpu)")
    p.add_argument("--profile", action="store_true",
                   help="also report the seconds each decoding stage took")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def settings_from_args(args):
    """The `InferSettings` of a `mor-bench bench-infer` command line."""
    from evals.suite.spec import InferSettings
    from mor.errors import ConfigError

    batch: int | str = args.batch_size
    if batch != "max":
        try:
            batch = int(batch)
        except ValueError:
            raise ConfigError(f"--batch-size {args.batch_size!r}: an integer or 'max'") from None
    return InferSettings(samples=args.samples, gen_mean=args.gen_mean, gen_std=args.gen_std,
                         max_len=args.max_len, batch_size=batch,
                         memory_budget_mb=args.memory_budget_mb,
                         reference_batch=args.reference_batch, repeats=args.repeats,
                         seed=args.seed, temperature=args.temperature,
                         kv_capacity=args.kv_capacity, scheduler=args.scheduler,
                         threads=args.threads, device=args.device,
                         throughput_model=args.throughput_model)


def table_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    """Display rows of a `bench_models` result."""
    rows = []
    for r in res["rows"]:
        rows.append({
            "model": r["model"], "layers": r["layers"], "scheduler": r["scheduler"],
            "batch": str(r["batch_size"]), "tokens/s": f"{r['tokens_per_s']:,.0f}",
            "vs vanilla": (f"{r['rel_tokens_per_s']:.2f}x" if r["rel_tokens_per_s"]
                           else "-"),
            "ms/token": f"{r['ms_per_token']:.3f}",
            "ms/iter": f"{r['ms_per_iteration']:.2f}",
            "KV MiB": f"{r['kv_cache_bytes'] / 2**20:.2f}",
            "params MiB": f"{r['param_bytes'] / 2**20:.2f}",
            "mean depth": f"{r['mean_depth']:.2f}" if r["mean_depth"] is not None else "-",
            "fill": (f"{100 * r['shared_batch_fill']:.0f}%"
                     if r["shared_batch_fill"] is not None else "-"),
            "capped": f"{100 * r['capped_frac']:.1f}%" if r["family"] == "mor" else "-",
        })
    return rows


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def card_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    """The roofline card of every row: the throughput model's projection of the same workload
    on this device beside the measurement (never mixed into the measured columns)."""
    rows = []
    for r in res["rows"]:
        c = r.get("modelled")
        if not c:
            continue
        rows.append({
            "model": r["model"], "scheduler": r["scheduler"],
            "measured tok/s": f"{r['tokens_per_s']:,.0f}",
            "modelled tok/s": _num(c["modelled_tokens_per_s"], "{:,.0f}"),
            "model error": _num(c.get("model_error"), "{:+.1%}"),
            "weights MiB/iter": _num(c["weight_bytes_per_iteration"] / 2**20, "{:.2f}"),
            "KV read MiB/iter": _num(c["kv_read_bytes_per_iteration"] / 2**20, "{:.3f}"),
            "calls/iter": _num(c["calls_per_iteration"], "{:,.0f}"),
            "BW ceiling tok/s": _num(c["ceiling_memory_tokens_per_s"], "{:,.0f}"),
            "MBU": _num(c.get("mbu"), "{:.1%}"), "MFU": _num(c.get("mfu"), "{:.2%}"),
            "bound": c.get("bound") or "-",
        })
    return rows


def cmd_bench_infer(args) -> int:
    """Generation throughput of checkpoints side by side: the paper's workload (samples from
    no prompt, lengths ~ Normal(mean, std)), vanilla/recursive under continuous
    sequence-wise batching, MoR under continuous depth-wise batching; rounds interleaved
    (A B A B), medians. The headline is tokens/s relative to the vanilla model of the same
    depth in the same process -- quote ratios, not absolute times, on shared machines.

      mor-bench bench-infer runs/smoke-latest
      mor-bench bench-infer runs/smoke-latest --batch-size max --scheduler both --profile"""
    from evals.perf.generation import bench_models, load_models

    settings = settings_from_args(args)
    models = load_models(args.checkpoints)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"bench-infer: {len(models)} model(s), {settings.samples} samples x "
        f"~{settings.gen_mean:g} tokens, {settings.repeats} interleaved round(s)")
    res = bench_models(models, settings, log=log, profile=args.profile)
    if args.json:
        print_json(res)
        return 0
    budget = (f", memory budget {res['budget_bytes'] / 2**20:.1f} MiB"
              if res["budget_bytes"] else "")
    print(f"{sum(res['lengths']):,} tokens per model and round, cache max_len "
          f"{res['max_len']}{budget}, {res['torch_threads']} torch threads")
    rows = table_rows(res)
    rich_table("generation throughput (medians, measured)", rows, list(rows[0]))
    for r in res["rows"]:
        ch = r.get("scheduler_choice")
        if ch:
            print(f"  {r['model']}: scheduler auto -> {ch['chosen']} ({ch['why']})")
        if r.get("selected_fractions"):
            fr = ", ".join(f"{100 * f:.1f}%" for f in r["selected_fractions"])
            print(f"  {r['model']} ({r['scheduler']}): tokens taking recursion steps 1.. "
                  f"{fr}")
    cards = card_rows(res)
    tm = res.get("throughput_model") or {}
    if cards:
        rich_table(f"roofline card: the throughput model's projection (model, not measured; "
                   f"{tm.get('source')})", cards, list(cards[0]))
    elif tm:
        print(f"  no throughput model: {tm.get('source')}")
    if args.profile:
        for r in res["rows"]:
            st = r.get("stage_s") or {}
            rest = r["times_s"][-1] - sum(st.values())
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in st.items())
            print(f"  {r['model']} ({r['scheduler']}), last round: {parts}, "
                  f"scheduling/other {rest:.2f}s")
    return 0
