"""Greedy decoding with mor-bench's engine vs Hugging Face `LlamaForCausalLM.generate()`,
same weights, same prompts, same number of new tokens.

    python benchmarks/decode_vs_hf.py                      # small preset, 16 x (16 + 128)
    python benchmarks/decode_vs_hf.py --rounds 7 --json
    python benchmarks/decode_vs_hf.py --target 2.5         # exit 1 below 2.5x HF
    python benchmarks/decode_vs_hf.py --profile 25         # + per-op CPU time of one run each
    python benchmarks/decode_vs_hf.py --only engine,hf     # leave the plain loop out

One vanilla `ModelConfig` preset (`--preset`, default `small`) built with `mor.build_model`
and copied into an HF `LlamaForCausalLM` (SDPA attention, tied embeddings) through
`baselines.vanilla.to_hf_state_dict`. Before anything is timed, both models' logits over the
prompts must agree within 1e-4 (else exit status 2: a comparison of different models would be
meaningless).

Three decoders, each greedy (fp32), `--batch` sequences of `--prompt-len` random tokens,
`--new-tokens` new tokens each (no early stop):
  engine  `mor.decode.Engine.generate` (scheduler "sequence": continuous batching, static
          KV cache; built once, outside the timing, like HF's model)
  hf      `generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)` with its default
          (dynamic) cache
  plain   a reference written here: the prompt through the model's own forward, then a
          bare greedy loop over a preallocated cache (one token for every sequence per step,
          no scheduler, no bookkeeping) -- what a decoder with no per-iteration overhead
          beyond the layers costs in eager PyTorch.
After `--warmup` untimed runs each, `--rounds` rounds in which the decoders take turns
(A B C A B C ...); printed: tokens/s (batch * new tokens / seconds, prompt processing
included) of each at its median round, and the ratios engine / hf and engine / plain as the
median over rounds of the paired ratio (load that changes between rounds cancels).

Tokens: the engine's generated ids are compared with HF's (and the plain loop's). The models
are the same and fp32, so greedy argmax agrees except at rare near-ties, after which a
sequence diverges; reported as the number of sequences that differ and the first position
where each does.

Needs `transformers` (`pip install -e '.[test]'`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Runnable as `python benchmarks/decode_vs_hf.py` from a checkout without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.vanilla import hf_llama_config_kwargs, to_hf_state_dict  # noqa: E402
from evals.training.device import hardware_info  # noqa: E402
from mor import ModelConfig, build_model  # noqa: E402
from mor.decode import Engine, Request  # noqa: E402
from mor.layers import rms_norm  # noqa: E402

LOGIT_ATOL = 1e-4
DECODERS = ("engine", "hf", "plain")


def build_pair(cfg: ModelConfig, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(our vanilla model, HF `LlamaForCausalLM` holding a copy of the same weights), both in
    eval mode; HF with SDPA attention, tied embeddings and its KV cache on."""
    import transformers

    if cfg.family != "vanilla":
        raise ValueError(f"only vanilla models have an HF equivalent, got {cfg.family!r}")
    torch.manual_seed(seed)
    ours = build_model(cfg).eval()
    hf_cfg = transformers.LlamaConfig(**hf_llama_config_kwargs(cfg), attention_dropout=0.0,
                                      use_cache=True, attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg)
    state = {k: v.detach().clone() for k, v in to_hf_state_dict(ours.state_dict()).items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any("rotary" not in m for m in missing):
        raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    if hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("HF lm_head is not tied to embed_tokens")
    hf.generation_config.eos_token_id = None  # never stop early: exactly N new tokens
    hf.generation_config.pad_token_id = 0
    return ours, hf.eval()


# --- the three decoders: each (prompts [B, P]) -> generated ids [B, N] -------------------------
def engine_decoder(model: nn.Module, batch: int, prompt_len: int, new_tokens: int):
    engine = Engine(model, max_batch=batch, max_len=prompt_len + new_tokens - 1)

    def run(prompts: Tensor) -> Tensor:
        reqs = [Request(prompt=p, max_new_tokens=new_tokens, id=i)
                for i, p in enumerate(prompts.tolist())]
        return torch.tensor([o.tokens for o in engine.generate(reqs, "sequence")])

    run.engine = engine
    return run


def hf_decoder(hf: nn.Module, new_tokens: int):
    def run(prompts: Tensor) -> Tensor:
        with torch.inference_mode():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts),
                              do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens)
        return out[:, prompts.shape[1]:]

    return run


