"""Training speed of mor-bench's vanilla model vs Hugging Face `LlamaForCausalLM`, same
weights, same shape, same optimizer step.

    python benchmarks/train_vs_hf.py                      # small preset, 16 x 256, fp32
    python benchmarks/train_vs_hf.py --rounds 9 --steps 3 --json
    python benchmarks/train_vs_hf.py --target 1.3         # exit 1 below 1.3x (a CI gate)
    python benchmarks/train_vs_hf.py --profile 25         # + per-op CPU time of one step each

Both models are built from one `ModelConfig` preset (`--preset`, default `small`): ours with
`mor.build_model`, HF's from `baselines.vanilla.hf_llama_config_kwargs` with SDPA attention,
no dropout, tied embeddings and no KV cache, loaded with OUR weights through
`baselines.vanilla.to_hf_state_dict`. Before anything is timed, both compute the loss of the
first batch, which must agree within 1e-5 (else the script stops with exit status 2: a
comparison of different models would be meaningless).

Both are then trained with the suites' own optimizer step (`evals.training.loop.TrainStep`:
the WSD LR, clipping at 1.0, `make_optimizer`'s AdamW over `param_groups`) by
`evals.perf.train_speed.interleaved_train_speed`: `--warmup` untimed steps each, then
`--rounds` rounds in which ours and HF's take turns (A B A B ...) doing `--steps` timed
steps each, on the same seeded batches of random tokens. HF gets the same parameter groups
(`HFTrainAdapter` exposes its embedding as `embed.weight`, the one matrix `param_groups`
does not decay) and its own loss path (`labels` + `shift_labels`, i.e. the same next-token
targets as ours). Printed: tokens/s of each (median round), and the ratio = median over
rounds of HF's round time / ours (paired by round, so load that changes between rounds
cancels). Exit status 1 when the ratio is below `--target`. `--profile N` adds, after the
timing, the N ops of most self CPU time in one (untimed, profiled) training step of each.

Needs `transformers` (`pip install -e '.[test]'`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

# Runnable as `python benchmarks/train_vs_hf.py` from a checkout without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.vanilla import hf_llama_config_kwargs, to_hf_state_dict  # noqa: E402
from evals.perf.train_speed import interleaved_train_speed  # noqa: E402
from evals.training.device import hardware_info  # noqa: E402
from evals.training.loop import TrainConfig, TrainStep, make_optimizer, param_groups  # noqa: E402
from mor import ModelConfig, build_model  # noqa: E402

LOSS_ATOL = 1e-5


class HFTrainAdapter(nn.Module):
    """A `LlamaForCausalLM` behind the model contract `TrainStep` uses: `model(x, y,
    step=...)` -> an object with `loss`, `lm_loss`, `stats`, plus `after_optimizer_step`.

    `embed` is registered BEFORE `hf`, so `named_parameters()` calls the (tied) embedding
    `embed.weight` -- the name `evals.training.loop.param_groups` keeps out of weight decay --
    and the suites' optimizer groups apply to HF unchanged."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.embed = hf.get_input_embeddings()
        self.hf = hf

    def forward(self, x: Tensor, y: Tensor | None = None, *, step: int | None = None):
        # shift_labels: y is already the next token of each position (as for our model);
        # HF's loss views it flat, so it must be contiguous (a slice of a window is not).
        if y is not None:
            y = y.contiguous()
        out = self.hf(input_ids=x, labels=y, shift_labels=y, use_cache=False)
        return SimpleNamespace(logits=out.logits, loss=out.loss, lm_loss=out.loss, stats={})

    def after_optimizer_step(self, stats: dict[str, Tensor]) -> None:
        pass


