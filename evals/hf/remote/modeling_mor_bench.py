"""Hugging Face wrapper of a mor-bench model (written by `mor-bench export --hf`).

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

This file holds no model code: `MorBenchForCausalLM` builds the model with the installed
mor-bench package (`mor.build_model` from the stored `mor_config`; `pip install mor-bench`
-- the same version that wrote the export -- must be importable) and only adapts the calling
convention: `forward(input_ids, attention_mask, labels)` returns a `CausalLMOutputWithPast`.

Routing. Expert-choice MoR routes with the causal rule (token t takes recursion step r iff it
took step r - 1 and its router -- or auxiliary predictor -- logit is > 0), not with the
paper's top-k over the whole sequence: top-k lets later tokens decide earlier tokens' depth,
so it cannot generate left to right and its scores depend on the future. Token-choice MoR is
causal by construction. The routing is fixed in the config (`routing`).

Padding. `attention_mask` (1 = real token) may mark left or right padding: real tokens get
RoPE positions 0, 1, ... counted over real tokens only and never attend to padding, so a
padded row gives its real tokens the logits they get alone.

Generation. There is no key/value cache: every `generate` step runs the whole prefix again
(`use_cache` is ignored, `past_key_values` is always None). mor-bench's decode engine
(`mor.decode.Engine`) has its own caches per recursion step, which do not map onto Hugging
Face's per-layer `Cache` objects; re-running the prefix is the exact (if slower) choice.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mor import ModelConfig, build_model
from mor.layers import RMSNorm, RotaryEmbedding

from .configuration_mor_bench import MorBenchConfig


def padding_inputs(attention_mask: torch.Tensor | None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(positions [B, T], attention mask [B, T, T]) for mor's forward from a Hugging Face
    padding mask [B, T]; (None, None) when there is no padding (mor's own default then)."""
    if attention_mask is None:
        return None, None
    valid = attention_mask.to(torch.bool)
    if bool(valid.all()):
        return None, None
    t = valid.shape[1]
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    mask = causal.unsqueeze(0) & valid.unsqueeze(1)  # [B, query, key]: earlier real keys
    mask |= torch.eye(t, dtype=torch.bool, device=valid.device)  # every query sees itself
    return positions, mask


class MorBenchForCausalLM(PreTrainedModel, GenerationMixin):
    """A mor-bench `CausalLM` (attribute `mor`) behind Hugging Face's causal-LM interface."""

    config_class = MorBenchConfig
    base_model_prefix = "mor"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = False

    def __init__(self, config: MorBenchConfig) -> None:
        super().__init__(config)
        self.mor = build_model(ModelConfig.from_dict(config.mor_config))
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no key/value cache: generate re-runs the prefix (module docstring)

    def _init_weights(self, module: nn.Module) -> None:
        """Weights come from the checkpoint; this only (re)makes what a checkpoint does not
        hold -- the RoPE tables, a pure function of the config -- and gives any missing
        weight mor-bench's own initial value."""
        cfg = self.mor.cfg
        with torch.no_grad():
            if isinstance(module, RotaryEmbedding):
                with torch.device("cpu"):
                    fresh = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
                # in the weights' dtype, as `model.to(dtype)` would leave them (loading
                # with dtype=torch.bfloat16 casts the weights, not these tables)
                dtype = self.mor.embed.weight.dtype
                module.cos = fresh.cos.to(module.cos.device, dtype)
                module.sin = fresh.sin.to(module.sin.device, dtype)
            elif isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(mean=0.0, std=cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def get_input_embeddings(self) -> nn.Module:
        return self.mor.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.mor.embed = value

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits [B, T, V] of `input_ids`; with `labels`, the mean next-token cross-entropy
        (labels shifted inside, -100 ignored; MoR's router losses are not added).
        Cache arguments (`past_key_values`, `use_cache`, `cache_position`) and
        `position_ids` are accepted and ignored: positions follow `attention_mask`."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("mor-bench models take input_ids (inputs_embeds is not supported)")
        positions, mask = padding_inputs(attention_mask)
        out = self.mor(input_ids, routing="causal" if self.config.routing == "causal" else None,
                       positions=positions, attn_mask=mask)
        logits = out.logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                   labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor,
                                      attention_mask: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """Every step sees the whole sequence so far (no cache, see the module docstring)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
