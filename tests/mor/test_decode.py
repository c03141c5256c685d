"""Incremental decoding (mor/decode.py) and its caches (mor/kv_cache.py).

Parity: prefill + one-token-at-a-time decoding reproduces the full forward (causal routing)
for every family and routing variant, under both schedulers. Batched prefill (right-padded
prompts in one forward) equals one prompt per forward, in the cache and in what is decoded.
The static step that CUDA graphs capture (run eagerly here; tests/mor/test_decode_gpu.py
captures it) equals the eager step. Invariants of the continuous schedulers under random
lengths. Cache bytes against the accounting functions.
"""

from __future__ import annotations

import random

import pytest
import torch

from mor import ModelConfig, build_model, flops
from mor.decode import Engine, Request, _StaticStep
from mor.errors import ConfigError
from mor.kv_cache import CacheFullError, KVCache

VARIANTS = {
    "vanilla": dict(family="vanilla"),
    "recursive-3": dict(family="recursive", num_recursions=3),
    "mor-3-expert-cache": dict(family="mor", num_recursions=3),
    "mor-3-expert-share": dict(family="mor", num_recursions=3, kv="share"),
    "mor-4-expert-aux-router": dict(family="mor", num_recursions=4, expert_aux="router"),
    "mor-2-token-cache": dict(family="mor", num_recursions=2, router="token"),
    "mor-3-token-share": dict(family="mor", num_recursions=3, router="token", kv="share"),
    "recursive-2-sequence": dict(family="recursive", num_recursions=2, sharing="sequence"),
    "mor-3-expert-mlp-tanh": dict(family="mor", num_recursions=3, router_arch="mlp",
                                  router_func="tanh"),
    "mor-3-token-lossfree-sigmoid": dict(family="mor", num_recursions=3, router="token",
                                         balancing="loss_free", router_func="sigmoid"),
}


def make_model(variant: str, seed: int = 0, n_layers: int | None = None):
    torch.manual_seed(seed)
    extra = {"n_layers": n_layers} if n_layers else {}
    model = build_model(ModelConfig.from_preset("micro", **VARIANTS[variant], **extra)).eval()
    with torch.no_grad():
        # Routers of a fresh model score every token near 0, where float rounding could flip
        # a causal decision between two correct computations; sharpen them (the routing
        # stays mixed: about half the tokens go on at each step).
        for name, p in model.named_parameters():
            if name.startswith(("routers", "predictors", "router.")):
                p.mul_(40.0 if p.dim() == 2 and p.shape[0] <= 4 else 4.0)
        if hasattr(model, "router_bias"):  # loss-free balancing: a bias that matters
            model.router_bias.copy_(torch.linspace(0.02, -0.02, model.cfg.num_recursions))
    return model


def full_forward(model, ids: list[int]):
    """The full forward in causal routing (what decoding reproduces), the model unchanged."""
    with torch.no_grad():
        return model(torch.tensor([ids]), routing="causal")