def build_pair(cfg: ModelConfig, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(our vanilla model, HF `LlamaForCausalLM` holding a copy of the same weights), both in
    training mode. HF: SDPA attention, no dropout, tied embeddings, no KV cache."""
    import transformers

    if cfg.family != "vanilla":
        raise ValueError(f"only vanilla models have an HF equivalent, got {cfg.family!r}")
    torch.manual_seed(seed)
    ours = build_model(cfg).train()
    hf_cfg = transformers.LlamaConfig(**hf_llama_config_kwargs(cfg), attention_dropout=0.0,
                                      use_cache=False, attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg)
    state = {k: v.detach().clone() for k, v in to_hf_state_dict(ours.state_dict()).items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any("rotary" not in m for m in missing):
        raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    if hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("HF lm_head is not tied to embed_tokens")
    if hf.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF attention is {hf.config._attn_implementation!r}, not sdpa")
    return ours, hf.train()


def check_optimizer_groups(ours: nn.Module, adapter: nn.Module, weight_decay: float) -> None:
    """The two models' AdamW groups hold the same shapes with the same weight decay."""
    def shapes(model):
        return [(g["weight_decay"], sorted(tuple(p.shape) for p in g["params"]))
                for g in param_groups(model, weight_decay)]
    if shapes(ours) != shapes(adapter):
        raise RuntimeError("optimizer parameter groups differ between ours and HF")


def first_losses(ours: nn.Module, adapter: nn.Module, x: Tensor, y: Tensor
                 ) -> tuple[float, float]:
    with torch.no_grad():
        return float(ours(x, y).loss), float(adapter(x, y).loss)


def profile_step(model: nn.Module, windows: Tensor, tcfg: TrainConfig, top: int
                 ) -> list[dict[str, Any]]:
    """The `top` ops of most self CPU time in one training step (`TrainStep`, after one
    untimed step), as [{"op", "self_cpu_ms", "calls"}]. Trains `model` in place."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cpu")
    step = TrainStep(model, make_optimizer(model, tcfg, dev), tcfg, total_steps=2,
                     warmup_steps=1, device=dev)
    micro = [(windows[:tcfg.batch_size, :-1], windows[:tcfg.batch_size, 1:])]
    step(0, micro)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(1, micro)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
            for e in rows[:top]]


def run(preset: str = "small", *, batch_size: int = 16, seq_len: int = 256, rounds: int = 7,
        steps: int = 3, warmup: int = 2, threads: int | None = None, seed: int = 0,
        profile_top: int = 0) -> dict[str, Any]:
    """Build both models, check their first losses agree, time them interleaved (and, with
    `profile_top`, profile one more step of each)."""
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = ModelConfig.from_preset(preset, family="vanilla")
    if seq_len > cfg.max_seq_len:
        cfg = cfg.replace(max_seq_len=seq_len)
    ours, hf = build_pair(cfg, seed)
    adapter = HFTrainAdapter(hf)
    tcfg = TrainConfig(batch_size=batch_size, device="cpu")
    check_optimizer_groups(ours, adapter, tcfg.weight_decay)
    g = torch.Generator().manual_seed(seed)
    # Enough distinct windows that steps see different batches.
    windows = torch.randint(0, cfg.vocab_size, (batch_size * 4, seq_len + 1), generator=g)
    x, y = windows[:batch_size, :-1], windows[:batch_size, 1:]
    loss_ours, loss_hf = first_losses(ours, adapter, x, y)
    speed = interleaved_train_speed({"ours": ours, "hf": adapter}, windows, tcfg,
                                    rounds=rounds, steps_per_round=steps,
                                    warmup_steps=warmup, reference="hf", seed=seed)
    rows = speed["rows"]
    res = {
        "preset": preset, "batch_size": batch_size, "seq_len": seq_len,
        "tokens_per_step": speed["tokens_per_step"], "rounds": rounds,
        "steps_per_round": steps, "warmup_steps": warmup, "dtype": "float32",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "cpu": hardware_info()["cpu"],
        "hf_attn_implementation": hf.config._attn_implementation,
        "first_loss": {"ours": loss_ours, "hf": loss_hf,
                       "abs_diff": abs(loss_ours - loss_hf)},
        "ours_tokens_per_s": rows["ours"]["tokens_per_s"],
        "hf_tokens_per_s": rows["hf"]["tokens_per_s"],
        "ratio": rows["ours"]["rel_tokens_per_s"],
        "round_s": {"ours": rows["ours"]["round_s"], "hf": rows["hf"]["round_s"]},
    }
    if profile_top:
        res["profile"] = {name: profile_step(model, windows, tcfg, profile_top)
                          for name, model in (("ours", ours), ("hf", adapter))}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (A B per round)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: the CPUs this process may use)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=1.3,
                    help="exit 1 when ours/HF tokens/s is below this")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the N ops of most self CPU time in one step of each")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count() or 1)
    res = run(args.preset, batch_size=args.batch_size, seq_len=args.seq_len,
              rounds=args.rounds, steps=args.steps, warmup=args.warmup, threads=threads,
              seed=args.seed, profile_top=args.profile)
    res["target"] = args.target
    fair = res["first_loss"]["abs_diff"] <= LOSS_ATOL
    res["passed"] = bool(fair and math.isfinite(res["ratio"]) and res["ratio"] >= args.target)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        fl = res["first_loss"]
        print(f"{res['preset']} vanilla, {res['batch_size']} x {res['seq_len']} tokens, fp32, "
              f"{res['threads']} threads, torch {res['torch']}, transformers "
              f"{res['transformers']}, {res['cpu']}")
        print(f"first-step loss: ours {fl['ours']:.6f}  hf {fl['hf']:.6f}  "
              f"|diff| {fl['abs_diff']:.2e}")
        print(f"ours: {res['ours_tokens_per_s']:,.0f} tokens/s")
        print(f"hf:   {res['hf_tokens_per_s']:,.0f} tokens/s")
        print(f"ratio ours/hf: {res['ratio']:.3f}x (target {args.target}x, median of "
              f"{res['rounds']} interleaved rounds of {res['steps_per_round']} steps)")
        for name, ops in res.get("profile", {}).items():
            total = sum(o["self_cpu_ms"] for o in ops)
            print(f"\n{name}: top {len(ops)} ops of one profiled step "
                  f"({total:,.0f} ms self CPU among them)")
            for o in ops:
                print(f"  {o['self_cpu_ms']:9.1f} ms  {o['calls']:5d}x  {o['op']}")
    if not fair:
        print(f"first-step losses differ by {res['first_loss']['abs_diff']:.2e} > "
              f"{LOSS_ATOL}: not the same model", file=sys.stderr)
        return 2
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
