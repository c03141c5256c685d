"""The paper's inference-throughput experiment shape on one GPU (docs/gpu.md §6).

    python benchmarks/gpu/infer_throughput.py                    # 360M shapes, one GPU
    python benchmarks/gpu/infer_throughput.py --samples 1000 --json > gpu-infer.json
    python benchmarks/gpu/infer_throughput.py --device cpu --preset micro --samples 8 \
        --gen-mean 12 --gen-std 3                                 # a CPU smoke run

Vanilla against MoR-2/3/4 (expert-choice, recursion-wise KV caching, Middle-Cycle) at the
360M shape, RANDOM weights (throughput does not depend on what the weights learned, only on
the depths the routers give): each MoR model's causal-rule thresholds are calibrated on
random token windows (`mor.calibrate`) so that its recursion steps keep the paper's
capacities -- the depths a trained model would reach. The workload is the paper's: samples
generated from no prompt (one start token), lengths ~ Normal(gen_mean, gen_std), sampled
at temperature 1 (random weights give near-uniform next-token distributions, so the
generated text is random tokens, like the calibration windows, and the calibrated depths
hold; greedy decoding of random weights repeats one token and collapses every depth),
continuous batching -- vanilla sequence-wise, MoR sequence-wise and depth-wise -- at batch
32 and at "max": the largest batch whose parameter + KV-cache bytes fit the memory vanilla
needs at batch 32 (the paper: MoR-2/3/4 at 42/48/51). Each configuration: one untimed
warm-up, then every sample decoded once, timed with the device synchronised.

Prints the paper-layout table (tokens/s and the speedup over vanilla at the same batch
setting; the paper's headline: MoR-4 at its max batch 2.06x on one H100) and, beside it, the
analytic throughput model's projection for the same settings (`evals.perf.throughput_model`,
with the device's datasheet profile): measured and modelled are separate columns.

The default --samples (300) keeps the 14 configurations under about 8 minutes on an
H100-class GPU; --samples 1000 is the paper's count (about 3x longer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evals.perf.generation import BenchModel, draw_lengths, memory_plan  # noqa: E402
from evals.suite.spec import InferSettings  # noqa: E402
from evals.training.device import configure_backend, hardware_info, resolve_device  # noqa: E402
from mor import ModelConfig, build_model  # noqa: E402
from mor.calibrate import calibrate_thresholds, selected_fractions  # noqa: E402
from mor.decode import Engine, Request  # noqa: E402
from mor.routing import use_knob  # noqa: E402

MODELS: dict[str, dict] = {
    "vanilla": dict(family="vanilla"),
    "mor-2": dict(family="mor", num_recursions=2),
    "mor-3": dict(family="mor", num_recursions=3),
    "mor-4": dict(family="mor", num_recursions=4),
}
PAPER = {("mor-4", "max"): 2.06}
"""The paper's reported speedups over vanilla (arXiv 2507.10524 §4 / docs/protocol.md §6)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    ap.add_argument("--preset", default="360m")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--samples", type=int, default=300, help="sequences per configuration "
                    "(paper 1000)")
    ap.add_argument("--gen-mean", type=float, default=256.0)
    ap.add_argument("--gen-std", type=float, default=64.0)
    ap.add_argument("--batches", default="32,max", help="comma-separated: integers and/or max")
    ap.add_argument("--schedulers", default="sequence,depth",
                    help="MoR schedulers (vanilla always decodes sequence-wise)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                    help="weights and cache (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--calib-windows", type=int, default=32,
                    help="random token windows of 256 tokens for threshold calibration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--project-on", default="h100-sxm",
                    help="comma-separated device profiles to project every configuration "
                         "on besides the device measured (h100-sxm, h200, a100-80gb; '' for "
                         "none; default h100-sxm, the paper's GPU)")
    ap.add_argument("--model-only", action="store_true",
                    help="measure nothing: only the throughput model's projection on the "
                         "--project-on profiles, depths drawn at the paper's capacities "
                         "(seconds on any machine, no GPU needed)")
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    args = ap.parse_args(argv)
    args.project_on = [x.strip() for x in args.project_on.split(",") if x.strip()]
    from evals.perf.throughput_model import DEVICE_PROFILES
    bad = [x for x in args.project_on if x not in DEVICE_PROFILES]
    if bad:
        ap.error(f"--project-on: unknown profile(s) {bad}; known: {', '.join(DEVICE_PROFILES)}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or "vanilla" not in args.models:
        ap.error(f"--models: from {', '.join(MODELS)}, vanilla included; got {args.models}")
    args.batches = [b.strip() for b in args.batches.split(",") if b.strip()]
    for b in args.batches:
        if b != "max" and not (b.isdigit() and int(b) >= 1):
            ap.error(f"--batches: integers >= 1 or max, got {b!r}")
    args.schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    if not set(args.schedulers) <= {"sequence", "depth"} or not args.schedulers:
        ap.error("--schedulers: sequence and/or depth")
    return args


def build(name: str, preset: str, device, dtype, calib: int, seed: int, log):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset(preset, **MODELS[name])
    model = build_model(cfg).to(device).eval()
    info = {"layers": cfg.layer_plan, "params": sum(p.numel() for p in model.parameters())}
    if cfg.family == "mor":
        g = torch.Generator().manual_seed(seed + 1)
        t = min(256, cfg.max_seq_len)
        cal = torch.randint(0, cfg.vocab_size, (calib, t), generator=g).to(device)
        held = torch.randint(0, cfg.vocab_size, (max(2, calib // 2), t), generator=g).to(device)
        knob = calibrate_thresholds(model, cal)
        model.set_knob(knob)
        info["thresholds"] = list(knob.thresholds)
        info["target_fractions"] = list(cfg.step_capacities)
        info["held_out_fractions"] = list(selected_fractions(model, held, knob))
        log(f"  {name}: thresholds calibrated to {[round(c, 3) for c in cfg.step_capacities]}"
            f" -> held-out {[round(f, 3) for f in info['held_out_fractions']]}")
    return model.to(dtype), info


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = resolve_device(args.device)
    backend = configure_backend(device, deterministic=False)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    models, infos = {}, {}
    for name in args.models:
        models[name], infos[name] = build(name, args.preset, device, dtype,
                                          args.calib_windows, args.seed, log)
    settings = InferSettings(samples=args.samples, gen_mean=args.gen_mean,
                             gen_std=args.gen_std, seed=args.seed, temperature=1.0,
                             batch_size="max", reference_batch=32, kv_capacity="routed")
    cap = min(m.cfg.max_seq_len for m in models.values()) - 1
    lengths = draw_lengths(settings, cap)
    max_len = max(lengths) + 1
    bench = [BenchModel(n, m, 0, "random init") for n, m in models.items()]
    max_batches, budget = memory_plan(bench, settings, max_len)
    rows = []
    for batch_setting in args.batches:
        for (name, model), mb in zip(models.items(), max_batches):
            batch = mb if batch_setting == "max" else int(batch_setting)
            batch = min(batch, len(lengths))
            scheds = ["sequence"] if model.cfg.family != "mor" else args.schedulers
            with use_knob(model, model.knob):
                engine = Engine(model, max_batch=batch, max_len=max_len, temperature=1.0)
            requests = [Request(prompt=[0], max_new_tokens=n, id=i, seed=args.seed + i)
                        for i, n in enumerate(lengths)]
            for sched in scheds:
                engine.generate(requests[: max(1, min(batch, len(requests)) // 2)], sched)
                sync(device)
                t0 = time.perf_counter()
                outs = engine.generate(requests, sched)
                sync(device)
                dt = time.perf_counter() - t0
                depths = [d for o in outs for d in o.depths]
                row = {"model": name, "batch_setting": batch_setting, "batch": batch,
                       "scheduler": sched, "tokens": sum(lengths), "time_s": dt,
                       "tokens_per_s": sum(lengths) / dt,
                       "iterations": engine.stats["iterations"],
                       "mean_depth": sum(depths) / len(depths) if depths else None,
                       "capped_frac": engine.stats["capped"] / max(1, engine.stats["passes"]),
                       "kv_cache_bytes": engine.cache.nbytes(),
                       "depth_trace": [o.depths for o in outs] if depths else None}
                rows.append(row)
                log(f"  {name} batch {batch} ({batch_setting}) {sched}: "
                    f"{row['tokens_per_s']:,.0f} tokens/s in {dt:.1f}s")
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in rows:
        ref = next(x for x in rows if x["model"] == "vanilla"
                   and x["batch_setting"] == r["batch_setting"])
        r["speedup"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["paper_speedup"] = PAPER.get((r["model"], r["batch_setting"]))
    projection = project_rows(rows, models, lengths, max_len, device, args.project_on)
    for r in rows:
        r.pop("depth_trace")
    return {"settings": {k: v for k, v in vars(args).items() if k != "json"},
            "dtype": str(dtype), "device": str(device), "backend": backend,
            "hardware": hardware_info(), "memory_budget_bytes": budget,
            "lengths_total": sum(lengths), "max_len": max_len, "models": infos,
            "rows": rows, "projection": projection}


def model_only(args) -> dict:
    """The projection alone: models built on the meta device (shapes, no memory), the
    paper's workload and memory plan, every token's depth drawn from the capacities."""
    from evals.perf.throughput_model import Workload, device_profile, project

    if not args.project_on:
        raise SystemExit("--model-only needs at least one --project-on profile")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or "bf16"]
    models = {}
    with torch.device("meta"):
        for name in args.models:
            models[name] = build_model(ModelConfig.from_preset(args.preset, **MODELS[name]))
            models[name] = models[name].to(dtype)
    settings = InferSettings(samples=args.samples, gen_mean=args.gen_mean,
                             gen_std=args.gen_std, seed=args.seed, temperature=1.0,
                             batch_size="max", reference_batch=32, kv_capacity="routed")
    lengths = draw_lengths(settings, min(m.cfg.max_seq_len for m in models.values()) - 1)
    max_len = max(lengths) + 1
    bench = [BenchModel(n, m, 0, "shapes only") for n, m in models.items()]
    max_batches, budget = memory_plan(bench, settings, max_len)
    out = []
    for prof in (device_profile(n) for n in args.project_on):
        for batch_setting in args.batches:
            for (name, model), mb in zip(models.items(), max_batches):
                batch = min(mb if batch_setting == "max" else int(batch_setting), len(lengths))
                wl = Workload.from_lengths(lengths, model.cfg, max_len=max_len,
                                           kv_capacity="routed", seed=args.seed,
                                           bytes_per_elem=dtype.itemsize)
                for sched in (["sequence"] if model.cfg.family != "mor" else args.schedulers):
                    proj = project(model.cfg, wl, sched, batch, prof)
                    out.append(_entry(proj, prof, False, name, batch_setting, batch, sched))
    _speedups(out)
    for p in out:
        p["paper_speedup"] = PAPER.get((p["model"], p["batch_setting"]))
    return {"settings": {k: v for k, v in vars(args).items() if k != "json"},
            "dtype": str(dtype), "memory_budget_bytes": budget,
            "lengths_total": sum(lengths), "max_len": max_len, "rows": [], "projection": out}


def print_projection(res: dict) -> None:
    print(f"model only (nothing measured): {res['settings']['preset']} shapes, "
          f"{res['dtype']}, {res['settings']['samples']} samples, lengths ~ "
          f"N({res['settings']['gen_mean']:g}, {res['settings']['gen_std']:g}), memory "
          f"budget {res['memory_budget_bytes'] / 2**20:,.0f} MiB, depths at the capacities")
    for p in res["projection"]:
        paper = f" (paper {p['paper_speedup']:.2f}x)" if p.get("paper_speedup") else ""
        print(f"  {p['profile']:22} {p['model']:8} "
              f"{str(p['batch']) + ' (' + p['batch_setting'] + ')':>9} {p['scheduler']:9}"
              f" {p['tokens_per_s']:>10,.0f} tokens/s {p['speedup']:>5.2f}x vanilla{paper},"
              f" bound: {p['bound']}")


def project_rows(rows, models, lengths, max_len, device, also: list[str]) -> list[dict]:
    """The analytic throughput model's tokens/s for every measured configuration (same
    requests, same per-token depths, same batch and scheduler) -- "model, not measured":
    on the device measured (a GPU's datasheet profile; a quick calibration of a CPU) and on
    each profile named in `also` (e.g. the paper's H100), in bf16 there."""
    from evals.perf.generation import device_profile_for
    from evals.perf.throughput_model import Workload, device_profile, project

    profiles = []  # (profile, element size or None = the profile's)
    here, _ = device_profile_for(InferSettings(throughput_model="quick"), device)
    if here is not None:
        profiles.append((here, None))
    profiles += [(device_profile(name), None) for name in also
                 if here is None or device_profile(name).name != here.name]
    out = []
    for prof, _ in profiles:
        measured_here = prof is here
        for r in rows:
            model = models[r["model"]]
            elem = next(model.parameters()).element_size() if measured_here else None
            wl = Workload(list(lengths), r["depth_trace"], max_len=max_len, temperature=1.0,
                          kv_capacity="routed", bytes_per_elem=elem)
            proj = project(model.cfg, wl, r["scheduler"], r["batch"], prof)
            out.append(_entry(proj, prof, measured_here, r["model"], r["batch_setting"],
                              r["batch"], r["scheduler"]))
    _speedups(out)
    return out


def _entry(proj: dict, prof, measured_here: bool, name: str, batch_setting: str, batch: int,
           scheduler: str) -> dict:
    """One projected configuration, labelled as a model."""
    share = proj["breakdown_share"]
    return {"profile": prof.name, "device_measured": measured_here,
            "label": "model, not measured", "model": name, "batch_setting": batch_setting,
            "batch": batch, "scheduler": scheduler, "mean_depth": proj["mean_depth"],
            "tokens_per_s": proj["tokens_per_s"], "ms_per_iteration": proj["ms_per_iteration"],
            "bound": max(share, key=share.get) if share else None}


def _speedups(out: list[dict]) -> None:
    """Each projection's tokens/s over vanilla's on the same profile and batch setting."""
    for p in out:
        ref = next(x for x in out if x["profile"] == p["profile"] and x["model"] == "vanilla"
                   and x["batch_setting"] == p["batch_setting"])
        p["speedup"] = p["tokens_per_s"] / ref["tokens_per_s"]


def print_table(res: dict) -> None:
    print(f"{res['hardware'].get('gpu') or res['hardware'].get('cpu')} ({res['device']}, "
          f"{res['dtype']}), {res['settings']['samples']} samples, lengths ~ "
          f"N({res['settings']['gen_mean']:g}, {res['settings']['gen_std']:g}), "
          f"memory budget {res['memory_budget_bytes'] / 2**20:,.0f} MiB")
    projection = res.get("projection") or []
    here = {(p["model"], p["batch_setting"], p["scheduler"]): p
            for p in projection if p["device_measured"]}
    head = (f"{'model':10} {'batch':>9} {'scheduler':9} {'depth':>5} {'tokens/s':>10} "
            f"{'vs vanilla':>10} {'paper':>6} | {'model tok/s':>11} {'model vs van':>12}")
    print(head)
    print("-" * len(head))
    for r in res["rows"]:
        p = here.get((r["model"], r["batch_setting"], r["scheduler"]))
        depth = f"{r['mean_depth']:.2f}" if r["mean_depth"] is not None else "-"
        paper = f"{r['paper_speedup']:.2f}x" if r["paper_speedup"] else "-"
        model = f"{p['tokens_per_s']:,.0f}" if p else "-"
        model_x = f"{p['speedup']:.2f}x" if p else "-"
        print(f"{r['model']:10} {str(r['batch']) + ' (' + r['batch_setting'] + ')':>9} "
              f"{r['scheduler']:9} {depth:>5} {r['tokens_per_s']:>10,.0f} "
              f"{r['speedup']:>9.2f}x {paper:>6} | {model:>11} {model_x:>12}")
    print("left of |: measured; right: the throughput model on this device (model, not "
          "measured)")
    for name in dict.fromkeys(p["profile"] for p in projection if not p["device_measured"]):
        print(f"\nprojection on {name} (model, not measured; the measured depths and "
              "batches, bf16):")
        for p in projection:
            if p["profile"] == name:
                print(f"  {p['model']:10} {str(p['batch']) + ' (' + p['batch_setting'] + ')':>9}"
                      f" {p['scheduler']:9} {p['tokens_per_s']:>10,.0f} tokens/s "
                      f"{p['speedup']:>6.2f}x vanilla, bound: {p['bound']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = model_only(args) if args.model_only else run(args)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    elif args.model_only:
        print_projection(res)
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
