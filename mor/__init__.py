"""mor-bench's model package: one interface for Mixture-of-Recursions, vanilla and
recursive Transformers.

    from mor import ModelConfig, build_model
    cfg = ModelConfig.from_preset("360m", family="mor", num_recursions=3)
    model = build_model(cfg)
    out = model(input_ids, targets)          # out.logits, out.loss, out.aux_loss, out.stats
    model.num_params()                       # {"total", "unique", "non_embedding"}
    model.flops_per_token(2048, convention="paper")
"""

from mor.checkpoint import load_checkpoint, save_checkpoint
from mor.config import PRESETS, ModelConfig
from mor.errors import ConfigError, DataError, MorBenchError
from mor.flops import flops_per_token, param_counts
from mor.model import CausalLM, ModelOutput
from mor.registry import build_model

__all__ = [
    "PRESETS", "CausalLM", "ConfigError", "DataError", "ModelConfig", "ModelOutput",
    "MorBenchError", "build_model", "flops_per_token", "load_checkpoint", "param_counts",
    "save_checkpoint",
]
