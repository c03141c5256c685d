"""The one model contract all three families implement.

    out = model(input_ids, targets=None)
    out.logits    [B, T, V]
    out.loss      language-model cross-entropy + out.aux_loss (None without targets)
    out.aux_loss  already-weighted router losses (None for families without routers)
    out.stats     routing statistics: name -> detached scalar tensor

Packed rows (`positions=`, `attn_mask=`): one row may hold several sequences that share a
prefix -- [prefix, branch 1, branch 2, ...] with each branch's RoPE positions restarting
after the prefix and an attention mask (`prefix_tree_mask`) that lets a branch see the prefix
and itself only -- so a shared context runs once (lm-eval's multiple-choice scoring). Every
causal family supports it (vanilla, recursive, MoR under causal or token-choice routing);
MoR top-k routing is not causal and refuses it.

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
from mor.layers import Block, RMSNorm, RotaryEmbedding, fused_enabled, head_and_loss


@dataclass
class KVEntry:
    """Keys/values one layer application attended over, as a KV cache would store them.

    k, v: [B, n_kv_heads, S, head_dim]; `valid` [B, S] marks real tokens where rows of the
    batch hold different numbers (padding otherwise); `shared` says the entry reuses an
    earlier recursion's tensors (recursive KV sharing) and so stores nothing new."""

    layer: int
    recursion: int
    k: Tensor
    v: Tensor
    valid: Tensor | None = None
    shared: bool = False

    def stored_tokens(self) -> int:
        if self.shared:
            return 0
        if self.valid is not None:
            return int(self.valid.sum())
        return self.k.shape[0] * self.k.shape[2]


def prefix_tree_mask(segments: Tensor) -> Tensor:
    """The boolean attention mask [B, T, T] (True = may attend) of packed prefix trees.

    segments [B, T]: 0 marks a row's shared prefix, which must come first; i >= 1 the tokens
    of branch i; any negative value padding. Query q may attend key k iff k <= q and k is in
    the prefix or in q's own segment: the prefix is causal within itself, each branch attends
    to the whole prefix and causally to itself, and never to another branch or to padding.
    (Padding attends to the prefix and to earlier padding, so no row of the mask is empty.)"""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    same = segments.unsqueeze(2) == segments.unsqueeze(1)  # [B, query, key]
    prefix = (segments == 0).unsqueeze(1)  # keys in the prefix
    return causal & (same | prefix)


