"""MoR variants: token-choice, router options, KV sharing, causal routing, diagnostics,
accounting (FLOPs and KV-cache size) against what the model really computes and stores."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from evals.training.budget import Budget, plan_training
from evals.training.loop import TrainConfig, train
from mor import ConfigError, ModelConfig, build_model, flops
from mor.routing import capacity_schedule, compact_selection


def micro(**kw) -> ModelConfig:
    return ModelConfig.from_preset("micro", family="mor", **kw)


def _ids(cfg: ModelConfig, b: int = 2, t: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (b, t), generator=g)


def _spread_routers(model, std: float = 1.0) -> None:
    """Random, large router weights so routing decisions vary between tokens."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("routers.", "router.", "predictors.")):
                p.copy_(torch.randn(p.shape, generator=g) * std)


VARIANTS = {
    "token-softmax-loss": dict(router="token"),
    "token-sigmoid-lossfree": dict(router="token", router_func="sigmoid", balancing="loss_free"),
    "token-mlp-share": dict(router="token", router_arch="mlp", kv="share"),
    "expert-causal": dict(eval_routing="causal"),
    "expert-causal-share": dict(eval_routing="causal", kv="share"),
    "expert-causal-auxrouter-mlp": dict(eval_routing="causal", expert_aux="router",
                                        router_arch="mlp"),
    "expert-causal-tanh": dict(eval_routing="causal", router_func="tanh"),
}


# --- causality ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("nr", [2, 3])
def test_causal_variants_never_see_the_future(name, nr):
    torch.manual_seed(1)
    model = build_model(micro(num_recursions=nr, **VARIANTS[name])).eval()
    _spread_routers(model)
    ids = _ids(model.cfg, t=32)
    with torch.no_grad():
        base = model(ids)
        for cut in (1, 12, 31):
            changed = ids.clone()
            changed[:, cut:] = (changed[:, cut:] + 5) % model.cfg.vocab_size
            out = model(changed)
            torch.testing.assert_close(out.logits[:, :cut], base.logits[:, :cut], atol=1e-5,
                                       rtol=0)
            assert torch.equal(out.depths[:, :cut], base.depths[:, :cut])
    depths = base.depths
    assert depths.min() >= 1 and depths.max() <= nr
    assert len(torch.unique(depths)) > 1, "the test must exercise different depths"


def test_topk_mode_is_the_default_and_not_causal_for_expert_choice():
    cfg = micro(num_recursions=3)
    assert cfg.eval_routing == "topk"
    assert micro(num_recursions=3, router="token").eval_routing == "causal"
    model = build_model(cfg.replace(router_alpha=1.0)).eval()
    _spread_routers(model)
    ids = _ids(cfg, t=32)
    with torch.no_grad():
        base = model(ids)
        moved = False
        for trial in range(8):
            changed = ids.clone()
            changed[:, 16:] = torch.randint(0, cfg.vocab_size, (2, 16),
                                            generator=torch.Generator().manual_seed(trial))
            moved |= not torch.equal(model(changed).depths[:, :16], base.depths[:, :16])
    assert moved  # future tokens changed which earlier tokens recursed


# --- token-choice ------------------------------------------------------------------------------
def _fixed_router(model, logits: torch.Tensor):
    """Replace the token-choice router by one returning fixed logits [B, T, N_r]."""
    model.router.forward = lambda h: logits.to(h.dtype)


def test_token_choice_balance_and_z_loss_match_hand_computation():
    model = build_model(micro(num_recursions=3, router="token")).train()
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    _fixed_router(model, logits)
    h = torch.randn(1, 2, model.cfg.d_model)
    _, aux, stats, depths = model._token_choice(h, None)
    # Hand computation (plain floats): softmax rows, argmax depths 1 and 2.
    e = math.e
    p1 = [e**2 / (e**2 + 2), 1 / (e**2 + 2), 1 / (e**2 + 2)]
    p2 = [1 / (e + 2), e / (e + 2), 1 / (e + 2)]
    mean_p = [(a + b) / 2 for a, b in zip(p1, p2)]
    f = [3 * 0.5, 3 * 0.5, 0.0]  # N_r x fraction routed to each depth
    balance = sum(p * q for p, q in zip(mean_p, f))
    z = (math.log(e**2 + 2) ** 2 + math.log(e + 2) ** 2) / 2
    assert depths.tolist() == [[1, 2]]
    assert float(stats["balance_loss"]) == pytest.approx(balance, rel=1e-6)
    assert float(stats["router_z"]) == pytest.approx(z, rel=1e-6)
    assert float(aux) == pytest.approx(0.1 * balance + 1e-5 * z, rel=1e-6)
    assert float(stats["maxvio"]) == pytest.approx((0.5 - 1 / 3) * 3)
    assert float(stats["load_entropy"]) == pytest.approx(math.log(2))


