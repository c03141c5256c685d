"""`mor-bench sweep`: the efficiency knob of one trained MoR checkpoint (`evals.perf.sweep`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evals.cli.display import print_json, rich_table
from evals.cli.errors import nonneg_int, positive_int


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    import dataclasses
    from types import SimpleNamespace

    from evals.suite.spec import KNOBS, SweepSettings

    d = SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(SweepSettings)})
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a MoR run directory (holds model.safetensors), e.g. "
                        "runs/infer-cpu-latest/mor-3-1.2e12F-s0")
    p.add_argument("--knob", choices=KNOBS, required=True,
                   help="threshold / capacity (expert-choice), depth-bias (token-choice)")
    p.add_argument("--values", default="",
                   help="comma-separated knob values, one point each; a value is a number "
                        "(inf, -inf allowed) or a per-step list a:b:c (see below); write "
                        "--values=-1,0,1 when the first value starts with a minus")
    p.add_argument("--calibrate", action="store_true",
                   help="threshold knob: the values are target mean depths (or per-step "
                        "fractions); thresholds are picked on held-out windows. No values: "
                        "one point at the trained capacities")
    p.add_argument("--reference", action="append", default=None, metavar="CHECKPOINT",
                   help="a vanilla/recursive checkpoint measured alike (repeat; default: "
                        "the vanilla and recursive runs of the checkpoint's suite run)")
    p.add_argument("--no-references", action="store_true", help="measure no reference model")
    p.add_argument("--windows", help="held-out token windows, a .npy of shape [N, T+1] "
                   "(default: the suite run's data/val.npy)")
    p.add_argument("--tasks", default=",".join(d.tasks),
                   help=f"lm-eval tasks scored at each point (default {','.join(d.tasks)}; "
                        "'none' to skip)")
    p.add_argument("--limit", type=positive_int, default=d.limit,
                   help="items per task (default 100)")
    p.add_argument("--num-fewshot", type=nonneg_int, default=d.num_fewshot)
    p.add_argument("--samples", type=positive_int, default=d.samples,
                   help=f"sequences decoded per point and round (default {d.samples})")
    p.add_argument("--gen-mean", type=float, default=d.gen_mean)
    p.add_argument("--gen-std", type=float, default=d.gen_std)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"decode slots, the same for every point (default {d.batch_size})")
    p.add_argument("--repeats", type=positive_int, default=d.repeats,
                   help="interleaved timing rounds; medians (default 3)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--seed", type=nonneg_int, default=d.seed)
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    p.add_argument("--cache-dir", help="where generated few-shot tasks live (default: "
                   "$MOR_BENCH_CACHE or ~/.cache/mor-bench)")
    p.add_argument("--out", help="output directory for sweep.json and the figure (default: "
                   "CHECKPOINT/sweeps/KNOB[-calibrated])")
    p.add_argument("--json", action="store_true", help="print the sweep document on stdout")


def settings_from_args(args):
    from evals.suite.spec import SweepSettings

    values = tuple(v.strip() for v in args.values.split(",") if v.strip())
    tasks = () if args.tasks.strip().lower() == "none" else tuple(
        t.strip() for t in args.tasks.split(",") if t.strip())
    return SweepSettings(knob=args.knob, values=values, calibrate=args.calibrate, tasks=tasks,
                         limit=args.limit, num_fewshot=args.num_fewshot, samples=args.samples,
                         gen_mean=args.gen_mean, gen_std=args.gen_std,
                         batch_size=args.batch_size, repeats=args.repeats,
                         temperature=args.temperature, seed=args.seed, threads=args.threads)


def table_rows(res) -> list[dict[str, str]]:
    from reports.sweep import sweep_rows

    return sweep_rows(res)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Turn MoR's efficiency knob on ONE trained checkpoint -- no retraining -- and measure,
    at each setting: validation NLL, few-shot accuracy, mean recursion depth, KV bytes per
    token and generation tokens/s (the decode engine; every point and the reference models
    timed in interleaved rounds in one process). Writes sweep.json and the accuracy-vs-
    throughput Pareto figure.

    knobs (docs/routing.md "The efficiency knob"):
      threshold             the causal rule's logit threshold per routed step (larger =
                            shallower); values: numbers or per-step lists a:b:c
      threshold --calibrate values are target MEAN DEPTHS (or per-step fractions): the
                            thresholds are calibrated on held-out windows to hit them
      capacity              top-k evaluation capacities from a target mean depth (or a:b:c);
                            decoding uses thresholds calibrated to the same fractions
      depth-bias            token-choice: b adds b*i to depth i+1's router score (larger =
                            deeper)

    examples:
      mor-bench sweep runs/infer-cpu-latest/mor-3-1.2e12F-s0 --knob threshold --calibrate \\
          --values 1.25,1.5,2,2.5,3
      mor-bench sweep RUN/mor-3-... --knob threshold --values=-1,0,1,inf --tasks none --json"""
    from evals.perf.sweep import (
        held_out_windows,
        load_sweep_model,
        run_sweep,
        suite_references,
    )
    from evals.suite.record import write_json_atomic
    from mor.errors import MorBenchError
    from reports.sweep import render_sweep

    settings = settings_from_args(args)
    target = load_sweep_model(args.checkpoint)
    if args.no_references:
        ref_paths = []
    elif args.reference is not None:
        ref_paths = [Path(r) for r in args.reference]
    else:
        ref_paths = suite_references(args.checkpoint)
    refs = [load_sweep_model(r) for r in ref_paths]
    for r in refs:
        if r.model.cfg.family == "mor":
            raise MorBenchError(f"--reference {r.source}: a reference is a vanilla or "
                                "recursive model; sweep a MoR model as the CHECKPOINT")
    windows = held_out_windows(args.checkpoint, args.windows)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"sweep: {target.name}, knob {settings.knob}"
        f"{' (calibrated)' if settings.calibrate else ''}, "
        f"{len(settings.values) or 1} point(s), references: "
        f"{', '.join(r.name for r in refs) or 'none'}")
    res = run_sweep(target, refs, windows, settings,
                    cache_dir=Path(args.cache_dir) if args.cache_dir else None, log=log)
    out = Path(args.out) if args.out else (
        Path(target.source) / "sweeps" / (settings.knob
                                           + ("-calibrated" if settings.calibrate else "")))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", res)
    figures = render_sweep(res, out)
    if args.json:
        print_json(res)
        return 0
    rows = table_rows(res)
    rich_table(f"{target.name}: {settings.knob} sweep (tokens/s: medians of "
               f"{settings.repeats} interleaved rounds)", rows, list(rows[0]))
    print(f"wrote {out / 'sweep.json'}" + "".join(f", {f}" for f in figures))
    return 0
