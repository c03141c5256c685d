"""Calibrate the efficiency knob of a trained expert-choice MoR model (docs/routing.md,
"The efficiency knob").

The causal rule lets token t take step r iff it took r-1 and its deciding logit exceeds the
step's threshold. With the default threshold 0 the fraction of tokens that take each step
drifts from the capacities the model was trained for; `calibrate_thresholds` picks, on
held-out windows, the threshold of each step so that the fraction of ALL tokens taking it
matches a target: the trained capacities by default, any other fractions, or the fractions
that give a target mean depth (`fractions_for_depth`). Steps are calibrated in order, each
with the thresholds of the earlier steps already in force (a step's candidates are the
tokens that took the previous one).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mor.errors import ConfigError
from mor.model import CausalLM
from mor.routing import RoutingKnob, use_knob


def _check_expert(model: CausalLM) -> None:
    cfg = model.cfg
    if cfg.family != "mor" or cfg.router != "expert":
        raise ConfigError("threshold calibration applies to expert-choice MoR models "
                          f"(got family={cfg.family!r}"
                          + (f", router={cfg.router!r})" if cfg.family == "mor" else ")"))


def fractions_for_depth(cfg, depth: float) -> tuple[float, ...]:
    """Per-step target fractions with mean depth `depth` (in [steps of capacity 1, N_r]):
    the trained capacities of the routed steps scaled by one factor (clipped at 1), so the
    trained SHAPE of the hierarchy is kept while its depth moves."""
    caps = cfg.step_capacities
    nr = len(caps)
    lo = sum(1.0 for c in caps if c >= 1.0)
    if not lo <= depth <= nr:
        raise ConfigError(f"target depth {depth:g} is outside [{lo:g}, {nr}] for this model "
                          f"(capacities {list(caps)}; steps of capacity 1 are always taken)")

    def frac(s: float) -> tuple[float, ...]:
        return tuple(1.0 if c >= 1.0 else min(1.0, c * s) for c in caps)

    a, b = 0.0, 1.0
    while sum(frac(b)) < depth - 1e-12:
        b *= 2
        if b > 1e9:
            break
    for _ in range(100):  # bisection on the monotone sum
        m = 0.5 * (a + b)
        if sum(frac(m)) < depth:
            a = m
        else:
            b = m
    return frac(b)


def _threshold_for(logits: Tensor, k: int) -> float:
    """A threshold t with exactly k of `logits` > t (ties aside): the midpoint between the
    k-th and (k+1)-th largest; +inf for k = 0, -inf for k = all."""
    n = logits.numel()
    if k <= 0:
        return math.inf
    if k >= n:
        return -math.inf
    top = logits.topk(k + 1).values
    return float(0.5 * (top[k - 1] + top[k]))


@torch.no_grad()
def _trace(model: CausalLM, windows: Tensor, knob: RoutingKnob, batch_size: int):
    """Per step: (deciding logits of the tokens that took the previous step, total tokens)."""
    steps: dict[int, list[Tensor]] = {}
    total = 0
    model.routing_trace = []
    was_training = model.training
    model.eval()
    try:
        with use_knob(model, knob):
            for i in range(0, windows.shape[0], batch_size):
                ids = windows[i: i + batch_size].to(next(model.parameters()).device)
                model.routing_trace.clear()
                model(ids, routing="causal")
                total += ids.numel()
                for r, decide, prev in model.routing_trace:
                    steps.setdefault(r, []).append(decide[prev].float().cpu())
    finally:
        model.routing_trace = None
        model.train(was_training)
    return {r: torch.cat(v) for r, v in steps.items()}, total


def selected_fractions(model: CausalLM, windows: Tensor, knob: RoutingKnob | None = None,
                       batch_size: int = 16) -> tuple[float, ...]:
    """Fraction of all tokens of `windows` [N, T] that take each step under the causal rule
    with `knob` (None: the model's own)."""
    _check_expert(model)
    knob = knob if knob is not None else (model.knob or RoutingKnob())
    thr = knob.thresholds or (0.0,) * model.cfg.num_recursions
    caps = model.cfg.step_capacities
    logs, total = _trace(model, windows, knob, batch_size)
    out, prev = [], 1.0
    for r in range(1, model.cfg.num_recursions + 1):
        if caps[r - 1] >= 1.0:
            out.append(prev)
            continue
        if r not in logs:  # nobody reached the step
            out.append(0.0)
        else:
            out.append(float((logs[r] > thr[r - 1]).sum()) / total)
        prev = out[-1]
    return tuple(out)


def calibrate_thresholds(model: CausalLM, windows: Tensor,
                         targets: tuple[float, ...] | None = None, *,
                         batch_size: int = 16) -> RoutingKnob:
    """A knob whose per-step thresholds make the causal rule select `targets` (fraction of
    all tokens per step; default the trained capacities) on `windows` [N, T] token ids.

    Calibrate on windows the model was not trained on and check on others
    (`selected_fractions`): the thresholds are quantiles of the routers' logits, so they carry
    over to text of the same distribution."""
    _check_expert(model)
    cfg = model.cfg
    nr = cfg.num_recursions
    caps = cfg.step_capacities
    targets = tuple(caps if targets is None else targets)
    if len(targets) != nr:
        raise ConfigError(f"calibration targets: one fraction per step (N_r = {nr}), got "
                          f"{list(targets)}")
    if any(not 0 <= f <= 1 for f in targets) or any(b > a for a, b in zip(targets,
                                                                         targets[1:])):
        raise ConfigError(f"calibration targets must be non-increasing fractions in [0, 1], "
                          f"got {list(targets)}")
    for r, (c, f) in enumerate(zip(caps, targets), 1):
        if c >= 1.0 and f < 1.0:
            raise ConfigError(f"step {r} was trained with capacity 1 (every token takes it); "
                              f"its target fraction must be 1, got {f:g}")
    thr = [0.0] * nr
    for r in range(1, nr + 1):
        if caps[r - 1] >= 1.0:
            continue
        # Thresholds of steps < r are final; step r's logits do not depend on its own.
        logs, total = _trace(model, windows, RoutingKnob(thresholds=tuple(thr)), batch_size)
        cand = logs.get(r, torch.empty(0))
        thr[r - 1] = _threshold_for(cand, round(targets[r - 1] * total)) if cand.numel() \
            else math.inf
    return RoutingKnob(thresholds=tuple(thr)).validate(cfg)
