"""Training throughput of the paper's 135M comparison on one GPU (docs/gpu.md §5).

    python benchmarks/gpu/train_135m.py                    # ~7 minutes on an H100/H200
    python benchmarks/gpu/train_135m.py --compile --json > gpu-135m.json
    python benchmarks/gpu/train_135m.py --device cpu --preset micro --steps 2 --seq-len 32

Trains vanilla, recursive (Middle-Cycle, N_r=3), and MoR expert-choice N_r=2 and N_r=3 at
preset 135m under the paper's settings (bf16 autocast, fused AdamW, peak LR 3e-3 with
warmup-stable-decay, clipping at 1.0, 2048-token windows) through the project's own
`TrainStep` and `make_optimizer`, on the synthetic corpus generated on the machine
(byte-tokenised; no download). Prints the backend settings in force and, per model,
tokens/s, MFU against the GPU's dense bf16 peak (datasheet for known GPUs, else measured),
peak memory and the training loss of the first and last timed step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

# Runnable from a bare checkout (torch and numpy installed) as well as after `pip install -e .`.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from baselines.recursive import RecursiveLM  # noqa: E402
from baselines.vanilla import VanillaLM  # noqa: E402
from evals.data.corpus import pack_documents  # noqa: E402
from evals.data.synthetic import generate_documents  # noqa: E402
from evals.data.tokenizer import ByteTokenizer  # noqa: E402
from evals.training.device import (  # noqa: E402
    compile_model,
    configure_backend,
    hardware_info,
    matmul_peak,
    resolve_device,
)
from evals.training.loop import TrainConfig, TrainStep, make_optimizer, peak_memory  # noqa: E402
from mor import ModelConfig, build_model  # noqa: E402
from mor.flops import flops_per_token, param_counts  # noqa: E402
from mor.registry import register_family  # noqa: E402

MODELS: dict[str, dict] = {
    "vanilla": dict(family="vanilla"),
    "recursive-3": dict(family="recursive", num_recursions=3, sharing="middle_cycle"),
    "mor-2": dict(family="mor", num_recursions=2),
    "mor-3": dict(family="mor", num_recursions=3),
}
BUDGET_S = 420.0
"""Wall time the default --steps is sized for (the four models together)."""
ASSUMED_MFU = 0.25
"""MFU assumed when sizing --steps (a 135M model at seq_len 2048 on an H100-class GPU)."""
SETUP_S = 20.0
"""Per model: building it, the untimed warm-up steps; plus COMPILE_S with --compile."""
COMPILE_S = 60.0
POOL_WINDOWS = 2048
"""At most this many distinct windows are generated; steps cycle through them."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed optimizer steps per model (default: sized from FLOPs to fit "
                         f"{BUDGET_S:.0f} s for all models)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16, help="windows per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True) and deterministic cuDNN")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--preset", default="135m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        ap.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    args.models = names
    for name in ("warmup", "seq_len", "batch_size", "grad_accum"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be at least 1")
    return args


def train_flops_per_step(cfg: ModelConfig, seq_len: int, tokens_per_step: int) -> float:
    """Training FLOPs of one optimizer step: 3 x exact forward FLOPs (docs/flops.md)."""
    return 3 * flops_per_token(cfg, seq_len, "exact") * tokens_per_step


def default_steps(cfgs: list[ModelConfig], seq_len: int, tokens_per_step: int, peak: float,
                  compiled: bool) -> tuple[int, str]:
    """Steps per model so all models fit BUDGET_S at ASSUMED_MFU of `peak`, and how."""
    round_s = sum(train_flops_per_step(c, seq_len, tokens_per_step) for c in cfgs) / (
        ASSUMED_MFU * peak)
    left = BUDGET_S - len(cfgs) * (SETUP_S + (COMPILE_S if compiled else 0.0))
    steps = max(10, int(left / round_s) // 10 * 10)
    how = (f"{steps} steps: ({BUDGET_S:.0f} s - {BUDGET_S - left:.0f} s set-up) / "
           f"{round_s:.3f} s per round of {len(cfgs)} steps at {ASSUMED_MFU:.0%} MFU")
    return steps, how


def synthetic_windows(n_windows: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n_windows` packed windows [n, seq_len + 1] of the synthetic corpus, byte tokens."""
    tok = ByteTokenizer()
    n_docs = max(8, n_windows * (seq_len + 1) // 700)  # documents average ~900 bytes
    while True:
        packed = pack_documents(generate_documents(n_docs, seed), tok, seq_len,
                                label="synthetic corpus")
        if packed.windows.shape[0] >= n_windows:
            return packed.windows[:n_windows]
        n_docs *= 2


def run_model(name: str, cfg: ModelConfig, windows: torch.Tensor, args: argparse.Namespace,
              device: torch.device, peak: float) -> dict:
    tcfg = TrainConfig(batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                       device=device.type)
    total = args.warmup + args.steps
    per_step = args.batch_size * args.grad_accum
    n = windows.shape[0]

    def micro(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Every model sees the same windows in the same order, cycling through the pool.
        idx = (torch.arange(per_step) + step * per_step) % n
        w = windows[idx.to(windows.device)]
        return [(m[:, :-1], m[:, 1:]) for m in w.split(args.batch_size)]

    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device).train()
    if args.compile:
        compile_model(model, device)
    optimizer = make_optimizer(model, tcfg, device)
    trainer = TrainStep(model, optimizer, tcfg, total_steps=total,
                        warmup_steps=max(1, round(tcfg.warmup_frac * total)), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    for step in range(args.warmup):  # untimed: compilation, autotuning, allocator warm-up
        trainer(step, micro(step))
    sync()
    warm_s = time.perf_counter() - t0
    losses = []
    t0 = time.perf_counter()
    for step in range(args.warmup, total):
        losses.append(trainer(step, micro(step)).loss)  # stays on the device: no sync
    sync()
    elapsed = time.perf_counter() - t0
    mem, mem_kind = peak_memory(device)
    fwd = flops_per_token(cfg, args.seq_len, "exact")
    tokens_per_s = args.steps * per_step * args.seq_len / elapsed
    first, last = float(losses[0]), float(losses[-1])
    del model, optimizer, trainer
    return {
        "model": name, "family": cfg.family, "num_recursions": cfg.num_recursions,
        "layer_plan": cfg.layer_plan, "params": param_counts(cfg)["unique"],
        "flops_per_token_exact": fwd, "steps": args.steps, "warmup_steps": args.warmup,
        "warmup_s": warm_s, "train_s": elapsed, "step_s": elapsed / args.steps,
        "tokens_per_s": tokens_per_s, "mfu": 3 * fwd * tokens_per_s / peak,
        "peak_mem_bytes": mem, "peak_mem_kind": mem_kind,
        "first_loss": first, "loss": last,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    backend = configure_backend(device, deterministic=args.deterministic)  # before CUDA work
    # Explicit, so the script also runs where the project is not pip-installed (the
    # registry otherwise finds these two families through entry points).
    register_family("vanilla", VanillaLM)
    register_family("recursive", RecursiveLM)
    cfgs = {name: ModelConfig.from_preset(args.preset, **MODELS[name]) for name in args.models}
    peak, peak_source = matmul_peak(device)
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    sizing = "given on the command line"
    if args.steps is None:
        args.steps, sizing = default_steps(list(cfgs.values()), args.seq_len, tokens_per_step,
                                           peak, args.compile)
    per_step = args.batch_size * args.grad_accum
    pool = min(POOL_WINDOWS, (args.warmup + args.steps) * per_step)
    windows = synthetic_windows(pool, args.seq_len, args.seed).to(device)
    settings = {
        "preset": args.preset, "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else hardware_info()["cpu"]),
        "seq_len": args.seq_len, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "tokens_per_step": tokens_per_step,
        "steps": args.steps, "steps_sizing": sizing, "warmup": args.warmup, "lr": args.lr,
        "compile": args.compile, "deterministic": args.deterministic,
        "autocast": "bf16" if device.type == "cuda" else None,
        "fused_adamw": device.type == "cuda", "data": "synthetic corpus, byte tokens",
        "data_windows": int(windows.shape[0]), "seed": args.seed,
    }
    if not args.json:
        print(f"device: {settings['device_name']}  peak {peak / 1e12:.1f} TFLOP/s "
              f"({peak_source})")
        print("backend:", json.dumps(backend))
        print(f"steps: {sizing}; {tokens_per_step} tokens per step, {args.warmup} untimed "
              f"warm-up steps per model{', compiled' if args.compile else ''}", flush=True)
    results = []
    for name, cfg in cfgs.items():
        row = run_model(name, cfg, windows, args, device, peak)
        results.append(row)
        if not args.json:
            print(f"  {name}: {row['tokens_per_s']:,.0f} tokens/s, loss {row['loss']:.3f}",
                  flush=True)
    bad = [r["model"] for r in results if not math.isfinite(r["loss"])]
    if args.json:
        print(json.dumps({"settings": settings, "backend": backend, "peak_flops": peak,
                          "peak_source": peak_source, "models": results}, indent=2))
        return 1 if bad else 0
    print()
    head = (f"{'model':<12} {'plan':>7} {'params':>8} {'tokens/s':>11} {'MFU':>6} "
            f"{'peak mem':>9} {'warm-up':>8} {'loss first':>10} {'loss last':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['model']:<12} {r['layer_plan']:>7} {r['params'] / 1e6:>7.1f}M "
              f"{r['tokens_per_s']:>11,.0f} {r['mfu']:>6.1%} "
              f"{r['peak_mem_bytes'] / 2**30:>8.2f}G {r['warmup_s']:>7.1f}s "
              f"{r['first_loss']:>10.3f} {r['loss']:>9.3f}")
    print(f"\nMFU = 3 x exact forward FLOPs/token x tokens/s / {peak / 1e12:.1f} TFLOP/s "
          f"({peak_source}); peak memory: {results[0]['peak_mem_kind']}")
    if bad:
        print(f"non-finite loss: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
