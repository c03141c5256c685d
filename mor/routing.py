"""MoR routing rules, written once (docs/routing.md).

The evaluation-mode helpers below are what every caller that switches a model's routing
uses; the routing rules themselves (router modules, capacities, selection, the causal
expert rule, token choice, the gate) live here too, as pure functions that both the
model's forward (`mor.mixture`) and the decode engine (`mor.decode`) call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mor.config import ModelConfig

NOT_ROUTED = "default"
"""The routing label of models without a router (vanilla, recursive)."""


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