@dataclass
class ModelOutput:
    logits: Tensor
    loss: Tensor | None = None
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)
    depths: Tensor | None = None
    """MoR: recursion steps each token took, [B, T] (None for other families)."""
    kv: list[KVEntry] | None = None
    """With `collect_kv=True`: every layer application's keys/values."""


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
        self.knob = None
        """Evaluation-time routing knob (`mor.routing.RoutingKnob`; MoR only), see `set_knob`."""
        self.routing_trace: list | None = None
        """When a list: causal expert-choice passes append (step, deciding logits [B, T],
        took-previous-step mask [B, T]) per step -- what threshold calibration reads."""
        self.apply(self._init_weights)

    def set_knob(self, knob) -> None:
        """Set (None: clear) the evaluation-time routing knob, validated against the config;
        models without a router accept only an empty knob."""
        self.knob = None if knob is None or not knob.active else knob.validate(self.cfg)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    # --- the family-specific part: MoR overrides it ------------------------------------------
    def _run_stack(self, h: Tensor, step: int | None, kv_log: list[KVEntry] | None,
                   lengths: Tensor | None = None, routing: str | None = None, *,
                   positions: Tensor | None = None, attn_mask: Tensor | None = None
                   ) -> tuple[Tensor, Tensor | None, dict[str, Tensor], Tensor | None]:
        """h [B, T, d] -> (h, weighted aux loss or None, stats, per-token depths or None).
        `lengths` and `routing`: see `forward` (models without a router ignore them);
        `positions` [B, T] and `attn_mask` [B, T, T]: see `forward` (None: 0..T-1, causal).

        Vanilla and recursive models apply the unique layers in `cfg.schedule()` order
        (a recursive model visits the same `Block` objects several times; each visit is its
        own recursion with its own keys/values)."""
        cos, sin = self.rope_for(torch.arange(h.shape[1], device=h.device)
                                 if positions is None else positions)
        visits: dict[int, int] = {}
        for i in self.schedule:
            h, (k, v) = self.layers[i](h, cos, sin, attn_mask)
            visits[i] = visits.get(i, 0) + 1
            if kv_log is not None:
                kv_log.append(KVEntry(i, visits[i], k, v))
        return h, None, {}, None

    def after_optimizer_step(self, stats: dict[str, Tensor]) -> None:
        """Called by the training loop after every optimizer step with the step's routing
        statistics. A no-op except for token-choice MoR with loss-free balancing, whose
        selection bias moves here -- explicitly, never as a side effect of `forward`."""

    # --- shared ------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, targets: Tensor | None = None, *,
                step: int | None = None, collect_kv: bool = False,
                lengths: Tensor | None = None, routing: str | None = None,
                positions: Tensor | None = None, attn_mask: Tensor | None = None,
                logits_index: Tensor | None = None) -> ModelOutput:
        """`step`: the training step (drives MoR capacity warm-up; None = warm-up done).
        `collect_kv`: also return every layer application's keys/values (`out.kv`).
        `lengths` [B]: real tokens per row of a RIGHT-padded batch. Causal attention already
        keeps padding out of real tokens' outputs; MoR top-k routing additionally computes
        each row's capacity from its real length and never lets padding compete, so a
        sequence's outputs do not depend on what else is in its batch.
        `routing`: the MoR routing mode of this pass ("topk" or "causal"; see
        `mor.routing.forward_mode`) instead of the model's own, which stays as it is; None
        (default) routes as the model does. Models without a router ignore it.
        `positions` [B, T]: each token's RoPE position (default 0..T-1 in every row); each
        must be below max_seq_len, the row itself may be longer (packed rows).
        `attn_mask` [B, T, T] bool: which keys each query may attend to (True = may; every
        query must see itself), in place of the causal mask -- e.g. `prefix_tree_mask`. With
        either of the two the model must be causal: MoR top-k routing raises ConfigError.
        `logits_index` [N]: compute the head only at these flat positions of the [B, T] grid
        (row * T + column); out.logits is then [N, V]. Not with `targets`."""
        t = input_ids.shape[1]
        if positions is None and t > self.cfg.max_seq_len:
            raise ConfigError(f"sequence of {t} tokens exceeds max_seq_len="
                              f"{self.cfg.max_seq_len}; raise max_seq_len in the model config")
        self._check_packing(input_ids, positions, attn_mask)
        if logits_index is not None and targets is not None:
            raise ConfigError("logits_index computes logits at some positions only; it cannot "
                              "be combined with targets (the loss needs every position)")
        kv_log: list[KVEntry] | None = [] if collect_kv else None
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=input_ids.device)
            if lengths.shape != (input_ids.shape[0],) or bool(
                    ((lengths < 1) | (lengths > t)).any()):
                raise ConfigError(f"lengths must hold one value in 1..{t} per row, got "
                                  f"{lengths.tolist()}")
        h, aux, stats, depths = self._run_stack(self.embed(input_ids), step, kv_log, lengths,
                                               routing, positions=positions,
                                               attn_mask=attn_mask)
        if logits_index is not None:
            h = h.flatten(0, 1).index_select(0, logits_index.to(h.device))
        hn = self.norm(h)
        lm_loss = None
        if targets is not None and fused_enabled():
            # F.linear + F.cross_entropy below, fused (mor.layers.head_and_loss).
            logits, lm_loss = head_and_loss(hn.flatten(0, 1), self.embed.weight,
                                            targets.flatten(), -100)
            logits = logits.view(*hn.shape[:-1], -1)
        else:
            logits = F.linear(hn, self.embed.weight)  # tied output head
            if targets is not None:
                lm_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                          ignore_index=-100)
        out = ModelOutput(logits=logits, aux_loss=aux, stats=stats, depths=depths, kv=kv_log)
        if targets is not None:
            out.lm_loss = lm_loss
            out.loss = out.lm_loss if aux is None else out.lm_loss + aux
        return out

    def _check_packing(self, input_ids: Tensor, positions: Tensor | None,
                       attn_mask: Tensor | None) -> None:
        """Shapes and ranges of `forward`'s `positions` and `attn_mask`."""
        b, t = input_ids.shape
        if positions is not None:
            if positions.shape != (b, t) or positions.dtype not in (torch.long, torch.int):
                raise ConfigError(f"positions must be an integer tensor of shape {(b, t)}, got "
                                  f"{positions.dtype} {tuple(positions.shape)}")
            if t and bool(((positions < 0) | (positions >= self.cfg.max_seq_len)).any()):
                raise ConfigError(f"positions must lie in 0..{self.cfg.max_seq_len - 1} "
                                  "(max_seq_len); raise max_seq_len in the model config")
        if attn_mask is not None:
            if attn_mask.shape != (b, t, t) or attn_mask.dtype != torch.bool:
                raise ConfigError(f"attn_mask must be a bool tensor of shape {(b, t, t)}, got "
                                  f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
            if not bool(attn_mask.diagonal(dim1=1, dim2=2).all()):
                raise ConfigError("attn_mask: every query must be allowed to attend to itself")

    def rope_for(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.rope(positions)

    def num_params(self) -> dict[str, int]:
        """Analytic counts from the config (see `mor.flops.param_counts`)."""
        return flops.param_counts(self.cfg)

    def flops_per_token(self, seq_len: int, convention: str = "paper") -> float:
        """Forward FLOPs per token (see `mor.flops` for the two conventions)."""
        return flops.flops_per_token(self.cfg, seq_len, convention)

