"""The efficiency knob (mor.routing.RoutingKnob, mor.calibrate): evaluation-time thresholds,
capacities and depth bias of a trained MoR model, in the forward and the decode engine."""

from __future__ import annotations

import math

import pytest
import torch

from mor import ModelConfig, build_model
from mor.calibrate import calibrate_thresholds, fractions_for_depth, selected_fractions
from mor.decode import Engine, Request
from mor.errors import ConfigError
from mor.routing import RoutingKnob, use_knob

INF = math.inf


def make(nr: int = 3, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_preset("micro", family="mor", num_recursions=nr,
                                                **kw)).eval()
    with torch.no_grad():  # sharper routers: decisions far from float-rounding ties
        for name, p in model.named_parameters():
            if name.startswith(("routers", "predictors", "router.")):
                p.mul_(8.0)
    return model


def windows(n: int, t: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 257, (n, t), generator=g)


def decode(model, n_req: int = 4, new: int = 12, prompt_len: int = 1):
    engine = Engine(model, max_batch=3, max_len=40, kv_capacity="full", keep_logits=True)
    reqs = [Request(prompt=[(7 * i + j) % 250 + 1 for j in range(prompt_len + i % 2)],
                    max_new_tokens=new, id=i) for i in range(n_req)]
    return {s: engine.generate(reqs, s) for s in ("sequence", "depth")}


def check_decode_equals_forward(model, outs_by_sched) -> list[int]:
    depths = []
    for outs in outs_by_sched.values():
        for o in outs:
            with torch.no_grad():
                full = model(torch.tensor([o.prompt + o.tokens]), routing="causal")
            ref = full.logits[0, len(o.prompt) - 1: -1]
            torch.testing.assert_close(torch.stack(o.logits), ref, atol=2e-5, rtol=1e-4)
            assert o.depths == full.depths[0, len(o.prompt) - 1: -1].tolist()
            depths += o.depths
    return depths


# --- calibration ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"expert_aux": "router"}])
def test_calibration_hits_the_trained_capacities_on_held_out_windows(kw) -> None:
    model = make(3, **kw)
    cal, held = windows(96, seed=1), windows(96, seed=2)
    before = selected_fractions(model, held)
    knob = calibrate_thresholds(model, cal)
    after = selected_fractions(model, held, knob)
    target = model.cfg.step_capacities
    assert all(abs(a - b) <= 0.02 for a, b in zip(after, target)), (after, target)
    # The default threshold 0 did not already hit them: calibration changed something.
    assert max(abs(a - b) for a, b in zip(before, target)) > 0.02 or knob.thresholds != (0,) * 3


@pytest.mark.parametrize("depth", [1.3, 2.0, 2.7])
def test_calibration_to_a_target_depth(depth: float) -> None:
    model = make(3)
    fr = fractions_for_depth(model.cfg, depth)
    assert sum(fr) == pytest.approx(depth, abs=1e-6)
    assert fr[0] == 1.0 and fr[1] >= fr[2]
    knob = calibrate_thresholds(model, windows(96, seed=3), fr)
    got = selected_fractions(model, windows(96, seed=4), knob)
    assert all(abs(a - b) <= 0.02 for a, b in zip(got, fr)), (got, fr)
    assert sum(got) == pytest.approx(depth, abs=0.05)


def test_fractions_for_depth_refuses_what_the_model_cannot_do() -> None:
    cfg = make(3).cfg
    with pytest.raises(ConfigError, match="outside"):
        fractions_for_depth(cfg, 3.5)
    with pytest.raises(ConfigError, match="outside"):
        fractions_for_depth(cfg, 0.5)
    with pytest.raises(ConfigError, match="capacity 1"):
        calibrate_thresholds(make(3), windows(4), (0.5, 0.5, 0.2))
    with pytest.raises(ConfigError, match="expert-choice"):
        calibrate_thresholds(make(3, router="token"), windows(4))


# --- thresholds: the extremes and parity ------------------------------------------------------
def test_plus_inf_gives_depth_one_and_minus_inf_full_depth() -> None:
    model = make(3)
    ids = windows(4)
    for thr, want in ((INF, 1), (-INF, 3)):
        with use_knob(model, RoutingKnob(thresholds=(thr,) * 3)):
            with torch.no_grad():
                d = model(ids, routing="causal").depths
            assert d.unique().tolist() == [want]
            outs = decode(model)
            depths = check_decode_equals_forward(model, outs)
            assert set(depths) == {want}
    assert model.knob is None  # use_knob restored it


