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
    mor-bench sweep CHECKPOINT --knob threshold   MoR's efficiency knob: accuracy vs tokens/s
    mor-bench export CHECKPOINT --hf OUT          a Hugging Face transformers directory
    mor-bench publish RUN_DIR OUT                 a finished study: records, report, claims

One module per group of commands (`COMMANDS` below); only the chosen command's module is
imported, and those modules import their heavy dependencies inside the command, so
`mor-bench report` needs neither torch nor the model code nor lm-eval.

Bad input (unknown preset, impossible model, missing corpus, malformed suite or record) is
reported as one line on stderr with exit code 2, before any training starts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from evals.cli.errors import UsageError
from evals.suite.record import RecordError

EXAMPLES = """examples:
  mor-bench run smoke                      # the built-in CPU suite (4-10 min, 2 cores)
  mor-bench run paper-360m --dry-run       # plan the paper's Table 3 models, no training
  mor-bench run my_suite.toml --corpus ../shared/data/corpus/prose_en.jsonl.gz
  mor-bench report runs/smoke-latest --screenshot   # index.html (+ report.png)
  mor-bench check runs/smoke-latest --baseline reports/baselines/smoke.json
  mor-bench models --json | jq '.[] | select(.preset == "360m")'
"""


@dataclass(frozen=True)
class Command:
    module: str
    """The `evals.cli` module that holds the command (imported only when it is chosen)."""
    func: str
    """Its function: args -> exit code; the docstring is the command's description."""
    help: str


COMMANDS: dict[str, Command] = {
    "models": Command("evals.cli.models", "cmd_models",
                      "table of presets x families: params, FLOPs/token"),
    "suites": Command("evals.cli.models", "cmd_suites", "list the built-in suites"),
    "run": Command("evals.cli.run", "cmd_run", "train a suite and write records + report"),
    "report": Command("evals.cli.run", "cmd_report",
                      "render tables, figures and index.html of a run directory"),
    "check": Command("evals.cli.run", "cmd_check",
                     "regression gate: compare a run with a baseline"),
    "eval": Command("evals.cli.evaluate", "cmd_eval",
                    "few-shot accuracy of a checkpoint through lm-eval"),
    "route": Command("evals.cli.evaluate", "cmd_route",
                     "colour a text's tokens by the recursion depth MoR gives them"),
    "peak-flops": Command("evals.cli.perf", "cmd_peak_flops",
                          "measure the matmul peak used for MFU"),
    "bench-train": Command("evals.cli.perf", "cmd_bench_train",
                           "training tokens/s, FLOPs and MFU, variants side by side"),
    "bench-infer": Command("evals.cli.perf", "cmd_bench_infer",
                           "generation tokens/s of checkpoints side by side (continuous "
                           "batching; MoR depth-wise)"),
    "sweep": Command("evals.cli.sweep", "cmd_sweep",
                     "sweep MoR's efficiency knob on one checkpoint: accuracy vs throughput"),
    "export": Command("evals.cli.export", "cmd_export",
                      "write a checkpoint as a Hugging Face transformers directory"),
    "publish": Command("evals.cli.publish", "cmd_publish",
                       "a finished suite run as a study in the repository: records, report, "
                       "claims tested, discussion"),
    "data": Command("evals.cli.evaluate", "cmd_data",
                    "fetch and prepare data sets (see `mor-bench data -h`)"),
}


def _chosen(argv: list[str]) -> str | None:
    """The command named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the chosen command's sub-parser gets its options and description (its
    module imported), every other command only its name and help line."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="mor-bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare Mixture-of-Recursions, vanilla and recursive Transformers at "
                    "matched compute: train a suite, measure, report.",
        epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    for name, cmd in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=cmd.help)
            continue
        module = importlib.import_module(cmd.module)
        func: Callable[[argparse.Namespace], int] = getattr(module, cmd.func)
        p = sub.add_parser(name, help=cmd.help, description=func.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        module.add_arguments(name, p)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input (one line, exit 2). `mor.errors` is looked up only if
    already imported: a command that never imported it cannot have raised its errors, and
    importing it would import torch."""
    kinds: list[type[BaseException]] = [RecordError, UsageError]
    errors = sys.modules.get("mor.errors")
    if errors is not None:
        kinds.append(errors.MorBenchError)
    return tuple(kinds)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("mor-bench: interrupted; finished runs keep their records", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `mor-bench models --json | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet exit flush
        return 0
    except _user_errors() as e:  # anything else is a bug: its full traceback
        print(f"mor-bench: error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """The error's message on one line: a message can quote user text (a TOML parser's
    excerpt, a file name) that holds line breaks, and the contract is one line on stderr."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
