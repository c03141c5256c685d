"""`mor-bench run`, `report` and `check`: train a suite, render its report, gate it.

`report` and `check` read records only: this module imports nothing heavy at load time, so
`mor-bench report RUN_DIR` runs without torch, the model code or lm-eval.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from evals.cli.display import PlainLog, check_table, print_json, rich_table


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    if command == "run":
        p.add_argument("suite", help="a built-in suite name (see `mor-bench suites`) or a "
                       "TOML file")
        p.add_argument("--out", default="runs", help="parent directory of run directories "
                       "(default: runs/)")
        p.add_argument("--corpus", help="override the suite's corpus: 'synthetic', a .txt/"
                       ".jsonl/.jsonl.gz file, a directory, a glob, or "
                       "hf:DATASET[:CONFIG][@SPLIT]")
        p.add_argument("--cache-dir", help="tokenizer/data cache (default: $MOR_BENCH_CACHE "
                       "or ~/.cache/mor-bench)")
        p.add_argument("--dry-run", action="store_true", help="print the plan (params, "
                       "FLOPs, tokens, steps per model) and exit without training")
        p.add_argument("--resume", metavar="RUN_DIR", help="continue this suite run "
                       "directory (after a kill, SIGTERM or preemption): finished runs are "
                       "kept, an interrupted run resumes from its newest checkpoint, a failed "
                       "run is retried once; SUITE must be the same suite")
        p.add_argument("--threads", type=_positive_int, metavar="N", help="torch threads "
                       "per run process, overriding the suite's [train] threads (on a busy "
                       "machine: fewer threads than free cores keep timings uncontended)")
        p.add_argument("--json", action="store_true", help="print JSON on stdout (logs go "
                       "to stderr)")
    elif command == "report":
        p.add_argument("run_dir", help="a directory written by `mor-bench run`")
        p.add_argument("--screenshot", action="store_true", help="also save "
                       "RUN_DIR/report.png, the page as headless Chromium renders it (needs "
                       "chromium on PATH)")
        p.add_argument("--json", action="store_true", help="machine-readable output (paths)")
    elif command == "check":
        p.add_argument("run_dir", help="a directory written by `mor-bench run`")
        p.add_argument("--baseline", required=True, metavar="FILE", help="baseline JSON, "
                       "e.g. reports/baselines/smoke.json")
        p.add_argument("--update", action="store_true", help="(re)write FILE from this run "
                       "(keeping its tolerances) instead of checking")
        p.add_argument("--strict-timing", action="store_true", help="judge timing ratios "
                       "measured on a contended machine too (by default one beyond tolerance "
                       "is shown as 'contended' and does not fail the gate)")
        p.add_argument("--json", action="store_true", help="the comparison as JSON on stdout")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _dry_run(args: argparse.Namespace, suite) -> int:
    from evals.suite.runner import dry_run

    if args.corpus:
        from evals.data.corpus import check_corpus

        check_corpus(args.corpus)
    rows = dry_run(suite)
    if args.json:
        print_json(rows)
        return 0
    shown = [{"run_id": r["run_id"], "family": r["family"], "layers": r["layers"],
              "N_r": r["num_recursions"],
              "unique params": f"{r['params_unique'] / 1e6:,.2f}M",
              "non-emb params": f"{r['params_non_embedding'] / 1e6:,.2f}M",
              "FLOPs/tok": f"{r['flops_per_token_paper']:.3g}",
              "tokens": f"{r['tokens']:.4g}", "steps": r["steps"],
              "batch tokens": r["batch_tokens"]} for r in rows]
    if any(r.get("init") for r in rows):  # uptraining: where each run starts from
        for row, r in zip(shown, rows):
            row["init"] = r.get("init") or "-"
    rich_table(f"plan for suite {suite.name} (forward FLOPs, paper convention)",
               shown, list(shown[0]))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Train every model of a suite under its budget, then write records and a report."""
    from evals.suite.spec import load_suite

    suite = load_suite(args.suite)
    if args.threads is not None:  # the suite text (and so --resume's check) is unchanged
        import dataclasses

        suite = dataclasses.replace(
            suite, train=dataclasses.replace(suite.train, threads=args.threads))
    from evals.suite.runner import DEFAULT_CACHE, check_eval_tasks
    from evals.suite.spec import check_corpus

    cache = Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE
    # Plan-time checks, dry run and real run alike, before any data or compute. (A resumed
    # run reuses its directory's prepared data: no corpus to check.)
    if not args.resume:
        check_corpus(suite, args.corpus)
    # A dry run plans without the offline benchmark copies (a note says they are needed).
    for note in check_eval_tasks(suite, cache, require_offline=not args.dry_run):
        print(f"mor-bench: note: {note}", file=sys.stderr)
    if args.dry_run:
        return _dry_run(args, suite)

    from evals.cli.display import SuiteProgress
    from evals.suite.runner import run_suite
    from reports.html import build_report
    from reports.table import format_table

    # A live table on a terminal; plain log lines otherwise (CI logs, pipes).
    progress = SuiteProgress()
    plain = PlainLog(out=sys.stderr if args.json else None, live=progress.live)

    def on_event(event) -> None:
        progress(event)
        plain(event)

    if progress.live and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 draws
        progress.start()
    from evals.suite.runner import SuiteInterrupted
    from evals.training.distributed import env_world_size

    try:
        run_dir, records, failed = run_suite(
            suite, Path(args.out), corpus=args.corpus, cache_dir=cache, on_event=on_event,
            live=progress.live, resume=Path(args.resume) if args.resume else None,
            warn_busy=True)
    except SuiteInterrupted as e:
        progress.stop()
        print(f"mor-bench: interrupted; state saved. Resume with: mor-bench run "
              f"{args.suite} --resume {e.run_dir}", file=sys.stderr)
        # SIGTERM (a scheduler's preemption) is an orderly stop: exit 0, resumable.
        return 0 if e.signum == signal.SIGTERM else 130
    finally:
        progress.stop()
    if env_world_size() > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 1 if failed else 0  # rank 0 reports
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
        print_json({"run_dir": str(run_dir), "report": report["markdown"],
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
    from evals.cli.errors import UsageError
    from reports.html import build_report, find_browser
    from reports.table import to_markdown

    if args.screenshot and find_browser() is None:
        from reports.html import NO_BROWSER

        raise UsageError(f"--screenshot: {NO_BROWSER}")
    report = build_report(args.run_dir, screenshot=args.screenshot)
    table = report.pop("table")
    if args.json:
        print_json({**report, "table": json.loads(table.to_json(orient="records"))})
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
    when measured, few-shot accuracy per task (judged with its stderr). A timing ratio
    measured on a contended machine that falls beyond tolerance shows "contended" and does
    not fail the gate unless --strict-timing."""
    from reports.gate import check_run, summary_line, write_baseline

    if args.update:
        doc = write_baseline(args.run_dir, args.baseline)
        msg = (f"wrote baseline {args.baseline} from {args.run_dir}: {len(doc['models'])} "
               f"models, suite {doc['suite']['name']}")
        if args.json:
            print_json({"updated": True, "baseline": str(args.baseline),
                        "models": sorted(doc["models"])})
            print(msg, file=sys.stderr)
        else:
            print(msg)
        return 0
    result = check_run(args.run_dir, args.baseline, strict_timing=args.strict_timing)
    if args.json:
        print_json(result)
    else:
        check_table(result)
        for note in result["notes"]:
            print(f"note: {note}")
    line = summary_line(result)
    print(line if result["passed"] else f"mor-bench: {line}",
          file=sys.stderr if args.json or not result["passed"] else sys.stdout)
    return 0 if result["passed"] else 1
