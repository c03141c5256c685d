"""`mor-bench publish`: a finished suite run as a study in the repository
(`reports.publish`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from evals.cli.display import print_json
from evals.cli.errors import UsageError


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a suite run directory (from `mor-bench "
                   "run`), e.g. runs/cpu-study-latest")
    p.add_argument("out", metavar="OUT", help="where the study goes, e.g. "
                   "reports/published/cpu-study")
    p.add_argument("--title", help="the study's title (default: \"Study: SUITE\")")
    p.add_argument("--command", action="append", dest="commands", metavar="CMD",
                   help="a command that produced the study, shown verbatim (repeatable; "
                        "default: mor-bench run SUITE)")
    p.add_argument("--discussion", metavar="FILE", help="a Markdown file with the written "
                   "discussion, included in OUT/README.md")
    p.add_argument("--json", action="store_true", help="what was written, as JSON")


def cmd_publish(args: argparse.Namespace) -> int:
    """Copy a suite run's records (never checkpoints, optimizer states or TensorBoard
    events) into OUT, render its report there (report.md, index.html, figures/) and write
    OUT/README.md: the commands, commit, hardware, wall time and compute, the paper's claims
    tested one by one on the seeds (effect, 95% CI, paired t test, verdict) and the written
    discussion (--discussion FILE)."""
    from reports.publish import publish

    discussion = None
    if args.discussion:
        path = Path(args.discussion)
        if not path.is_file():
            raise UsageError(f"--discussion {path}: no such file")
        discussion = path.read_text()
    out = publish(args.run_dir, args.out, title=args.title, commands=args.commands,
                  discussion=discussion)
    if args.json:
        print_json({k: v for k, v in out.items() if k != "report"})
    else:
        print(f"published {len(out['files'])} files and the report to {args.out}; "
              f"see {out['readme']}")
    return 0
