"""mor/routing.py: the evaluation-mode helpers, the shared routing rules, and the one top-k
path of the model (a right-padded batch routes, and is scored, like the rectangular one)."""

from __future__ import annotations

import pytest
import torch

from mor import ConfigError, ModelConfig, build_model
from mor.routing import (
    NOT_ROUTED,
    causal_take,
    eval_modes,
    expert_gate,
    forward_mode,
    routing_label,
    step_logits,
    token_choice,
    topk_select,
    use_routing,
)


def micro(**kw) -> ModelConfig:
    return ModelConfig.from_preset("micro", family="mor", **kw)


def _spread(model, std: float = 1.0) -> None:
    """Large random router weights: routing decisions vary between tokens."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("routers.", "router.", "predictors.")):
                p.copy_(torch.randn(p.shape, generator=g) * std)


# --- evaluation modes ----------------------------------------------------------------------------
def test_eval_modes_and_routing_label():
    vanilla = ModelConfig.from_preset("micro")
    recursive = ModelConfig.from_preset("micro", family="recursive", num_recursions=2)
    assert eval_modes(vanilla) == eval_modes(recursive) == ()
    assert routing_label(vanilla) == routing_label(recursive) == NOT_ROUTED == "default"
    assert eval_modes(micro(num_recursions=2)) == ("topk", "causal")
    assert eval_modes(micro(num_recursions=2, eval_routing="causal")) == ("topk", "causal")
    assert eval_modes(micro(num_recursions=2, router="token")) == ("causal",)
    assert routing_label(micro(num_recursions=2)) == "topk"
    assert routing_label(micro(num_recursions=2, eval_routing="causal")) == "causal"
    assert routing_label(micro(num_recursions=2, router="token")) == "causal"


def test_use_routing_switches_and_restores_also_on_error():
    model = build_model(micro(num_recursions=2)).eval()
    with use_routing(model, "causal") as m:
        assert m is model and model.cfg.eval_routing == "causal"
        assert model.routing_mode == "causal"
    assert model.cfg.eval_routing == "topk"
    with pytest.raises(RuntimeError, match="boom"), use_routing(model, "causal"):
        assert model.cfg.eval_routing == "causal"
        raise RuntimeError("boom")
    assert model.cfg.eval_routing == "topk"
    with use_routing(model, None):
        assert model.cfg.eval_routing == "topk"
    with pytest.raises(ConfigError, match="eval_routing"), use_routing(model, "sometimes"):
        pass
    assert model.cfg.eval_routing == "topk"


def test_use_routing_leaves_models_without_a_switch_alone():
    vanilla = build_model(ModelConfig.from_preset("micro"))
    cfg = vanilla.cfg
    with use_routing(vanilla, "causal") as m:
        assert m.cfg is cfg
    token = build_model(micro(num_recursions=2, router="token"))
    with use_routing(token, "causal"):
        assert token.cfg.eval_routing == "causal"
    with pytest.raises(ConfigError, match="token-choice"), use_routing(token, "topk"):
        pass
    assert token.cfg.eval_routing == "causal"


def test_forward_mode_and_an_explicit_routing_leave_the_model_alone():
    cfg = micro(num_recursions=3)
    assert forward_mode(cfg, training=True) == "topk"
    assert forward_mode(cfg, training=False) == "topk"
    assert forward_mode(cfg, training=True, mode="causal") == "causal"
    assert forward_mode(cfg.replace(eval_routing="causal"), training=False) == "causal"
    assert forward_mode(micro(num_recursions=2, router="token"), False, "causal") == "token"
    with pytest.raises(ConfigError, match="token-choice"):
        forward_mode(micro(num_recursions=2, router="token"), False, "topk")
    with pytest.raises(ConfigError, match="routing mode"):
        forward_mode(cfg, False, "sometimes")

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _spread(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        explicit = model(ids, routing="causal")
        assert model.cfg.eval_routing == "topk"
        topk = model(ids)
        with use_routing(model, "causal"):
            switched = model(ids)
    assert torch.equal(explicit.logits, switched.logits)
    assert torch.equal(explicit.depths, switched.depths)
    assert not torch.equal(explicit.depths, topk.depths)  # the mode really differs


# --- the shared rules ----------------------------------------------------------------------------
def test_causal_take():
    took = torch.tensor([True, True, False, True])
    decide = torch.tensor([0.5, -0.5, 2.0, 0.0])
    assert causal_take(took, decide).tolist() == [True, False, False, False]
    assert causal_take(took, None, True).tolist() == took.tolist()
    full = torch.tensor([False, True, True, False])  # per token (decoding: mixed steps)
    assert causal_take(took, decide, full).tolist() == [True, True, False, False]


def test_gates_and_token_choice():
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.0]])
    cfg = micro(num_recursions=2, router_alpha=0.5, router_func="tanh")
    torch.testing.assert_close(expert_gate(logits, cfg), 0.5 * logits.tanh())
    cfg = micro(num_recursions=2)  # sigmoid, alpha 0.1
    torch.testing.assert_close(expert_gate(logits, cfg), 0.1 * logits.sigmoid())

    tok = micro(num_recursions=3, router="token", router_alpha=2.0)
    lg = torch.tensor([[1.0, 0.9, -1.0], [0.0, 0.1, 3.0]])
    choice, probs, gate = token_choice(lg, tok)
    torch.testing.assert_close(probs, lg.softmax(-1))
    assert choice.tolist() == [0, 2]
    torch.testing.assert_close(gate, 2.0 * probs.max(-1).values)
    # Loss-free balancing: the bias moves the CHOICE, never the gate; ignored otherwise.
    bias = torch.tensor([0.0, 0.5, 0.0])
    assert token_choice(lg, tok, bias)[0].tolist() == [0, 2]
    lf = micro(num_recursions=3, router="token", balancing="loss_free", router_func="sigmoid")
    choice, probs, gate = token_choice(lg, lf, bias)
    torch.testing.assert_close(probs, lg.sigmoid())
    assert choice.tolist() == [1, 1]
    torch.testing.assert_close(gate, probs[:, 1])  # alpha 1.0, the biased pick's own score


def test_step_logits_per_row_steps_equal_one_step_at_a_time():
    torch.manual_seed(0)
    model = build_model(micro(num_recursions=3))
    _spread(model)
    h = torch.randn(6, model.cfg.d_model)
    rec = torch.tensor([1, 2, 3, 3, 1, 4])  # 4: past N_r, reads step 3
    got = step_logits(model.routers, h, rec)
    for i, r in enumerate(rec.tolist()):
        want = step_logits(model.routers, h[i: i + 1], min(r, 3))
        torch.testing.assert_close(got[i: i + 1], want)


def test_topk_select_ragged_equals_rectangular_on_full_rows_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, generator=g)
    pos = torch.arange(10).expand(3, 10)
    top, keep, k = topk_select(logits, 0.5, 10)
    assert keep is None and k == 5
    assert (top.diff(dim=1) > 0).all()  # causal order
    rtop, rkeep, rk = topk_select(logits, 0.5, 10, torch.full((3,), 10),
                                  torch.ones(3, 10, dtype=torch.bool), pos)
    assert torch.equal(rtop, top) and bool(rkeep.all()) and rk.tolist() == [5, 5, 5]
    # Row 1 has 4 real tokens: padding scored highest still never competes.
    lengths = torch.tensor([10, 4, 10])
    valid = pos < lengths.unsqueeze(1)
    padded = logits.clone()
    padded[1, 4:] = 100.0
    rtop, rkeep, rk = topk_select(padded, 0.5, 10, lengths, valid, pos)
    assert rk.tolist() == [5, 2, 5]
    kept1 = rtop[1][rkeep[1]]
    assert kept1.tolist() == sorted(logits[1, :4].topk(2).indices.tolist())
    assert torch.equal(rtop[0], top[0]) and torch.equal(rtop[2], top[2])


# --- one top-k path: ragged == rectangular -------------------------------------------------------
@pytest.mark.parametrize("expert_aux", ["loss", "router"])
@pytest.mark.parametrize("pad", [0, 5])
def test_ragged_topk_scores_like_the_rectangular_path(expert_aux: str, pad: int):
    """A batch with `lengths` (all rows T real tokens, right-padded by `pad`) gives the same
    logits, depths, LM loss, aux loss (BCE or predictor loss, and z-loss) and routing
    statistics (selected fractions, gates, BCE, sampling accuracy, dead tokens) as the
    rectangular batch without `lengths`."""
    torch.manual_seed(2)
    cfg = micro(num_recursions=3, expert_aux=expert_aux, router_z_coef=1e-3)
    model = build_model(cfg).train()
    _spread(model, 0.5)
    b, t = 3, 24
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    xp = torch.cat([x, torch.zeros(b, pad, dtype=torch.long)], 1)
    yp = torch.cat([y, torch.full((b, pad), -100)], 1)
    with torch.no_grad():
        rect = model(x, y)
        ragged = model(xp, yp, lengths=torch.full((b,), t))
    torch.testing.assert_close(ragged.logits[:, :t], rect.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(ragged.depths[:, :t], rect.depths)
    assert int(ragged.depths[:, t:].abs().sum()) == 0  # padding never recurses
    torch.testing.assert_close(ragged.lm_loss, rect.lm_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ragged.aux_loss, rect.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ragged.loss, rect.loss, atol=1e-5, rtol=1e-5)
    assert sorted(ragged.stats) == sorted(rect.stats)
    for name in ("sampling_acc", "dead_token_ratio", "router_bce/r2", "gate_mean/r3"):
        assert name in rect.stats
    for name, value in rect.stats.items():
        torch.testing.assert_close(ragged.stats[name].float(), value.float(), atol=1e-6,
                                   rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert float(rect.aux_loss) > 0


def test_ragged_rows_route_as_they_would_alone():
    """Mixed lengths: each row's depths and logits equal those of the row alone."""
    torch.manual_seed(4)
    cfg = micro(num_recursions=3, expert_aux="router", router_z_coef=1e-3)
    model = build_model(cfg).eval()
    _spread(model, 0.5)
    g = torch.Generator().manual_seed(5)
    lengths = [20, 13, 7]
    rows = [torch.randint(1, cfg.vocab_size, (n,), generator=g) for n in lengths]
    ids = torch.zeros(3, 20, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    with torch.no_grad():
        batch = model(ids, lengths=torch.tensor(lengths))
        for i, r in enumerate(rows):
            alone = model(r.unsqueeze(0))
            n = len(r)
            assert torch.equal(batch.depths[i, :n], alone.depths[0])
            torch.testing.assert_close(batch.logits[i, :n], alone.logits[0], atol=1e-5,
                                       rtol=1e-5)
    assert batch.aux_loss is not None and "sampling_acc" in batch.stats
    frac = [max(1, int(cfg.step_capacities[1] * n)) / n for n in lengths]
    assert float(batch.stats["selected_frac/r2"]) == pytest.approx(sum(frac) / 3, rel=1e-6)