def plain_decoder(model: nn.Module, new_tokens: int):
    """A bare static-cache greedy loop over `model`'s weights (see the module docstring)."""
    cfg = model.cfg
    H, KVH, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    layers = model.layers
    wqkv = [torch.cat([b.attn.q_proj.weight, b.attn.k_proj.weight, b.attn.v_proj.weight])
            * b.attn_norm.weight for b in layers]
    wgu = [torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]) * b.mlp_norm.weight
           for b in layers]
    half = hd // 2

    @torch.inference_mode()
    def run(prompts: Tensor) -> Tensor:
        b, p = prompts.shape
        total = p + new_tokens
        out = model(prompts, collect_kv=True)
        ks = [torch.zeros(b, KVH, total, hd) for _ in layers]
        vs = [torch.zeros(b, KVH, total, hd) for _ in layers]
        for e, k, v in zip(out.kv, ks, vs):
            k[:, :, :p], v[:, :, :p] = e.k, e.v
        tok = out.logits[:, -1].argmax(-1)
        gen = torch.empty(b, new_tokens, dtype=torch.long)
        gen[:, 0] = tok
        for t in range(p, total - 1):
            cos, sin = model.rope.cos[t], model.rope.sin[t]
            x = model.embed(tok)
            for li, blk in enumerate(layers):
                qkv = F.linear(rms_norm(x, None, cfg.norm_eps), wqkv[li])
                qk = qkv[:, : (H + KVH) * hd].view(b, H + KVH, hd)
                qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], -1) * sin
                ks[li][:, :, t] = qk[:, H:]
                vs[li][:, :, t] = qkv[:, (H + KVH) * hd:].view(b, KVH, hd)
                o = F.scaled_dot_product_attention(
                    qk[:, :H].unsqueeze(2), ks[li][:, :, : t + 1], vs[li][:, :, : t + 1],
                    enable_gqa=H != KVH)
                x = torch.addmm(x, o.view(b, H * hd), blk.attn.o_proj.weight.t())
                gate, up = F.linear(rms_norm(x, None, cfg.norm_eps), wgu[li]).chunk(2, -1)
                x = torch.addmm(x, F.silu(gate) * up, blk.mlp.down_proj.weight.t())
            tok = F.linear(model.norm(x), model.embed.weight).argmax(-1)
            gen[:, t - p + 1] = tok
        return gen

    return run


# --- comparison ---------------------------------------------------------------------------------
def token_mismatches(a: Tensor, b: Tensor) -> dict[str, Any]:
    """Sequences whose ids differ, and the first differing position of each."""
    diff = a != b
    rows = diff.any(1).nonzero().squeeze(1).tolist()
    return {"sequences": len(rows), "of": a.shape[0],
            "first_positions": [int(diff[r].nonzero()[0]) for r in rows],
            "tokens": int(diff.sum())}


def profile_run(fn, prompts: Tensor, top: int) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(prompts)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
            for e in rows[:top]]


