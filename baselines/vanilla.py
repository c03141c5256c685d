"""The vanilla baseline: a Llama-architecture decoder of L unique layers.

Numerically the same model as Hugging Face `transformers`' `LlamaForCausalLM` (tied
embeddings, no attention/MLP bias, rotate-half RoPE): `to_hf_state_dict` and
`from_hf_state_dict` map the weights 1:1 (tests/mor/test_models.py checks the logits agree).
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from mor.config import ModelConfig
from mor.errors import ConfigError
from mor.model import CausalLM


class VanillaLM(CausalLM):
    """L unique layers applied once each, in order."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.family != "vanilla":
            raise ConfigError(f"VanillaLM needs family='vanilla', got {cfg.family!r}")
        super().__init__(cfg)


# Our names -> HF Llama names, per layer (everything else is global).
_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")


def to_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our vanilla state dict -> `LlamaForCausalLM` state dict (lm_head tied to embed)."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in _GLOBAL_MAP:
            out[_GLOBAL_MAP[name]] = tensor
            continue
        m = _LAYER_RE.fullmatch(name)
        if not m or m.group(2) not in _LAYER_MAP:
            raise ConfigError(f"parameter {name!r} has no Hugging Face Llama equivalent; "
                              "only vanilla models convert")
        out[f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"] = tensor
    out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def from_hf_state_dict(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`LlamaForCausalLM` state dict -> ours. An untied lm_head is rejected."""
    inverse_global = {v: k for k, v in _GLOBAL_MAP.items()}
    inverse_layer = {v: k for k, v in _LAYER_MAP.items()}
    out: dict[str, Tensor] = {}
    for name, tensor in hf_state.items():
        if name == "lm_head.weight":
            emb = hf_state["model.embed_tokens.weight"]
            if tensor.data_ptr() != emb.data_ptr() and not tensor.equal(emb):
                raise ConfigError("lm_head.weight differs from embed_tokens: mor-bench models "
                                  "tie input and output embeddings")
            continue
        if name in inverse_global:
            out[inverse_global[name]] = tensor
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if not m or m.group(2) not in inverse_layer:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer older transformers versions saved
            raise ConfigError(f"unexpected Hugging Face parameter {name!r}")
        out[f"layers.{m.group(1)}.{inverse_layer[m.group(2)]}"] = tensor
    return out


def hf_llama_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.LlamaConfig` describing the same model."""
    if cfg.family != "vanilla":
        raise ConfigError("only vanilla models have a Hugging Face Llama equivalent")
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=True, attention_bias=False,
        mlp_bias=False, hidden_act="silu", initializer_range=cfg.init_std,
    )
