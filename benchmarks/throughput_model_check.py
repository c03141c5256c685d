"""Does the analytic throughput model (evals/perf/throughput_model.py) predict bench-infer?

    .venv/bin/python benchmarks/throughput_model_check.py runs/infer-cpu-*/   # a suite run
    .venv/bin/python benchmarks/throughput_model_check.py CKPT_A CKPT_B --samples 64
    .venv/bin/python benchmarks/throughput_model_check.py          # random-init infer-cpu shapes
    .venv/bin/python benchmarks/throughput_model_check.py --json   # one JSON object

Measures bench-infer (`evals.perf.generation.bench_models`: the infer-cpu workload by default --
128 samples, lengths ~ N(128, 32), temperature 1, batch "max" under the memory vanilla needs
at batch 32, both schedulers) on the given checkpoints, or on randomly initialised models of
the infer-cpu shapes (vanilla and MoR-2/3/4 and MoR-4 with KV sharing, 14 layers, d=128;
random routers give some depth distribution too). Then decodes the same requests once more
per model and scheduler to record every token's depth (`Completion.depths`), calibrates
this CPU (`calibrate_cpu`, before and after the benchmark) and prints measured vs modelled
tokens/s per model and scheduler. Exit status 1 if any error exceeds --tolerance (15%).

Clock: with one thread (the default) bench-infer's rounds are timed in CPU time of this
process (`--clock cpu`), like the calibration, so that time other processes take from the
cores of a shared machine does not count; `--clock wall` times them as bench-infer does.
With several threads only wall-clock time means anything (run it on a quiet machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evals.perf import generation  # noqa: E402
from evals.perf.generation import BenchModel, bench_models, load_models  # noqa: E402
from evals.perf.throughput_model import (  # noqa: E402
    Workload,
    calibrate_cpu,
    project,
    roofline_card,
)
from evals.suite.spec import InferSettings  # noqa: E402
from mor import ModelConfig, build_model  # noqa: E402
from mor.decode import Engine, Request  # noqa: E402

INFER_CPU = {  # evals/suite/builtins/infer-cpu.toml
    "vanilla": dict(family="vanilla"),
    "mor-2": dict(family="mor", num_recursions=2),
    "mor-3": dict(family="mor", num_recursions=3),
    "mor-4": dict(family="mor", num_recursions=4),
    "mor-4-share": dict(family="mor", num_recursions=4, kv="share"),
}


def random_models(seed: int = 0) -> list[BenchModel]:
    """Randomly initialised models of the infer-cpu suite's shapes."""
    out = []
    for name, kw in INFER_CPU.items():
        torch.manual_seed(seed)
        cfg = ModelConfig.from_preset("tiny", n_layers=14, max_seq_len=512, **kw)
        out.append(BenchModel(name, build_model(cfg).eval(), 256, f"random init ({name})"))
    return out


@contextlib.contextmanager
def cpu_clock(on: bool):
    """bench_models times its rounds with time.perf_counter: swap in process_time."""
    if not on:
        yield
        return
    saved = generation.time
    generation.time = types.SimpleNamespace(perf_counter=time.process_time)
    try:
        yield
    finally:
        generation.time = saved


