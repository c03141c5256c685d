"""Data-parallel training on CPU: 2 gloo processes (DDP) beside 1 process, same global batch.

    python benchmarks/ddp_cpu.py [--preset micro] [--family vanilla] [--rounds 3] [--json]

No target: the figure documents what the gradient all-reduce costs on the machine. Each
round trains --steps optimizer steps of --global-batch sequences x --seq-len tokens in ONE
process (all threads, grad_accum 1), in one process on ONE thread, and then in TWO processes
(half the threads each, half the batch each, DDP over gloo), interleaved A B C A B C;
tokens/s from each run's own training time (the loop's timer: optimizer steps only), medians
over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile


def _train(rank: int, world: int, args, port: int, out: str | None,
           threads: int | None = None) -> float:
    import torch

    from evals.data.corpus import Batches
    from evals.training.budget import Budget, plan_training
    from evals.training.distributed import SINGLE, init_from_env, shutdown
    from evals.training.loop import TrainConfig, train
    from mor import ModelConfig, build_model

    torch.set_num_threads(threads or max(1, args.threads // world))
    info = SINGLE
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        info = init_from_env("cpu")
    try:
        cfg = ModelConfig.from_preset(args.preset, family=args.family,
                                      max_seq_len=max(32, args.seq_len))
        torch.manual_seed(0)
        model = build_model(cfg)
        per = args.global_batch // world
        plan = plan_training(cfg, Budget(tokens=args.steps * args.global_batch * args.seq_len),
                             args.seq_len, per, 1, world)
        windows = torch.randint(0, cfg.vocab_size, (args.global_batch * 4, args.seq_len + 1),
                                generator=torch.Generator().manual_seed(1))
        res = train(model, Batches(windows, per, seed=0, rank=rank, world_size=world), plan,
                    TrainConfig(batch_size=per, tensorboard=False), warmup_steps=1,
                    device=torch.device("cpu"), info=info)
        if out is not None and rank == 0:
            with open(out, "w") as f:
                json.dump({"tokens_per_s": res.tokens_per_s}, f)
        return res.tokens_per_s
    finally:
        if world > 1:
            shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--family", default="vanilla")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp

    one, one_thread, two = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            one.append(_train(0, 1, args, 0, None))
            one_thread.append(_train(0, 1, args, 0, None, threads=1))
            out = os.path.join(tmp, f"two-{r}.json")
            mp.start_processes(_train, args=(2, args, _free_port(), out), nprocs=2,
                               start_method="spawn")
            with open(out) as f:
                two.append(json.load(f)["tokens_per_s"])
    import torch

    result = {"preset": args.preset, "family": args.family, "global_batch": args.global_batch,
              "seq_len": args.seq_len, "steps": args.steps, "threads": args.threads,
              "one_process_tokens_per_s": statistics.median(one),
              "one_process_one_thread_tokens_per_s": statistics.median(one_thread),
              "two_process_tokens_per_s": statistics.median(two),
              "ratio_two_to_one": statistics.median(two) / statistics.median(one),
              "rounds": {"one": one, "one_thread": one_thread, "two": two},
              "torch": torch.__version__}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.preset} {args.family}, {args.global_batch} x {args.seq_len} tokens per "
              f"step: 1 process {result['one_process_tokens_per_s']:,.0f} tok/s "
              f"({result['one_process_one_thread_tokens_per_s']:,.0f} on 1 thread), 2 gloo "
              f"processes {result['two_process_tokens_per_s']:,.0f} tok/s "
              f"(x{result['ratio_two_to_one']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