def test_minus_inf_decoding_equals_the_every_token_every_step_forward() -> None:
    """-inf thresholds: the engine's output equals the forward in which every token takes
    every step (top-k with capacity 1 everywhere: the recursive-equivalent computation)."""
    model = make(3)
    with use_knob(model, RoutingKnob(thresholds=(-INF,) * 3)):
        outs = decode(model, n_req=3, new=10)["depth"]
    with use_knob(model, RoutingKnob(capacities=(1.0, 1.0, 1.0))):
        for o in outs:
            with torch.no_grad():
                full = model(torch.tensor([o.prompt + o.tokens]), routing="topk")
            ref = full.logits[0, len(o.prompt) - 1: -1]
            torch.testing.assert_close(torch.stack(o.logits), ref, atol=2e-5, rtol=1e-4)
            assert full.depths.unique().tolist() == [3]


@pytest.mark.parametrize("kw", [{}, {"kv": "share"}, {"expert_aux": "router"}])
def test_decode_equals_forward_under_calibrated_thresholds(kw) -> None:
    model = make(3, **kw)
    knob = calibrate_thresholds(model, windows(8), fractions_for_depth(model.cfg, 1.8))
    with use_knob(model, knob):
        depths = check_decode_equals_forward(model, decode(model, prompt_len=3))
    assert len(set(depths)) > 1  # mixed depths were exercised


def test_thresholds_move_depth_monotonically() -> None:
    model = make(3)
    ids = windows(8)
    means = []
    for thr in (-2.0, -0.5, 0.0, 0.5, 2.0):
        with use_knob(model, RoutingKnob(thresholds=(thr,) * 3)), torch.no_grad():
            means.append(model(ids, routing="causal").depths.float().mean().item())
    assert means == sorted(means, reverse=True)
    assert means[0] > means[-1]


# --- capacities (top-k evaluation) and depth bias (token-choice) -----------------------------
def test_capacity_knob_sets_top_k_evaluation_and_training_ignores_it() -> None:
    model = make(3)
    ids = windows(2, t=40)
    knob = RoutingKnob(capacities=(1.0, 0.5, 0.25))
    with use_knob(model, knob), torch.no_grad():
        d = model(ids, routing="topk").depths
        assert (d >= 2).float().mean().item() == pytest.approx(0.5)
        assert (d >= 3).float().mean().item() == pytest.approx(0.25)
        model.train()
        with_knob = model(ids, ids).loss
        model.set_knob(None)
        without = model(ids, ids).loss
        model.eval()
    torch.testing.assert_close(with_knob, without)


@pytest.mark.parametrize("kv", ["cache", "share"])
def test_depth_bias_steers_token_choice_and_decoding_follows(kv: str) -> None:
    model = make(3, router="token", kv=kv)
    ids = windows(4)
    means = []
    for b in (-10.0, -0.05, 0.0, 0.05, 10.0):
        with use_knob(model, RoutingKnob(depth_bias=tuple(b * i for i in range(3)))):
            with torch.no_grad():
                means.append(model(ids).depths.float().mean().item())
            if abs(b) == 10.0:
                depths = check_decode_equals_forward(model, decode(model))
                assert set(depths) == {1 if b < 0 else 3}
    assert means == sorted(means) and means[0] == 1.0 and means[-1] == 3.0


def test_knob_validation_names_the_field() -> None:
    expert, token = make(3), make(3, router="token")
    vanilla = build_model(ModelConfig.from_preset("micro", family="vanilla"))
    cases = [
        (expert, RoutingKnob(thresholds=(0.0, 1.0)), "thresholds: needs one value per"),
        (expert, RoutingKnob(capacities=(1.0, 0.2, 0.5)), "non-increasing"),
        (expert, RoutingKnob(capacities=(1.0, 0.0, 0.0)), r"in \(0, 1\]"),
        (expert, RoutingKnob(depth_bias=(0.0, 1.0, 2.0)), "token-choice"),
        (token, RoutingKnob(thresholds=(0.0,) * 3), "expert-choice"),
        (token, RoutingKnob(depth_bias=(0.0, INF, 0.0)), "finite"),
        (vanilla, RoutingKnob(thresholds=(0.0,)), "MoR models only"),
    ]
    for model, knob, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            model.set_knob(knob)
    vanilla.set_knob(RoutingKnob())  # an empty knob is fine anywhere
    assert vanilla.knob is None


def test_knob_round_trips_through_json() -> None:
    import json

    k = RoutingKnob(thresholds=(0.0, INF, -INF))
    assert RoutingKnob.from_dict(json.loads(json.dumps(k.to_dict()))) == k
    with pytest.raises(ConfigError, match="unknown knob field"):
        RoutingKnob.from_dict({"threshold": [0]})