def run(preset: str = "small", *, batch: int = 16, prompt_len: int = 16,
        new_tokens: int = 128, rounds: int = 5, warmup: int = 1, threads: int | None = None,
        seed: int = 0, only: tuple[str, ...] = DECODERS, profile_top: int = 0
        ) -> dict[str, Any]:
    if threads is not None:
        torch.set_num_threads(threads)
    if "engine" not in only:
        raise ValueError("the engine is what this benchmark measures: --only must include it")
    cfg = ModelConfig.from_preset(preset, family="vanilla")
    ours, hf = build_pair(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, cfg.vocab_size, (batch, prompt_len), generator=g)
    with torch.inference_mode():
        diff = float((ours(prompts).logits - hf(prompts).logits).abs().max())
    decoders = {"engine": engine_decoder(ours, batch, prompt_len, new_tokens),
                "hf": hf_decoder(hf, new_tokens), "plain": plain_decoder(ours, new_tokens)}
    decoders = {k: v for k, v in decoders.items() if k in only}
    tokens = {}
    for name, fn in decoders.items():
        for _ in range(max(1, warmup)):
            tokens[name] = fn(prompts)
    times: dict[str, list[float]] = {k: [] for k in decoders}
    for _ in range(rounds):
        for name, fn in decoders.items():
            t0 = time.perf_counter()
            fn(prompts)
            times[name].append(time.perf_counter() - t0)
    n = batch * new_tokens
    res: dict[str, Any] = {
        "preset": preset, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "rounds": rounds, "warmup": warmup, "dtype": "float32",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "cpu": hardware_info()["cpu"], "prompt_logits_max_abs_diff": diff,
        "tokens_per_s": {k: n / statistics.median(v) for k, v in times.items()},
        "round_s": times,
    }
    res["ratio"] = {f"engine/{k}": statistics.median(o / e for o, e in zip(v, times["engine"]))
                    for k, v in times.items() if k != "engine"}
    res["mismatch"] = {f"engine-{k}": token_mismatches(tokens["engine"], v)
                       for k, v in tokens.items() if k != "engine"}
    if profile_top:
        res["profile"] = {k: profile_run(fn, prompts, profile_top) for k, fn in decoders.items()}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each first")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: the CPUs this process may use)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(DECODERS),
                    help=f"comma-separated subset of {','.join(DECODERS)} (engine required)")
    ap.add_argument("--target", type=float, default=0.0,
                    help="exit 1 when engine/hf tokens/s is below this (0: no gate)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the N ops of most self CPU time in one run of each")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count() or 1)
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = set(only) - set(DECODERS)
    if unknown:
        ap.error(f"unknown decoders {sorted(unknown)}; choose from {DECODERS}")
    res = run(args.preset, batch=args.batch, prompt_len=args.prompt_len,
              new_tokens=args.new_tokens, rounds=args.rounds, warmup=args.warmup,
              threads=threads, seed=args.seed, only=only, profile_top=args.profile)
    fair = res["prompt_logits_max_abs_diff"] <= LOGIT_ATOL
    ratio = res["ratio"].get("engine/hf", math.nan)
    res["target"] = args.target
    res["passed"] = bool(fair and (not args.target or (math.isfinite(ratio)
                                                       and ratio >= args.target)))
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{res['preset']} vanilla, batch {res['batch']}, {res['prompt_len']}-token "
              f"prompts, {res['new_tokens']} new tokens, greedy fp32, {res['threads']} "
              f"threads, torch {res['torch']}, transformers {res['transformers']}, "
              f"{res['cpu']}")
        print(f"prompt logits |ours - hf| max {res['prompt_logits_max_abs_diff']:.2e}")
        for k, v in res["tokens_per_s"].items():
            print(f"{k:7s} {v:9,.0f} tokens/s")
        for k, v in res["ratio"].items():
            print(f"ratio {k}: {v:.3f}x (median of {res['rounds']} interleaved rounds)")
        for k, m in res["mismatch"].items():
            print(f"tokens {k}: {m['sequences']}/{m['of']} sequences differ"
                  + (f" (first at positions {m['first_positions']})" if m["sequences"] else ""))
        for name, ops in res.get("profile", {}).items():
            total = sum(o["self_cpu_ms"] for o in ops)
            print(f"\n{name}: top {len(ops)} ops of one profiled run "
                  f"({total:,.0f} ms self CPU among them)")
            for o in ops:
                print(f"  {o['self_cpu_ms']:9.1f} ms  {o['calls']:6d}x  {o['op']}")
    if not fair:
        print(f"prompt logits differ by {res['prompt_logits_max_abs_diff']:.2e} > "
              f"{LOGIT_ATOL}: not the same model", file=sys.stderr)
        return 2
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
