"""`build_model(cfg)`: the one constructor for every family."""

from __future__ import annotations

from mor.config import ModelConfig
from mor.model import CausalLM


def build_model(cfg: ModelConfig) -> CausalLM:
    # Imported here: baselines depend on mor, so mor must not import them at module level.
    from baselines.recursive import RecursiveLM
    from baselines.vanilla import VanillaLM
    from mor.mor_model import MoRLM

    families = {"vanilla": VanillaLM, "recursive": RecursiveLM, "mor": MoRLM}
    return families[cfg.family](cfg)