def test_token_choice_output_is_h1_plus_gate_times_recursed_state():
    torch.manual_seed(2)
    model = build_model(micro(num_recursions=2, router="token")).train()
    t = 6
    logits = torch.zeros(1, t, 2)
    logits[0, :3, 0] = 3.0  # depth 1
    logits[0, 3:, 1] = 3.0  # depth 2
    _fixed_router(model, logits)
    h = torch.randn(1, t, model.cfg.d_model)
    out, _, _, depths = model._token_choice(h, None)
    assert depths.tolist() == [[1, 1, 1, 2, 2, 2]]
    g = torch.softmax(logits, -1).max(-1).values.unsqueeze(-1)

    def block(x, pos):
        cos, sin = model.rope_for(pos)
        for i in model.shared:
            x, _ = model.layers[i](x, cos, sin)
        return x

    f1 = block(h, torch.arange(t).unsqueeze(0))  # recursion 1: every token
    f2 = block(f1[:, 3:], torch.arange(3, t).unsqueeze(0))  # recursion 2: depth-2 tokens
    torch.testing.assert_close(out[:, :3], h[:, :3] + g[:, :3] * f1[:, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 3:], h[:, 3:] + g[:, 3:] * f2, atol=1e-5, rtol=0)


def test_loss_free_bias_moves_load_toward_balance():
    torch.manual_seed(3)
    cfg = micro(num_recursions=3, router="token", balancing="loss_free",
                bias_update_rate=0.01)
    model = build_model(cfg).eval()
    with torch.no_grad():  # varied router scores, but a bias sends every token to depth 1
        model.router.net.weight.normal_(0, 1.0)
        model.router_bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    ids = _ids(cfg, b=4, t=48)
    with torch.no_grad():
        first = model(ids).stats
    assert float(first["load/d1"]) == 1.0 and float(first["maxvio"]) == pytest.approx(2.0)
    for _ in range(150):  # what the training loop does after each optimizer step
        with torch.no_grad():
            stats = model(ids).stats
        model.after_optimizer_step(stats)
    with torch.no_grad():
        last = model(ids).stats
    assert float(last["maxvio"]) < 0.5 * float(first["maxvio"])
    assert all(float(last[f"load/d{i}"]) > 0 for i in (1, 2, 3))
    assert "balance_loss" not in last  # loss-free: no balancing term in the loss


def test_after_optimizer_step_is_a_noop_elsewhere():
    for cfg in (micro(num_recursions=2), micro(num_recursions=2, router="token"),
                ModelConfig.from_preset("micro")):
        model = build_model(cfg)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.after_optimizer_step(model(_ids(cfg)).stats)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- expert-choice variants ------------------------------------------------------------------
def test_aux_bce_is_the_top_k_membership_loss():
    torch.manual_seed(4)
    model = build_model(micro(num_recursions=3)).train()
    h = torch.randn(2, 12, model.cfg.d_model)
    _, aux, stats, _ = model._expert_topk(h, None, None)
    # Recompute step 1's BCE: capacity 1, so every token's target is 1.
    logits1 = model.routers[0](h).squeeze(-1)
    bce1 = torch.nn.functional.binary_cross_entropy_with_logits(logits1, torch.ones_like(logits1))
    assert float(stats["router_bce/r1"]) == pytest.approx(bce1.item(), rel=1e-5)
    total = sum(float(stats[f"router_bce/r{r}"]) for r in (1, 2, 3))
    assert aux.item() == pytest.approx(0.001 * total, rel=1e-5)


def test_sampling_accuracy_and_dead_tokens_on_constructed_scores():
    model = build_model(micro(num_recursions=2)).train()
    t = 8
    # Step 2 keeps 4 of 8: scores rank positions 4..7 highest.
    scores = torch.tensor([-3.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 3.0])
    model.routers[1].forward = lambda x: scores[: x.shape[1]].expand(x.shape[0], -1).unsqueeze(-1)
    h = torch.randn(3, t, model.cfg.d_model)
    _, _, stats, depths = model._expert_topk(h, None, None)
    assert float(stats["sampling_acc/r2"]) == 1.0  # logit > 0 exactly for the top-k
    # Every sequence picks the same positions: half the positions never reach step 2.
    assert float(stats["dead_token_ratio"]) == pytest.approx(0.5)
    assert depths[:, 4:].eq(2).all() and depths[:, :4].eq(1).all()
    shifted = scores + 5.0  # every logit > 0: the causal rule would keep everyone
    model.routers[1].forward = lambda x: shifted[: x.shape[1]].expand(x.shape[0], -1).unsqueeze(-1)
    _, _, stats, _ = model._expert_topk(h, None, None)
    assert float(stats["sampling_acc/r2"]) == pytest.approx(0.5)


