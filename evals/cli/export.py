"""`mor-bench export`: a checkpoint as a Hugging Face `transformers` directory
(`evals.hf.export`)."""

from __future__ import annotations

import argparse

from evals.cli.display import print_json
from evals.cli.errors import UsageError


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a mor-bench checkpoint: a run directory holding model.safetensors and "
                        "config.json, e.g. runs/smoke-latest/mor-3-1.2e12F-s0")
    p.add_argument("--hf", required=True, metavar="OUT",
                   help="the Hugging Face directory to write (new or empty)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty OUT, replacing the files an export writes "
                        "(config.json, model.safetensors, tokenizer and remote-code files); "
                        "other files there are left alone")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="write the model only (for checkpoints that record no tokenizer)")
    p.add_argument("--json", action="store_true",
                   help="print what was written as JSON on stdout")


def cmd_export(args: argparse.Namespace) -> int:
    """Write a checkpoint as a directory that Hugging Face transformers loads:

      AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)
      AutoTokenizer.from_pretrained(OUT)   # remote-code exports: trust_remote_code=True too
                                           # (transformers reads config.json first)

    vanilla     a plain LlamaForCausalLM (config.json + model.safetensors); loads without
                remote code and without mor-bench installed; generate() uses Llama's cache
    recursive,  a config class and modelling file written into OUT (auto_map) that IMPORT
    MoR         the installed mor-bench package (same version); load with
                trust_remote_code=True. Expert-choice MoR routes with the causal rule
                (router logit > 0), not the paper's top-k (top-k is not causal), so scores
                can differ from a top-k evaluation; token-choice is causal by construction.
                generate() works without a key/value cache: each new token re-runs the
                whole prefix (exact, slower than mor-bench's own decode engine)
    tokenizer   'bytes' and 'bpe' checkpoints get tokenizer.json + tokenizer_config.json
                (a fast tokenizer encoding exactly as mor-bench did; EOS <|endoftext|> is
                also BOS and padding, as mor-bench starts generation from EOS); 'hf:NAME'
                checkpoints get that tokenizer, saved

    examples:
      mor-bench export runs/smoke-latest/vanilla-1.2e12F-s0 --hf hf/vanilla
      mor-bench export runs/smoke-latest/mor-3-1.2e12F-s0 --hf hf/mor-3 --json
      lm_eval --model hf --model_args pretrained=hf/mor-3,trust_remote_code=True ..."""
    from evals.hf.export import export_hf

    if not args.hf.strip():
        raise UsageError("--hf needs an output directory")
    info = export_hf(args.checkpoint, args.hf, force=args.force,
                     tokenizer=not args.no_tokenizer)
    if args.json:
        print_json(info)
        return 0
    remote = "remote code (trust_remote_code=True; imports mor-bench)" if info["remote_code"] \
        else "no remote code"
    routing = f", routing {info['routing']}" if info["routing"] else ""
    print(f"wrote {info['out']}: {info['architecture']} ({info['family']}{routing}), {remote}")
    print(f"  files: {', '.join(info['files'])}")
    if info["tokenizer"]:
        print(f"  tokenizer: {info['tokenizer']} ({info['tokenizer_class']}), "
              f"eos/bos id {info['eos_id']}")
    else:
        print("  tokenizer: none written (--no-tokenizer)")
    print(f"  generate(): {info['generation']}")
    flag = ", trust_remote_code=True" if info["remote_code"] else ""
    print(f"  load: AutoModelForCausalLM.from_pretrained({info['out']!r}{flag})")
    return 0