def depth_trace(m: BenchModel, scheduler: str, batch: int, lengths: list[int],
                max_len: int, settings: InferSettings) -> tuple[Workload, int]:
    """The workload bench-infer decoded, with every token's depth; and the iterations."""
    engine = Engine(m.model, max_batch=batch, max_len=max_len,
                    kv_capacity=settings.kv_capacity, temperature=settings.temperature)
    reqs = [Request(prompt=[m.bos_id], max_new_tokens=n, id=k,
                    seed=settings.seed * 1_000_003 + k) for k, n in enumerate(lengths)]
    outs = engine.generate(reqs, scheduler)
    wl = Workload.from_completions(outs, max_len=max_len, temperature=settings.temperature,
                                   kv_capacity=settings.kv_capacity)
    return wl, int(engine.stats["iterations"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", help="checkpoints or suite run directories "
                    "(none: random-init infer-cpu shapes)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--gen-mean", type=float, default=128.0)
    ap.add_argument("--gen-std", type=float, default=32.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", default="max")
    ap.add_argument("--reference-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="default: cpu with one thread, else wall")
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    torch.set_num_threads(args.threads)
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print

    models = load_models(args.paths) if args.paths else random_models()
    for m in models:
        m.model.eval()
    batch = args.batch_size if args.batch_size == "max" else int(args.batch_size)
    settings = InferSettings(samples=args.samples, gen_mean=args.gen_mean,
                             gen_std=args.gen_std, batch_size=batch,
                             reference_batch=args.reference_batch, repeats=args.repeats,
                             temperature=1.0, scheduler="both", threads=args.threads,
                             # this script calibrates (before and after) and projects itself
                             throughput_model="off")
    cfg0 = models[0].model.cfg
    shape = dict(d_model=cfg0.d_model, d_ff=cfg0.d_ff, n_heads=cfg0.n_heads,
                 n_kv_heads=cfg0.n_kv_heads)
    log(f"calibrating the CPU ({args.threads} thread(s)) ...")
    profiles = [calibrate_cpu(threads=args.threads, **shape)]
    log(f"bench-infer: {len(models)} model(s), {args.samples} samples, {args.repeats} "
        f"round(s), clock {clock} ...")
    with cpu_clock(clock == "cpu"):
        res = bench_models(models, settings, log=None if args.json else log)
    profiles.append(calibrate_cpu(threads=args.threads, **shape))
    lengths, max_len = res["lengths"], res["max_len"]
    by_name = {m.name: m for m in models}
    out_rows = []
    worst = 0.0
    for row in res["rows"]:
        m = by_name[row["model"]]
        cfg = m.model.cfg
        wl, iters = depth_trace(m, row["scheduler"], row["batch_size"], lengths, max_len,
                                settings)
        projs = [project(cfg, wl, row["scheduler"], row["batch_size"], p) for p in profiles]
        modelled = statistics.mean(p["tokens_per_s"] for p in projs)
        measured = row["tokens_per_s"]
        err = modelled / measured - 1.0
        worst = max(worst, abs(err))
        card = roofline_card(projs[0], measured)
        out_rows.append({
            "model": row["model"], "scheduler": row["scheduler"],
            "batch_size": row["batch_size"], "iterations_measured": row["iterations"],
            "iterations_modelled": projs[0]["iterations"], "iterations_trace": iters,
            "mean_depth": row["mean_depth"], "mean_depth_trace": projs[0]["mean_depth"],
            "measured_tokens_per_s": measured, "modelled_tokens_per_s": modelled,
            "modelled_each_calibration": [p["tokens_per_s"] for p in projs],
            "error": err, "times_s": row["times_s"],
            "breakdown_share": projs[0]["breakdown_share"],
            "roofline": card,
        })
    summary = {
        "clock": clock, "threads": args.threads, "tolerance": args.tolerance,
        "worst_abs_error": worst, "ok": worst <= args.tolerance,
        "settings": res["settings"], "hardware": res["hardware"],
        "profiles": [{k: v for k, v in p.to_dict().items() if k != "details"}
                     for p in profiles],
        "rows": out_rows,
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        p = profiles[0]
        log(f"\nCPU profile: bandwidth {p.mem_bandwidth_bytes_per_s / 1e9:.1f} GB/s, matmul "
            f"{p.matmul_flops_per_s / 1e9:.0f} GFLOP/s, kernel call "
            f"{p.overhead('kernel') * 1e6:.2f} us, host x{p.host_scale:.2f} / "
            f"x{profiles[1].host_scale:.2f}, data x{p.data_scale:.2f} / "
            f"x{profiles[1].data_scale:.2f} (before / after)")
        log(f"{'model':28s} {'sched':8s} {'batch':>5s} {'iters':>11s} {'depth':>5s} "
            f"{'measured':>9s} {'modelled':>9s} {'error':>7s}  {'MBU':>6s} {'MFU':>6s}  bound")
        for r in out_rows:
            depth = f"{r['mean_depth']:.2f}" if r["mean_depth"] is not None else "-"
            it = f"{r['iterations_measured']}/{r['iterations_modelled']}"
            log(f"{r['model']:28s} {r['scheduler']:8s} {r['batch_size']:5d} {it:>11s} "
                f"{depth:>5s} {r['measured_tokens_per_s']:9,.0f} "
                f"{r['modelled_tokens_per_s']:9,.0f} {r['error']:+7.1%}  "
                f"{r['roofline']['mbu']:6.2%} {r['roofline']['mfu']:6.2%}  "
                f"{r['roofline']['bound']}")
        log(f"worst |error| {worst:.1%} (tolerance {args.tolerance:.0%}): "
            f"{'OK' if worst <= args.tolerance else 'FAIL'}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
