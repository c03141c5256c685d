"""MoR routing rules, written once (docs/routing.md; docs/method.md §3).

The evaluation-mode helpers (`eval_modes`, `routing_label`, `use_routing`) are what every
caller that switches a model's routing uses. The routing rules themselves -- the router
module, capacities, selection and its compaction, the causal expert rule, token choice and
the gate -- are pure functions of tensors and the config, called by both the model's forward
(`mor.mixture`) and the decode engine (`mor.decode`), so the two cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mor.config import EVAL_ROUTING, ModelConfig
from mor.errors import ConfigError

NOT_ROUTED = "default"
"""The routing label of models without a router (vanilla, recursive)."""


# --- evaluation modes ----------------------------------------------------------------------------
def eval_modes(cfg: ModelConfig) -> tuple[str, ...]:
    """The routing modes a model can be evaluated under: expert-choice MoR both the
    paper's top-k (not causal) and the causal rule; token-choice its (causal) router;
    models without a router none."""
    if cfg.family != "mor":
        return ()
    return ("topk", "causal") if cfg.router == "expert" else (cfg.eval_routing,)


def routing_label(cfg: ModelConfig) -> str:
    """The one label a record uses for the routing a model is evaluated with."""
    return cfg.eval_routing if cfg.family == "mor" else NOT_ROUTED


@contextmanager
def use_routing(model: Any, mode: str | None) -> Iterator[Any]:
    """Evaluate `model` under routing `mode` inside the block, then restore its previous
    mode, also on error. `mode` None, or a model whose routing cannot be switched (vanilla,
    recursive, token-choice MoR, which has one causal mode), leaves it as it is; a mode the
    model does not support raises `ConfigError` (from the config's validation)."""
    cfg = model.cfg
    if mode is None or cfg.family != "mor" or mode == cfg.eval_routing:
        yield model
        return
    previous = cfg.eval_routing
    model.set_eval_routing(mode)
    try:
        yield model
    finally:
        model.set_eval_routing(previous)


def forward_mode(cfg: ModelConfig, training: bool, mode: str | None = None) -> str:
    """The routing one MoR forward pass uses: "token" for token-choice (causal by
    construction); for expert-choice the explicit `mode` when given ("topk" or "causal"),
    else "topk" in training and the config's `eval_routing` at evaluation. An explicit mode
    lets a caller (the decode engine) route a pass without switching the model."""
    if mode is not None and mode not in EVAL_ROUTING:
        raise ConfigError(f"routing mode must be one of {', '.join(EVAL_ROUTING)}, got "
                          f"{mode!r}")
    if cfg.router == "token":
        if mode == "topk":
            raise ConfigError("token-choice routing is causal by construction; 'topk' "
                              "applies to expert-choice only")
        return "token"
    if mode is not None:
        return mode
    return "topk" if training else cfg.eval_routing


# --- routers and gates ---------------------------------------------------------------------------
class Router(nn.Module):
    """Linear(d, out) or, for router_arch="mlp", Linear(d, d) -> GELU -> Linear(d, out)."""

    def __init__(self, d: int, out: int, arch: str) -> None:
        super().__init__()
        if arch == "linear":
            self.net = nn.Linear(d, out, bias=False)
        else:
            self.net = nn.Sequential(nn.Linear(d, d, bias=False), nn.GELU(),
                                     nn.Linear(d, out, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def step_logits(modules: nn.ModuleList, h: Tensor, rec: int | Tensor) -> Tensor:
    """Float logits of the per-step expert-choice routers (or aux predictors) `modules` on
    hidden states h at recursion step `rec` (1-based): an int for every row (h [..., d] ->
    [...]), or a LongTensor [n] holding each row's own step (h [n, d] -> [n]; steps past N_r
    read step N_r's module, for callers that mask those rows out)."""
    if isinstance(rec, int):
        return modules[rec - 1](h).squeeze(-1).float()
    r0 = (rec.clamp(max=len(modules)) - 1).unsqueeze(1)
    return torch.cat([m(h) for m in modules], -1).float().gather(1, r0).squeeze(1)


def router_scores(logits: Tensor, func: str) -> Tensor:
    """func(logits): "sigmoid" or "tanh" elementwise (expert-choice: one logit per step),
    "softmax" over the last dimension or "sigmoid" (token-choice: one logit per depth)."""
    if func == "sigmoid":
        return logits.sigmoid()
    if func == "tanh":
        return logits.tanh()
    if func == "softmax":
        return logits.softmax(-1)
    raise ConfigError(f"unknown router function {func!r}; choose sigmoid, tanh or softmax")


def expert_gate(logits: Tensor, cfg: ModelConfig) -> Tensor:
    """Expert-choice gate g = alpha * func(logit) of the tokens that take a step; their
    update is H <- H + g * f(H) (docs/method.md §3)."""
    return cfg.router_alpha * router_scores(logits, cfg.router_func)


def token_choice(logits: Tensor, cfg: ModelConfig, bias: Tensor | None = None,
                 depth_bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Token-choice routing from router logits [..., N_r]: (choice [...] -- the 0-based index
    of the depth, top-1 of the scores; probs [..., N_r] = func(logits); gate [...] =
    alpha * probs[choice]). With loss-free balancing the selection bias `bias` [N_r] is added
    to the scores for the CHOICE only: it never reaches the gate; so does the knob's
    `depth_bias` [N_r] (`RoutingKnob`)."""
    probs = router_scores(logits, cfg.router_func)
    scores = probs + bias if cfg.balancing == "loss_free" and bias is not None else probs
    if depth_bias is not None:
        scores = scores + depth_bias
    choice = scores.argmax(-1)
    gate = cfg.router_alpha * probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return choice, probs, gate


# --- expert-choice selection ---------------------------------------------------------------------
def capacity_schedule(cfg: ModelConfig, step: int | None) -> tuple[float, ...]:
    """Capacities in force at training `step`: a cosine from 1.0 (step 0) to the targets
    (step >= capacity_warmup_steps). None (evaluation) means the targets."""
    targets = cfg.step_capacities
    n = cfg.capacity_warmup_steps
    if n == 0 or step is None:
        return targets
    w = 0.5 * (1.0 + math.cos(math.pi * min(step / n, 1.0)))  # 1 -> 0
    return tuple(c + (1.0 - c) * w for c in targets)


def step_capacity(capacity: float, length: int) -> int:
    """Tokens a step of capacity c keeps out of `length`: k = max(1, floor(c * length))."""
    return max(1, math.floor(capacity * length))


def topk_select(logits: Tensor, capacity: float, t: int, lengths: Tensor | None = None,
                valid: Tensor | None = None, positions: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None, int | Tensor]:
    """Expert-choice top-k of one step over candidates scored `logits` [B, n] (in causal
    order). Returns (top [B, K] candidate indices, causal order; keep [B, K] or None; the
    tokens each row keeps: an int when every row keeps the same, else a tensor [B]).

    Rectangular (`lengths` None): every row keeps k = min(n, max(1, floor(c T))), keep None.
    Ragged (right-padded batch, `lengths` [B] real tokens per row, `valid` [B, n] the real
    candidates, `positions` [B, n] their sequence positions): row b keeps its top
    k_b = min(real candidates, max(1, floor(c len_b))) REAL candidates, so padding never
    competes and each row routes as it would alone; its kept tokens come first in causal
    order, then (keep False) padding up to K = max k_b."""
    b, n = logits.shape
    dev = logits.device
    if lengths is None:
        k = min(n, step_capacity(capacity, t))
        if k < n:
            top = logits.topk(k, dim=-1).indices.sort(dim=-1).values
        else:
            top = torch.arange(n, device=dev).expand(b, n)
        return top, None, k
    k_rows = torch.minimum(valid.sum(1), torch.clamp(
        torch.floor(capacity * lengths.float()).long(), min=1))
    k = int(k_rows.max())
    by_score = logits.masked_fill(~valid, float("-inf")).topk(k, dim=-1).indices  # best first
    keep = torch.arange(k, device=dev) < k_rows.unsqueeze(1)
    order = ((~keep).long() * t + positions.gather(1, by_score)).argsort(dim=1)
    return by_score.gather(1, order), keep.gather(1, order), k_rows


def causal_take(took_prev: Tensor, decide: Tensor | None, full: bool | Tensor = False,
                threshold: float | Tensor = 0.0) -> Tensor:
    """The causal expert-choice rule: a token takes step r iff it took step r-1 (`took_prev`)
    and its deciding logit -- the step's router, or its aux predictor with
    expert_aux="router" -- is > `threshold` (default 0, i.e. sigmoid > 0.5, the membership the
    auxiliary BCE trains; `RoutingKnob.thresholds` moves it). Steps of capacity 1 (`full`, a
    bool or a per-token bool tensor) keep every token, as top-k does; `decide` may be None
    when `full` is True."""
    if full is True:
        return took_prev
    go = decide > threshold
    if isinstance(full, Tensor):
        go = go | full
    return took_prev & go


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, T, d], idx [B, k] -> [B, k, d]."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(h: Tensor, idx: Tensor, values: Tensor) -> Tensor:
    """h with rows idx [B, k] of each sequence replaced by values [B, k, d] (out of place)."""
    return h.scatter(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]), values)


def selection_sizes(selected: Tensor) -> list[tuple[int, int]]:
    """Boolean selections [..., B, T] -> for each leading index, (the largest, the smallest)
    number of tokens a row of it selects, read from the device in ONE host sync.

    These counts decide the shapes of the compacted sub-sequences, so they must reach
    Python; reading all of a pass's counts at once keeps that to one synchronisation (and
    one `torch.compile` graph break, docs/gpu.md) instead of two per recursion step."""
    counts = selected.sum(-1)
    sizes = torch.stack((counts.amax(-1), counts.amin(-1)), -1).reshape(-1, 2).tolist()
    return [(hi, lo) for hi, lo in sizes]


def compact_selection(selected: Tensor, sizes: tuple[int, int] | None = None
                      ) -> tuple[Tensor | None, Tensor | None]:
    """Boolean [B, T] -> (idx [B, K], valid [B, K] or None when every row has K tokens).

    Row b lists its selected positions in increasing order, then (padding, valid=False) the
    first unselected ones; K is the largest count in the batch. (None, None) if nothing is
    selected anywhere. `sizes`: the (largest, smallest) row counts when the caller already
    read them (`selection_sizes`); otherwise they are read here, in one host sync."""
    hi, lo = selection_sizes(selected)[0] if sizes is None else sizes
    if hi == 0:
        return None, None
    t = selected.shape[1]
    key = (~selected).long() * t + torch.arange(t, device=selected.device)
    idx = key.argsort(dim=1)[:, :hi]
    if lo == hi:
        return idx, None
    return idx, torch.arange(hi, device=selected.device) < selected.sum(1).unsqueeze(1)


# --- the efficiency knob (evaluation time; docs/routing.md "The efficiency knob") -------------
@dataclass(frozen=True)
class RoutingKnob:
    """How deep a TRAINED MoR model recurses at evaluation, without retraining.

    thresholds -- expert-choice, causal rule: a token takes step r iff it took r-1 and its
        deciding logit is > thresholds[r-1] (default 0, i.e. sigmoid > 0.5). Steps whose
        trained capacity is 1 keep every token whatever the threshold. +inf: every token
        stops after the full steps; -inf: every token takes every step.
    capacities -- expert-choice, top-k evaluation: the capacity of each step, in place of
        the trained ones (non-increasing, each in (0, 1]).
    depth_bias -- token-choice: added to the router scores of depth 1..N_r when CHOOSING a
        depth (never to the gate), like loss-free balancing's bias; a rising bias sends
        tokens deeper.

    A knob is set on a built model (`MoRLM.set_knob`) and applies to evaluation passes only
    (training passes ignore it); the decode engine reads the model's knob when built."""

    thresholds: tuple[float, ...] | None = None
    capacities: tuple[float, ...] | None = None
    depth_bias: tuple[float, ...] | None = None

    def validate(self, cfg: ModelConfig) -> RoutingKnob:
        """Raise ConfigError naming the field when the knob does not fit `cfg`."""
        nr = cfg.num_recursions
        if cfg.family != "mor":
            if self.active:
                raise ConfigError(f"a routing knob applies to MoR models only, not a "
                                  f"{cfg.family} model")
            return self
        for name in ("thresholds", "capacities", "depth_bias"):
            v = getattr(self, name)
            if v is None:
                continue
            if len(v) != nr:
                raise ConfigError(f"knob {name}: needs one value per recursion step "
                                  f"(N_r = {nr}), got {len(v)}: {list(v)}")
            if any(not isinstance(x, (int, float)) or math.isnan(x) for x in v):
                raise ConfigError(f"knob {name}: values must be numbers, got {list(v)}")
        expert = cfg.router == "expert"
        if self.thresholds is not None and not expert:
            raise ConfigError("knob thresholds apply to expert-choice MoR (token-choice: use "
                              "depth_bias)")
        if self.capacities is not None:
            if not expert:
                raise ConfigError("knob capacities apply to expert-choice MoR (token-choice: "
                                  "use depth_bias)")
            caps = self.capacities
            if any(not 0 < c <= 1 for c in caps):
                raise ConfigError(f"knob capacities: each must be in (0, 1], got {list(caps)}")
            if any(b > a for a, b in zip(caps, caps[1:])):
                raise ConfigError(f"knob capacities: must be non-increasing, got {list(caps)}")
        if self.depth_bias is not None:
            if expert:
                raise ConfigError("knob depth_bias applies to token-choice MoR (expert-choice: "
                                  "use thresholds or capacities)")
            if any(math.isinf(x) for x in self.depth_bias):
                raise ConfigError(f"knob depth_bias: values must be finite, got "
                                  f"{list(self.depth_bias)}")
        return self

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.thresholds, self.capacities, self.depth_bias))

    def to_dict(self) -> dict[str, list[float] | None]:
        """JSON-safe (infinities as the strings "inf" / "-inf")."""
        def enc(v):
            return None if v is None else [x if math.isfinite(x) else str(x) for x in v]
        return {"thresholds": enc(self.thresholds), "capacities": enc(self.capacities),
                "depth_bias": enc(self.depth_bias)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RoutingKnob:
        d = d or {}
        unknown = set(d) - {"thresholds", "capacities", "depth_bias"}
        if unknown:
            raise ConfigError(f"unknown knob field(s) {sorted(unknown)}; known: thresholds, "
                              "capacities, depth_bias")
        return cls(**{k: None if v is None else tuple(float(x) for x in v)
                      for k, v in d.items()})


def step_thresholds(cfg: ModelConfig, knob: RoutingKnob | None) -> tuple[float, ...]:
    """The causal rule's threshold of each step (0 unless the knob sets it)."""
    if knob is None or knob.thresholds is None:
        return (0.0,) * cfg.num_recursions
    return knob.thresholds


@contextmanager
def use_knob(model: Any, knob: RoutingKnob | None) -> Iterator[Any]:
    """Evaluate `model` with `knob` inside the block, then restore its previous knob."""
    previous = getattr(model, "knob", None)
    model.set_knob(knob)
    try:
        yield model
    finally:
        model.set_knob(previous)