def test_aux_router_predictor_learns_from_detached_states_only():
    torch.manual_seed(5)
    model = build_model(micro(num_recursions=2, expert_aux="router")).train()
    out = model(_ids(model.cfg), _ids(model.cfg, seed=1))
    out.aux_loss.backward()  # the predictor loss alone
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.predictors.parameters())
    for name, p in model.named_parameters():
        if not name.startswith("predictors."):
            assert p.grad is None or p.grad.abs().sum() == 0, name


def test_capacity_warmup_schedule():
    cfg = micro(num_recursions=3, capacity_warmup_steps=100)
    target = (1.0, 2 / 3, 1 / 3)
    assert capacity_schedule(cfg, 0) == pytest.approx((1.0, 1.0, 1.0))
    mid = capacity_schedule(cfg, 50)  # cosine at half way: halfway between 1 and target
    assert mid == pytest.approx(tuple(c + (1 - c) * 0.5 for c in target))
    assert capacity_schedule(cfg, 25)[2] > mid[2] > capacity_schedule(cfg, 75)[2]
    assert capacity_schedule(cfg, 100) == pytest.approx(target)
    assert capacity_schedule(cfg, 10_000) == pytest.approx(target)
    assert capacity_schedule(cfg, None) == pytest.approx(target)
    model = build_model(cfg).train()
    ids = _ids(cfg, t=30)
    assert float(model(ids, step=0).stats["selected_frac/r3"]) == 1.0
    assert float(model(ids, step=100).stats["selected_frac/r3"]) == pytest.approx(10 / 30)


# --- KV sharing --------------------------------------------------------------------------------
def _count_kv_projection_calls(model, ids, **kw) -> dict[int, int]:
    calls: dict[int, int] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        def hook(_m, _inp, _out, i=i):
            calls[i] = calls.get(i, 0) + 1
        hooks.append(layer.attn.k_proj.register_forward_hook(hook))
    with torch.no_grad():
        out = model(ids, **kw)
    for h in hooks:
        h.remove()
    return calls, out


@pytest.mark.parametrize("router", ["expert", "token"])
def test_kv_sharing_computes_no_kv_after_the_first_recursion(router):
    nr = 3
    share = build_model(micro(num_recursions=nr, router=router, kv="share")).train()
    cache = build_model(micro(num_recursions=nr, router=router, kv="cache")).train()
    ids = _ids(share.cfg, t=30)
    calls_share, out = _count_kv_projection_calls(share, ids, collect_kv=True)
    calls_cache, _ = _count_kv_projection_calls(cache, ids)
    for i in share.shared:
        assert calls_share[i] == 1
        assert calls_cache[i] == nr
    # Deeper recursions attend over the very tensors the first recursion produced.
    first = {e.layer: e for e in out.kv if e.recursion == 1}
    deeper = [e for e in out.kv if e.recursion > 1]
    assert deeper and all(e.shared for e in deeper)
    for e in deeper:
        assert e.k is first[e.layer].k and e.k.shape[2] == 30


def test_kv_sharing_changes_only_what_it_should():
    torch.manual_seed(6)
    cache = build_model(micro(num_recursions=2)).train()
    share = build_model(micro(num_recursions=2, kv="share")).train()
    share.load_state_dict(cache.state_dict())
    h = torch.randn(2, 16, cache.cfg.d_model)
    out_c, _, _, d_c = cache._expert_topk(h, None, None)
    out_s, _, _, d_s = share._expert_topk(h, None, None)
    assert torch.equal(d_c, d_s)  # recursion 1 is identical, so are the routing decisions
    one, two = d_c == 1, d_c == 2
    torch.testing.assert_close(out_s[one], out_c[one], atol=1e-6, rtol=0)
    assert not torch.allclose(out_s[two], out_c[two], atol=1e-4)


@pytest.mark.parametrize("kw", [
    dict(num_recursions=3, kv="share"),
    dict(num_recursions=2, router_arch="mlp"),
    dict(num_recursions=3, expert_aux="router"),
    dict(num_recursions=4, kv="share", router_arch="mlp"),
])
def test_exact_flops_equal_the_counter_for_expert_variants(kw):
    cfg = micro(**kw)
    model = build_model(cfg).train()
    ids = _ids(cfg, t=40)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(ids)
    assert fc.get_total_flops() == flops.flops_per_token(cfg, 40, "exact") * 40 * 2


