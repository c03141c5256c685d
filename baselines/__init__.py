"""Baseline model families: a vanilla Llama-style Transformer and recursive
(parameter-shared) Transformers. Both are built from `mor.layers` and implement the
`mor.model.CausalLM` contract."""

from baselines.recursive import RecursiveLM
from baselines.vanilla import VanillaLM

__all__ = ["RecursiveLM", "VanillaLM"]
