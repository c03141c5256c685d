"""Resumable-checkpoint overhead: one save's time against the training it interrupts.

    python benchmarks/checkpoint_overhead.py [--preset small] [--every 100] [--json]

Trains the vanilla model of --preset (AdamW, --batch x --seq-len tokens per step, fp32, the
project's own `TrainStep`), and alternates --rounds times: --steps timed training steps,
then one timed `evals.training.checkpointing.save` (DCP model + optimizer, RNG, JSON state,
sha256 manifest, fsync, rename, pruning to the newest 2). Overhead at checkpoint_every = N
is median(save) / (N x median(step)). Exit 1 when it exceeds --target (default 3%).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--family", default="vanilla")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--every", type=int, default=100, help="checkpoint_every to judge")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.03)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from evals.data.corpus import Batches
    from evals.training import checkpointing as ckpt
    from evals.training.distributed import SINGLE
    from evals.training.loop import TrainConfig, TrainStep, make_optimizer
    from mor import ModelConfig, build_model

    cfg = ModelConfig.from_preset(args.preset, family=args.family,
                                  max_seq_len=max(args.seq_len, 32))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    device = torch.device("cpu")
    tcfg = TrainConfig(batch_size=args.batch)
    opt = make_optimizer(model, tcfg, device)
    step = TrainStep(model, opt, tcfg, total_steps=10**6, warmup_steps=10, device=device)
    windows = torch.randint(0, cfg.vocab_size, (args.batch * 8, args.seq_len + 1))
    batches = Batches(windows, args.batch, seed=0)()
    step(0, [next(batches)])  # warm-up (and AdamW's state exists from here on)
    step_times, save_times, sizes = [], [], []
    n = 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "checkpoints"
        for _ in range(args.rounds):
            for _ in range(args.steps):
                _, dt = step.timed(n, [next(batches)])
                step_times.append(dt)
                n += 1
            t0 = time.perf_counter()
            path = ckpt.save(root, n, module=model, optimizer=opt, info=SINGLE, keep=2,
                             state={"step": n, "bench": True})
            save_times.append(time.perf_counter() - t0)
            sizes.append(sum(p.stat().st_size for p in path.iterdir()))
    step_s, save_s = statistics.median(step_times), statistics.median(save_times)
    overhead = save_s / (args.every * step_s)
    result = {
        "preset": args.preset, "family": args.family, "params": sum(
            p.numel() for p in model.parameters()),
        "tokens_per_step": args.batch * args.seq_len, "median_step_s": step_s,
        "median_save_s": save_s, "checkpoint_bytes": sizes[-1], "every": args.every,
        "overhead": overhead, "target": args.target, "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.preset} {args.family}: step {step_s * 1e3:.1f} ms, save "
              f"{save_s * 1e3:.1f} ms ({sizes[-1] / 2**20:.1f} MiB) -> overhead at "
              f"checkpoint_every={args.every}: {overhead:.2%} (target < {args.target:.0%})")
    return 0 if overhead < args.target else 1


if __name__ == "__main__":
    sys.exit(main())