@pytest.mark.parametrize("kv", ["cache", "share"])
def test_exact_flops_equal_the_counter_for_token_choice(kv):
    cfg = micro(num_recursions=3, router="token", kv=kv)
    model = build_model(cfg).train()
    _spread_routers(model, 0.5)
    ids = _ids(cfg, b=1, t=40)  # one sequence: no padding, the counts are the real ones
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = model(ids)
    counts = [int((out.depths >= r).sum()) for r in (1, 2, 3)]
    assert counts[0] == 40 and counts[1] < 40
    expect = flops.flops_per_token(cfg, 40, "exact", tokens_per_step=counts) * 40
    assert fc.get_total_flops() == expect


def test_paper_flops_of_kv_sharing_and_token_choice():
    base = ModelConfig.from_preset("360m", family="mor", num_recursions=3)
    share = base.replace(kv="share")
    token = base.replace(router="token")
    # Token-choice under perfect balance = expert-choice capacities.
    assert flops.flops_per_token(token, 2048) == flops.flops_per_token(base, 2048)
    d, ff, t = 960, 2560, 2048
    linear, attn = 2 * (4 * d * d + 3 * d * ff), 2 * d * t
    linear_no_kv = 2 * (2 * d * d + 3 * d * ff)  # q and o only
    caps = (1.0, 2 / 3, 1 / 3)
    expect = 2 * (linear + attn) + 10 * (linear + attn) + 10 * sum(
        linear_no_kv * c + attn * c for c in caps[1:])
    assert flops.flops_per_token(share, 2048) == pytest.approx(expect)
    # Table 3 trains the 360M expert/share N_r=3 model on 31B tokens at 16.5e18.
    assert 16.5e18 / flops.flops_per_token(share, 2048) / 1e9 == pytest.approx(31, abs=0.5)


def test_effective_flops_use_the_measured_routing():
    cfg = micro(num_recursions=3)
    caps = cfg.step_capacities
    routing = {f"selected_frac/r{r}": c for r, c in enumerate(caps, 1)}
    routing.update({f"selected_frac_sq/r{r}": c * c for r, c in enumerate(caps, 1)})
    assert flops.effective_flops_per_token(cfg, 64, routing) == pytest.approx(
        flops.flops_per_token(cfg, 64, "paper"))
    routing["selected_frac/r3"] = 0.0  # nobody took step 3
    routing["selected_frac_sq/r3"] = 0.0
    assert flops.effective_flops_per_token(cfg, 64, routing) < flops.flops_per_token(cfg, 64)
    with pytest.raises(ConfigError, match="selected_frac"):
        flops.effective_flops_per_token(cfg, 64, {})


# --- KV-cache accounting against the stored tensors ------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(family="vanilla"), dict(family="recursive", num_recursions=3),
    dict(family="mor", num_recursions=3), dict(family="mor", num_recursions=3, kv="share"),
    dict(family="mor", num_recursions=2, router="token"),
    dict(family="mor", num_recursions=3, router="token", kv="share"),
])
def test_kv_cache_size_matches_the_tensors_stored(kw):
    cfg = ModelConfig.from_preset("micro", **kw)
    model = build_model(cfg).train()
    if cfg.family == "mor":
        _spread_routers(model, 0.5)
    b, t = 3, 30
    with torch.no_grad():
        out = model(_ids(cfg, b=b, t=t), collect_kv=True)
    stored_tokens = sum(e.stored_tokens() for e in out.kv)
    if cfg.router == "token" and cfg.family == "mor":
        per_seq = [[int((out.depths[i] >= r).sum()) for r in range(1, cfg.num_recursions + 1)]
                   for i in range(b)]
        expect = sum(flops.kv_cache_tokens(cfg, t, counts) for counts in per_seq)
    else:
        expect = b * flops.kv_cache_tokens(cfg, t)
    assert stored_tokens == expect
    # Bytes: every stored (layer, token) pair holds K and V of n_kv_heads x head_dim.
    fp32_bytes = sum(2 * e.k[0, :, 0].numel() * 4 * e.stored_tokens() for e in out.kv)
    if cfg.router != "token" or cfg.family != "mor":
        assert flops.kv_cache_bytes(cfg, t, batch_size=b, bytes_per_elem=4) == fp32_bytes


