"""The loop's optimizer step (`evals.training.loop.TrainStep`) as `train` uses it: the step's
routing statistics under gradient accumulation (loss-free balancing's bias, docs/method.md)
and the training-average routing statistics `train` reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evals.training.budget import Budget, plan_training
from evals.training.loop import StepResult, TrainConfig, TrainStep, make_optimizer, train
from mor import ModelConfig, build_model

SEQ_LEN = 32  # the window length of the `micro_data` fixture (tests/conftest.py)
CPU = torch.device("cpu")


def _loss_free(**kw) -> ModelConfig:
    # A large update rate so one step moves the bias visibly.
    return ModelConfig.from_preset("micro", family="mor", num_recursions=3, router="token",
                                   balancing="loss_free", bias_update_rate=0.1, **kw)


def _build(cfg: ModelConfig, bias: torch.Tensor | None = None):
    torch.manual_seed(0)
    model = build_model(cfg)
    if bias is not None:
        model.router_bias.copy_(bias)
    return model


def _one_step_bias(cfg: ModelConfig, bias: torch.Tensor, w: torch.Tensor, batch_size: int,
                   grad_accum: int) -> torch.Tensor:
    """The router bias after one `train` step over windows `w`, split into micro-batches."""
    model = _build(cfg, bias)
    batches = iter([(s[:, :-1], s[:, 1:]) for s in w.split(batch_size)])
    plan = plan_training(cfg, Budget(tokens=w.shape[0] * SEQ_LEN), SEQ_LEN, batch_size,
                         grad_accum)
    assert plan.steps == 1
    tcfg = TrainConfig(batch_size=batch_size, grad_accum=grad_accum, lr=1e-3, device="cpu")
    train(model, batches, plan, tcfg, warmup_steps=1, device=CPU)
    return model.router_bias.detach().clone()


def _discriminating_bias(cfg: ModelConfig, w: torch.Tensor):
    """An initial bias under which the loads of all of `w` and of its second half move the
    bias differently (a freshly initialised router is too lopsided for the sign update to
    notice which tokens it was given), and the full batch's loads under it."""
    probe = _build(cfg).train()
    logits = []
    probe.router.register_forward_hook(lambda mod, inp, out: logits.append(out.detach()))
    with torch.no_grad():
        probe(w[:, :-1], w[:, 1:], step=0)
    probs = logits[0].float().softmax(-1)  # token-choice routers score with softmax

    def loads(p, bias):
        return F.one_hot((p + bias).argmax(-1), 3).float().mean((0, 1))

    half = w.shape[0] // 2
    spread = 3 * float(probs.std((0, 1)).max())  # an untrained router is nearly uniform
    grid = torch.linspace(-spread, spread, 41)
    for b1 in grid:
        for b2 in grid:
            bias = torch.tensor([float(b1), float(b2), 0.0])
            full, last = loads(probs, bias), loads(probs[half:], bias)
            if not torch.equal(torch.sign(full.mean() - full), torch.sign(last.mean() - last)):
                return bias, full
    raise AssertionError("test data does not discriminate; pick other windows")


def test_loss_free_bias_moves_on_the_whole_steps_loads(micro_data):
    cfg = _loss_free()
    w = micro_data.train.windows[:8]
    # Moving the bias on the second half's loads alone would give another update.
    bias, full = _discriminating_bias(cfg, w)
    one = _one_step_bias(cfg, bias, w, batch_size=8, grad_accum=1)
    two = _one_step_bias(cfg, bias, w, batch_size=4, grad_accum=2)
    torch.testing.assert_close(one, bias + cfg.bias_update_rate * torch.sign(full.mean() - full))
    torch.testing.assert_close(two, one, atol=0, rtol=0)


def test_train_step_combines_micro_batch_stats_and_calls_after_step_once():
    cfg = _loss_free()
    model = _build(cfg).train()
    calls: list[dict[str, torch.Tensor]] = []
    model.after_optimizer_step = lambda stats: calls.append(stats)  # spy (instance attr)
    tcfg = TrainConfig(batch_size=2, grad_accum=3, device="cpu")
    step = TrainStep(model, make_optimizer(model, tcfg, CPU), tcfg, total_steps=10,
                     warmup_steps=2, device=CPU)
    g = torch.Generator().manual_seed(1)
    micro = [(w[:, :-1], w[:, 1:]) for w in
             torch.randint(0, cfg.vocab_size, (6, SEQ_LEN + 1), generator=g).split(2)]
    with torch.no_grad():
        per_micro = [model(x, y, step=0).stats for x, y in micro]
    res = step(0, micro)
    assert isinstance(res, StepResult)
    assert len(calls) == 1
    assert res.lr == pytest.approx(tcfg.lr / 2)  # WSD warm-up: step 0 of 2
    for k in ("load/d1", "load/d2", "load/d3"):
        expected = sum(float(s[k]) for s in per_micro) / 3
        assert float(calls[0][k]) == pytest.approx(expected, abs=1e-6)
        assert res.stats_count[k] == 3
    with pytest.raises(ValueError, match="grad_accum=3"):
        step(1, micro[:2])


@pytest.mark.parametrize("family,nr,grad_accum", [("mor", 2, 2), ("mor", 3, 1)])
def test_train_routing_is_the_average_over_all_steps_and_micro_batches(micro_data, family,
                                                                         nr, grad_accum):
    cfg = ModelConfig.from_preset("micro", family=family, num_recursions=nr)
    model = _build(cfg)
    seen: list[dict[str, float]] = []
    forward = model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append({k: float(v) for k, v in out.stats.items()})
        return out

    model.forward = spy
    batch, steps = 2, 5
    plan = plan_training(cfg, Budget(tokens=steps * grad_accum * batch * SEQ_LEN), SEQ_LEN,
                         batch, grad_accum)
    assert plan.steps == steps
    w = micro_data.train.windows[:steps * grad_accum * batch]
    batches = iter([(s[:, :-1], s[:, 1:]) for s in w.split(batch)])
    tcfg = TrainConfig(batch_size=batch, grad_accum=grad_accum, log_every=10, device="cpu")
    result = train(model, batches, plan, tcfg, warmup_steps=1, device=CPU)
    assert len(seen) == steps * grad_accum
    keys = set(seen[0])
    assert {"selected_frac/r1", "selected_frac/r2"} <= keys
    assert set(result.routing) == keys
    for k in keys:
        values = [s[k] for s in seen]
        assert result.routing[k] == pytest.approx(sum(values) / len(values), abs=1e-6), k
    # Sensitivity: the statistics vary between micro-batches, so a mean over a subset (e.g.
    # every 10th step's last micro-batch) would differ.
    assert any(len({round(s[k], 6) for s in seen}) > 1 for k in keys)
