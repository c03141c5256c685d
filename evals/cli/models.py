"""`mor-bench models` and `mor-bench suites`: what can be trained, nothing built."""

from __future__ import annotations

import argparse

from evals.cli.display import print_json, rich_table
from evals.cli.errors import positive_int


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    if command == "models":
        p.add_argument("--seq-len", type=positive_int, default=2048, help="sequence length for the "
                       "attention FLOPs (capped at each preset's max_seq_len; default 2048)")
        p.add_argument("--recursions", type=int, nargs="+", default=[2, 3, 4],
                       help="N_r values to list for recursive and MoR models (default 2 3 4)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_models(args: argparse.Namespace) -> int:
    """List presets x families with parameters and FLOPs/token (analytic, nothing built)."""
    from mor import ModelConfig, flops
    from mor.config import MAX_RECURSIONS, PRESETS
    from mor.errors import MorBenchError

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
        print_json(rows)
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
        print_json(rows)
    else:
        rich_table("built-in suites", rows, ["name", "models", "seeds", "corpus",
                                              "description"])
    return 0
