"""The one model contract all three families implement.

    out = model(input_ids, targets=None)
    out.logits    [B, T, V]
    out.loss      language-model cross-entropy + out.aux_loss (None without targets)
    out.aux_loss  already-weighted router losses (0 for families without routers)
    out.stats     routing statistics: name -> detached scalar tensor

A family only decides how the stack of decoder layers is applied (`_run_stack`: here the
plain schedule of vanilla and recursive models, overridden by MoR); the embedding, final
norm, tied head, loss and accounting are shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mor import flops
from mor.config import ModelConfig
from mor.errors import ConfigError
from mor.layers import Block, RMSNorm, RotaryEmbedding


@dataclass
class ModelOutput:
    logits: Tensor
    loss: Tensor | None = None
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)


class CausalLM(nn.Module):
    """Embedding -> family-specific stack of `Block`s -> RMSNorm -> tied head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # One entry per UNIQUE layer; families reuse entries, so sharing is by identity.
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_unique_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.schedule = cfg.schedule()
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    # --- the family-specific part: MoR overrides it ------------------------------------------
    def _run_stack(self, h: Tensor) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """h [B, T, d] -> (h, weighted aux loss or None, stats).

        Vanilla and recursive models apply the unique layers in `cfg.schedule()` order
        (a recursive model visits the same `Block` objects several times)."""
        cos, sin = self.rope_for(torch.arange(h.shape[1], device=h.device))
        for i in self.schedule:
            h = self.layers[i](h, cos, sin)
        return h, None, {}

    # --- shared ------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, targets: Tensor | None = None) -> ModelOutput:
        t = input_ids.shape[1]
        if t > self.cfg.max_seq_len:
            raise ConfigError(f"sequence of {t} tokens exceeds max_seq_len="
                              f"{self.cfg.max_seq_len}; raise max_seq_len in the model config")
        h, aux, stats = self._run_stack(self.embed(input_ids))
        logits = F.linear(self.norm(h), self.embed.weight)  # tied output head
        out = ModelOutput(logits=logits, aux_loss=aux, stats=stats)
        if targets is not None:
            out.lm_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                          ignore_index=-100)
            out.loss = out.lm_loss if aux is None else out.lm_loss + aux
        return out

    def rope_for(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.rope(positions)

    def num_params(self) -> dict[str, int]:
        """Analytic counts from the config (see `mor.flops.param_counts`)."""
        return flops.param_counts(self.cfg)

    def flops_per_token(self, seq_len: int, convention: str = "paper") -> float:
        """Forward FLOPs per token (see `mor.flops` for the two conventions)."""
        return flops.flops_per_token(self.cfg, seq_len, convention)