def schedulers(variant: str) -> list[str]:
    return ["sequence", "depth"] if variant.startswith("mor") else ["sequence"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_equals_full_forward(variant: str) -> None:
    """Greedy tokens, logits and (MoR) per-token depths of prefill + incremental decoding
    equal a full forward over the final sequence, in causal routing mode. Prompts of 1 token
    (decode only) to 6 tokens (prefill through the model's forward, then decode)."""
    model = make_model(variant)
    engine = Engine(model, max_batch=3, max_len=48, kv_capacity="full", keep_logits=True)
    prompts = [[5], [7, 1, 2], [9, 8, 7, 6, 5, 4], [3, 3]]
    requests = [Request(prompt=p, max_new_tokens=18 + i, id=i) for i, p in enumerate(prompts)]
    for sched in schedulers(variant):
        outs = engine.generate(requests, sched)
        for req, out in zip(requests, outs):
            assert len(out.tokens) == req.max_new_tokens
            full = full_forward(model, out.prompt + out.tokens)
            ref = full.logits[0, len(out.prompt) - 1: -1]
            got = torch.stack(out.logits)
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
            assert ref.argmax(-1).tolist() == out.tokens
            if model.cfg.family == "mor":
                assert out.depths == full.depths[0, len(out.prompt) - 1: -1].tolist()
                assert min(out.depths) >= 1
            else:
                assert out.depths == []
    if model.cfg.family == "mor":
        # The routing really varies, so the parity above covered mixed depths.
        assert len({d for o in outs for d in o.depths}) > 1


def _snapshot(model) -> dict:
    return {"eval_routing": model.cfg.eval_routing, "cfg": model.cfg, "training": model.training,
            "ptrs": {n: p.data_ptr() for n, p in model.named_parameters()},
            "storages": {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters()},
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("variant", ["vanilla", "mor-3-expert-cache", "mor-4-expert-aux-router",
                                     "mor-2-token-cache"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_engine_never_mutates_the_model(variant: str, mode: str) -> None:
    """Building an engine and decoding (prompts through the prefill, both schedulers) leaves
    the model as it was: its routing mode (expert-choice stays "topk"), its train/eval flag,
    every parameter's storage and value, its state dict; its forward gives the same logits."""
    model = make_model(variant).train(mode == "train")
    if model.cfg.family == "mor" and model.cfg.router == "expert":
        assert model.cfg.eval_routing == "topk"
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        logits = model(ids).logits
    before = _snapshot(model)
    engine = Engine(model, max_batch=2, max_len=16, kv_capacity="full")
    requests = [Request(prompt=[3, 1, 4, 1], max_new_tokens=6, id=0),
                Request(prompt=[2], max_new_tokens=5, id=1)]
    for sched in schedulers(variant):
        assert all(len(o.tokens) == r.max_new_tokens
                   for o, r in zip(engine.generate(requests, sched), requests))
    after = _snapshot(model)
    for key in ("eval_routing", "cfg", "training", "ptrs", "storages"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    # The engine's fused projections are its own storage, not the model's parameters.
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not own & {w.untyped_storage().data_ptr() for w in engine._wqkv + engine._wgu}


@pytest.mark.parametrize("variant", ["vanilla", "mor-3-expert-cache", "mor-2-token-cache",
                                     "mor-3-expert-share"])
def test_scheduler_invariants_under_random_lengths(variant: str) -> None:
    """Every request completes with exactly its requested number of tokens; each token's
    recursion depth is the one its routing chose (the full forward's); slots are reused;
    results do not depend on the batch size or the arrival order."""
    model = make_model(variant, seed=1)
    rng = random.Random(0)
    requests = [Request(prompt=[rng.randrange(1, 250) for _ in range(rng.randint(1, 4))],
                        max_new_tokens=rng.randint(1, 25), id=f"r{i}", seed=i)
                for i in range(11)]
    reference = None
    for sched in schedulers(variant):
        for batch in (1, 3, 8):
            for order in ("fifo", "reversed"):
                engine = Engine(model, max_batch=batch, max_len=32, kv_capacity="full")
                reqs = requests if order == "fifo" else requests[::-1]
                outs = {o.id: o for o in engine.generate(reqs, sched)}
                assert sorted(outs) == sorted(r.id for r in requests)
                for r in requests:
                    o = outs[r.id]
                    assert len(o.tokens) == r.max_new_tokens, (sched, batch, r.id)
                    assert o.prompt == r.prompt and len(o.slots) == 1
                    if model.cfg.family == "mor":
                        full = full_forward(model, o.prompt + o.tokens)
                        want = full.depths[0, len(o.prompt) - 1: -1].tolist()
                        assert o.depths == want, (sched, batch, r.id)
                        # no token lost or duplicated: passes == tokens generated
                slots_used = {o.slots[0] for o in outs.values()}
                assert slots_used == set(range(batch))  # 11 requests > batch: slots reused
                result = {k: (o.tokens, o.depths) for k, o in outs.items()}
                reference = reference or result
                assert result == reference, (sched, batch, order)
                st = engine.stats
                assert st["passes"] == sum(r.max_new_tokens for r in requests)
                if model.cfg.family == "mor":
                    assert st["depth_sum"] == sum(sum(o.depths) for o in outs.values())
                    assert st["shared_items"] == st["depth_sum"]


def test_sampling_streams_do_not_depend_on_batch_or_order() -> None:
    model = make_model("mor-3-expert-cache", seed=2)
    requests = [Request(prompt=[1], max_new_tokens=12, id=i, seed=100 + i) for i in range(6)]
    results = []
    for batch, reqs in ((1, requests), (4, requests[::-1]), (6, requests)):
        engine = Engine(model, max_batch=batch, max_len=16, temperature=1.0,
                        kv_capacity="full")
        results.append({o.id: o.tokens for o in engine.generate(reqs)})
    assert results[0] == results[1] == results[2]
    # Different seeds give different samples (the sampler is not greedy in disguise).
    assert len({tuple(t) for t in results[0].values()}) > 1


def test_depth_wise_batching_fills_the_shared_block() -> None:
    """Depth-wise: one shared-block call per iteration over tokens at mixed depths, so the
    calls are fuller than sequence-wise decoding's shrinking recursion batches."""
    model = make_model("mor-3-expert-cache", seed=1)
    requests = [Request(prompt=[2 + i], max_new_tokens=30, id=i) for i in range(16)]
    fill = {}
    for sched in ("sequence", "depth"):
        engine = Engine(model, max_batch=8, max_len=32, kv_capacity="full", temperature=1.0)
        engine.generate(requests, sched)
        st = engine.stats
        fill[sched] = st["shared_items"] / st["shared_calls"]
    assert fill["depth"] > fill["sequence"]


# --- caches ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("capacity", ["routed", "full"])
def test_cache_bytes_equal_the_accounting(variant: str, capacity: str) -> None:
    cfg = ModelConfig.from_preset("micro", **VARIANTS[variant])
    for max_len, batch in ((64, 3), (100, 1)):
        cache = KVCache(cfg, batch, max_len, kv_capacity=capacity)
        measured = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
        steps = ([max_len] * cfg.num_recursions
                 if cfg.family == "mor" and capacity == "full" else None)
        assert measured == cache.nbytes() == flops.kv_cache_bytes(cfg, max_len, batch, 4,
                                                                  steps)


@pytest.mark.parametrize("nr", [2, 3, 4])
def test_mor_cache_memory_ratios_match_the_spec(nr: int) -> None:
    """docs/method.md §4: the recursion block's KV memory relative to a vanilla model of the
    same depth is (N_r + 1) / (2 N_r) with recursion-wise caching and 1 / N_r with sharing."""
    t = 96  # divisible by 2, 3, 4: capacities give whole token counts
    cfgs = {kv: ModelConfig.from_preset("micro", family="mor", num_recursions=nr, kv=kv)
            for kv in ("cache", "share")}
    b = cfgs["cache"].num_shared
    edge = cfgs["cache"].num_unique_first + cfgs["cache"].num_unique_last
    per_entry = 2 * cfgs["cache"].n_kv_heads * cfgs["cache"].head_dim * 4 * t
    vanilla_block = b * nr * per_entry
    for kv, want in (("cache", (nr + 1) / (2 * nr)), ("share", 1 / nr)):
        block = KVCache(cfgs[kv], 1, t).nbytes() - edge * per_entry
        assert block / vanilla_block == pytest.approx(want)


def test_routed_capacity_caps_recursion_and_never_overflows() -> None:
    """Routers that send every token on: with kv_capacity="routed" a sequence's step-r cache
    holds k_r tokens; the tokens beyond stop recursing (counted), nothing overflows."""
    model = make_model("mor-3-expert-cache")
    with torch.no_grad():
        for r in model.routers:
            r.net.weight.zero_()
            # logit = w . h > 0 for every token: a constant-sign direction after RMSNorm-free h
        model.routers[1].net.weight.fill_(0.0)
    # Force "take" by making the decision rule see positive logits: patch the router outputs.
    for r in model.routers:
        r.forward = lambda x: torch.full((*x.shape[:-1], 1), 3.0)
    engine = Engine(model, max_batch=2, max_len=30)
    caps = flops.step_tokens(model.cfg, 30)
    outs = engine.generate([Request(prompt=[1], max_new_tokens=29, id=i) for i in range(2)])
    for o in outs:
        assert len(o.tokens) == 29
        # depth >= r for exactly k_r of the 29 passes (the cache's room), in causal order
        for r, k in enumerate(caps, 1):
            assert sum(d >= r for d in o.depths) == min(29, k)
    assert engine.stats["capped"] > 0
    assert bool((engine.cache.lengths <= torch.tensor(engine.cache.capacity)[:, None]).all())


def test_prefill_that_overflows_a_routed_cache_is_refused() -> None:
    model = make_model("mor-3-expert-cache")
    for r in model.routers:
        r.forward = lambda x: torch.full((*x.shape[:-1], 1), 3.0)
    engine = Engine(model, max_batch=1, max_len=12)
    with pytest.raises(CacheFullError, match="kv_capacity='full'"):
        engine.prefill(0, list(range(1, 12)))


def test_engine_rejects_bad_requests_and_schedulers() -> None:
    model = make_model("vanilla")
    engine = Engine(model, max_batch=2, max_len=8)
    with pytest.raises(ConfigError, match="depth-wise batching needs a MoR model"):
        engine.generate([Request([1], 3)], scheduler="depth")
    with pytest.raises(ConfigError, match="max_len=8"):
        engine.generate([Request([1, 2, 3], 7, id="long")])
    with pytest.raises(ConfigError, match="max_new_tokens >= 1"):
        engine.generate([Request([1], 0)])
    with pytest.raises(ConfigError, match="scheduler must be one of"):
        engine.generate([Request([1], 2)], scheduler="fastest")
    with pytest.raises(ConfigError, match="max_len must be in"):
        Engine(model, max_batch=2, max_len=10_000)


def test_fused_weights_are_the_models_projections() -> None:
    """The engine's fused Q/K/V and gate/up matrices hold the model's weights (copies taken
    when the engine is built)."""
    model = make_model("recursive-3")
    engine = Engine(model, max_batch=1, max_len=8)
    for li, blk in enumerate(model.layers):
        at, mlp = blk.attn, blk.mlp
        assert torch.equal(engine._wqkv[li], torch.cat([at.q_proj.weight, at.k_proj.weight,
                                                        at.v_proj.weight]))
        assert torch.equal(engine._wgu[li], torch.cat([mlp.gate_proj.weight,
                                                       mlp.up_proj.weight]))
    cfg = model.cfg
    per_layer = cfg.d_model * ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + 2 * cfg.d_ff)
    assert engine.fused_bytes == 4 * per_layer * cfg.num_unique_layers  # fp32


# --- batched prefill -----------------------------------------------------------------------------
PREFILL_PROMPTS = [[5, 9, 2, 7, 1, 3, 3, 8, 9], [7], [1, 2, 3], [9, 8, 7, 6, 5, 4, 2], [4, 4],
                   [6, 1, 6, 1, 6, 1], [2, 3]]


@pytest.mark.parametrize("variant", ["vanilla", "recursive-3", "mor-3-expert-cache",
                                     "mor-3-expert-share", "mor-2-token-cache",
                                     "mor-3-token-share"])
def test_batched_prefill_loads_what_one_by_one_prefill_loads(variant: str) -> None:
    """Prompts of different lengths prefilled as ONE right-padded batch, into slots in no
    particular order, leave every slot's cache entries exactly as one forward per prompt
    does (lengths; keys/values up to float rounding), and return the same logits. The
    padded batch really has padding that the MoR forward routes deeper (so only the real
    tokens' compacted entries must be loaded)."""
    model = make_model(variant)
    prompts = PREFILL_PROMPTS[:5]
    slots = [4, 0, 2, 1, 3]
    batched = Engine(model, max_batch=5, max_len=32, kv_capacity="full")
    single = Engine(model, max_batch=5, max_len=32, kv_capacity="full", prefill_tokens=1)
    got = batched.prefill_many(slots, prompts)
    want = [single.prefill(s, p) for s, p in zip(slots, prompts)]
    assert batched.stats["prefill_calls"] == 1 and single.stats["prefill_calls"] == 5
    for g, w, p in zip(got, want, prompts):
        assert g.shape == (len(p), model.cfg.vocab_size)
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    assert torch.equal(batched.cache.lengths, single.cache.lengths)
    for e in range(len(batched.cache.capacity)):
        for s in slots:
            n = int(batched.cache.lengths[e, s])
            for a, b in ((batched.cache.k[e], single.cache.k[e]),
                         (batched.cache.v[e], single.cache.v[e])):
                torch.testing.assert_close(a[s, :, :n], b[s, :, :n], atol=2e-5, rtol=1e-4)
    if model.cfg.family == "mor" and variant != "mor-2-token-cache":
        t = max(map(len, prompts))
        ids = torch.tensor([p + [0] * (t - len(p)) for p in prompts])
        with torch.no_grad():
            depths = model(ids, routing="causal").depths
        pad = torch.arange(t) >= torch.tensor([len(p) for p in prompts]).unsqueeze(1)
        assert bool((depths[pad] >= 2).any())


@pytest.mark.parametrize("variant", ["vanilla", "recursive-3", "mor-3-expert-cache",
                                     "mor-3-expert-share", "mor-2-token-cache",
                                     "mor-3-token-share"])
def test_batched_prefill_decodes_what_one_by_one_prefill_decodes(variant: str) -> None:
    """Generation with refills prefilled in batches (several slots free at once) gives the
    same tokens, depths and logits as with one prompt per forward, under both schedulers."""
    model = make_model(variant, seed=3)
    requests = [Request(prompt=p, max_new_tokens=5 + 4 * (i // 3), id=i)
                for i, p in enumerate(PREFILL_PROMPTS)]
    for sched in schedulers(variant):
        outs, calls = {}, {}
        for budget in (1, 2048):
            engine = Engine(model, max_batch=3, max_len=32, kv_capacity="full",
                            keep_logits=True, prefill_tokens=budget)
            outs[budget] = engine.generate(requests, sched)
            calls[budget] = engine.stats["prefill_calls"]
            assert engine.stats["prefills"] == sum(len(r.prompt) > 1 for r in requests)
        assert calls[1] == engine.stats["prefills"] and calls[2048] < calls[1]
        for a, b in zip(outs[1], outs[2048]):
            assert a.tokens == b.tokens and a.depths == b.depths and a.slots == b.slots
            torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits),
                                       atol=2e-5, rtol=1e-4)


def test_prefill_many_rejects_bad_arguments() -> None:
    engine = Engine(make_model("vanilla"), max_batch=2, max_len=8)
    with pytest.raises(ConfigError, match="one distinct slot per prompt"):
        engine.prefill_many([0, 0], [[1], [2]])
    with pytest.raises(ConfigError, match="slot 2 is not in"):
        engine.prefill_many([2], [[1]])
    with pytest.raises(ConfigError, match="max_len=8"):
        engine.prefill(0, list(range(1, 10)))
    with pytest.raises(ConfigError, match="prefill_tokens"):
        Engine(make_model("vanilla"), max_batch=2, max_len=8, prefill_tokens=0)


def test_stop_callbacks_end_requests_and_free_their_slots() -> None:
    """A request whose `stop` returns True ends after that token; its slot takes the next
    request at once (the tokens are those of a run without the stop, cut)."""
    model = make_model("vanilla")
    engine = Engine(model, max_batch=2, max_len=24)
    plain = [Request(prompt=[i + 1, 2], max_new_tokens=10, id=i) for i in range(5)]
    stopped = [Request(prompt=r.prompt, max_new_tokens=10, id=r.id,
                       stop=(lambda toks, n=i + 2: len(toks) >= n)) for i, r in enumerate(plain)]
    full = engine.generate(plain)
    cut = engine.generate(stopped)
    for i, (a, b) in enumerate(zip(full, cut)):
        assert b.tokens == a.tokens[: i + 2]
    assert engine.stats["passes"] == sum(i + 2 for i in range(5))


# --- the static step (CUDA graphs capture it; eager here) ---------------------------------------
@pytest.mark.parametrize("variant", ["vanilla", "recursive-3"])
def test_static_step_equals_the_eager_step(variant: str) -> None:
    """The fixed-shape step (every slot a row, idle slots padding; attention over a width
    bucket with a mask) decodes the same tokens and logits as the eager step, across two
    width buckets (max_len 100: 64 and 100) and with idle slots at the end of the queue;
    padding rows leave the cache lengths as they were."""
    model = make_model(variant, seed=4)
    rng = random.Random(1)
    requests = [Request(prompt=[rng.randrange(1, 250) for _ in range(rng.randint(1, 12))],
                        max_new_tokens=rng.randint(20, 80), id=i) for i in range(7)]
    engines = {}
    for kind in ("eager", "static"):
        engine = Engine(model, max_batch=3, max_len=100, keep_logits=True)
        if kind == "static":
            engine._static = _StaticStep(engine, graphs=False)
            assert engine._static.widths == [64, 100]
        engines[kind] = (engine, engine.generate(requests))
    (eager, a_outs), (static, b_outs) = engines["eager"], engines["static"]
    for a, b in zip(a_outs, b_outs):
        assert a.tokens == b.tokens and a.slots == b.slots
        torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits),
                                   atol=2e-5, rtol=1e-4)
    assert max(len(r.prompt) + r.max_new_tokens for r in requests) > 64
    assert torch.equal(static.cache.lengths, eager.cache.lengths)


def test_cuda_graphs_need_cuda_and_a_plain_model() -> None:
    with pytest.raises(ConfigError, match="CUDA device"):
        Engine(make_model("vanilla"), max_batch=2, max_len=8, cuda_graphs=True)
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="MoR models decode eagerly"):
            Engine(make_model("mor-3-expert-cache").cuda(), max_batch=2, max_len=8,
                   cuda_graphs=True)