@pytest.mark.parametrize("nr", [2, 3, 4])
def test_kv_memory_ratios_of_mor_spec(nr):
    cache = ModelConfig.from_preset("360m", family="mor", num_recursions=nr)
    share = cache.replace(kv="share")
    assert flops.kv_memory_ratio(cache) == pytest.approx((nr + 1) / (2 * nr))
    assert flops.kv_memory_ratio(share) == pytest.approx(1 / nr)
    t = 12 * 2048  # divisible by every N_r: the integer k_r equal c_r * T exactly
    recursion_part = lambda c: flops.kv_cache_tokens(c, t) - 2 * t  # drop the unique layers
    vanilla_same_depth = cache.num_shared * nr * t
    assert recursion_part(cache) / vanilla_same_depth == pytest.approx((nr + 1) / (2 * nr))
    assert recursion_part(share) / vanilla_same_depth == pytest.approx(1 / nr)


# --- compaction --------------------------------------------------------------------------------
def test_compact_selection():
    sel = torch.tensor([[True, False, True, False], [False, False, False, True]])
    idx, valid = compact_selection(sel)
    assert idx.tolist()[0] == [0, 2] and idx.tolist()[1][0] == 3
    assert valid.tolist() == [[True, True], [True, False]]
    idx, valid = compact_selection(torch.tensor([[True, False], [False, True]]))
    assert idx.tolist() == [[0], [1]] and valid is None
    assert compact_selection(torch.zeros(2, 3, dtype=torch.bool)) == (None, None)


# --- every variant trains -----------------------------------------------------------------------
TRAINABLE = {
    "expert-linear-sigmoid": dict(),
    "expert-mlp-tanh-z": dict(router_arch="mlp", router_func="tanh", router_z_coef=1e-3),
    "expert-auxrouter": dict(expert_aux="router"),
    "expert-warmup-share": dict(capacity_warmup_steps=3, kv="share"),
    "expert-alpha1": dict(router_alpha=1.0),
    "token-loss": dict(router="token"),
    "token-lossfree-sigmoid": dict(router="token", balancing="loss_free", router_func="sigmoid"),
    "token-mlp-share-noz": dict(router="token", router_arch="mlp", kv="share", router_z_coef=0.0),
}


@pytest.mark.parametrize("name", list(TRAINABLE))
def test_router_variants_train_without_nan(name):
    torch.manual_seed(7)
    cfg = micro(num_recursions=3, **TRAINABLE[name])
    model = build_model(cfg)
    bias_before = model.router_bias.clone() if cfg.router == "token" else None
    plan = plan_training(cfg, Budget(tokens=4 * 32 * 5), seq_len=32, batch_size=4)
    data = torch.randint(0, cfg.vocab_size, (16, 33), generator=torch.Generator().manual_seed(0))
    batches = ((data[i % 4 * 4:(i % 4 + 1) * 4, :-1], data[i % 4 * 4:(i % 4 + 1) * 4, 1:])
               for i in range(1000))
    res = train(model, batches, plan, TrainConfig(batch_size=4, log_every=1, lr=3e-3),
                warmup_steps=1, device=torch.device("cpu"))
    losses = [p["loss"] for p in res.loss_curve]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if cfg.balancing == "loss_free" and cfg.router == "token":
        assert not torch.equal(model.router_bias, bias_before)  # the loop moved the bias


# --- config validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw,field", [
    (dict(router="nearest"), "router"),
    (dict(kv="paged"), "kv"),
    (dict(router_func="softmax"), "router_func"),
    (dict(router="token", router_func="tanh"), "router_func"),
    (dict(router="token", capacities=(1.0, 0.5)), "capacities"),
    (dict(router="token", eval_routing="topk"), "eval_routing"),
    (dict(router="token", capacity_warmup_steps=10), "capacity_warmup_steps"),
    (dict(router="token", expert_aux="router"), "expert_aux"),
    (dict(balancing="loss_free"), "balancing"),
    (dict(kv="share", capacities=(0.9, 0.5)), "kv"),
    (dict(router_arch="transformer"), "router_arch"),
    (dict(capacity_warmup_steps=-1), "capacity_warmup_steps"),
    (dict(router_z_coef=-1.0), "router_z_coef"),
])
def test_unsupported_combinations_are_rejected(kw, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        micro(num_recursions=2, **kw)


@pytest.mark.parametrize("kw", [dict(router="token"), dict(kv="share"),
                                dict(eval_routing="causal"), dict(router_alpha=0.5)])
def test_routing_fields_are_rejected_for_non_mor_models(kw):
    with pytest.raises(ConfigError, match="only MoR models route tokens"):
        ModelConfig.from_preset("micro", family="recursive", num_recursions=2, **kw)
