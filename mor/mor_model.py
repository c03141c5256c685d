"""Mixture-of-Recursions with expert-choice routing (Bae et al. 2025, MOR_SPEC section 3).

Middle-Cycle layout "1 + B + 1": a unique first layer, a block of B shared layers applied
up to N_r times, a unique last layer. Before recursion step r a router Linear(d, 1) scores
the tokens still selected at step r-1 (hierarchical filtering); per sequence the top
k_r = max(1, floor(c_r * T)) of them, c_r = (N_r - r + 1) / N_r, take the step:

    H_sel <- H_sel + g * f(H_sel),   g = alpha * sigmoid(logit),

with f the whole shared block including its residuals. Selected tokens keep causal order
and their original RoPE positions and attend only among themselves (recursion-wise
caching); unselected tokens pass through unchanged.

Routing modes (`cfg.eval_routing`, used when the model is in eval mode; training always
uses top-k, as the paper):
  "topk"   -- the paper's protocol. NOT causal: whether token t goes deeper depends on
              the scores of later tokens in the same sequence.
  "causal" -- token t takes step r iff it took step r-1 and sigmoid(logit_r(t)) > 0.5 (the
              decision the auxiliary BCE loss trains the router to predict); steps with
              capacity 1 keep every token, as top-k does. Decisions depend only on token
              t's own hidden state, so the model is causal.

Auxiliary loss: at every step, BCE between the router logits of the candidate tokens and
their top-k membership, summed over steps and scaled by `aux_loss_coef`. It is a per-batch
mean like the LM loss, so gradient accumulation divides both alike: its weight does not
depend on the number of accumulation steps (a defect of the reference code, MOR_SPEC 7).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mor.config import ModelConfig
from mor.model import CausalLM


def _gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, T, d], idx [B, k] -> [B, k, d]."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MoRLM(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        f, b = cfg.num_unique_first, cfg.num_shared
        self.first = list(range(f))
        self.shared = list(range(f, f + b))
        self.last = list(range(f + b, cfg.num_unique_layers))
        self.routers = nn.ModuleList(
            nn.Linear(cfg.d_model, 1, bias=False) for _ in range(cfg.num_recursions))
        for router in self.routers:
            nn.init.normal_(router.weight, mean=0.0, std=cfg.init_std)

    @property
    def routing_mode(self) -> str:
        return "topk" if self.training else self.cfg.eval_routing

    def set_eval_routing(self, mode: str) -> None:
        """Switch the evaluation routing mode of a built model (validated like the config)."""
        self.cfg = self.cfg.replace(eval_routing=mode)

    def _run_stack(self, h: Tensor) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        t = h.shape[1]
        positions = torch.arange(t, device=h.device)
        cos, sin = self.rope_for(positions)
        for i in self.first:
            h = self.layers[i](h, cos, sin)
        if self.routing_mode == "topk":
            h, aux, stats = self._recurse_topk(h, positions)
        else:
            h, aux, stats = self._recurse_causal(h, cos, sin)
        for i in self.last:
            h = self.layers[i](h, cos, sin)
        return h, aux, stats

    def _shared_block(self, x: Tensor, cos: Tensor, sin: Tensor,
                      attn_mask: Tensor | None = None) -> Tensor:
        for i in self.shared:
            x = self.layers[i](x, cos, sin, attn_mask)
        return x

    def _recurse_topk(self, h: Tensor, positions: Tensor):
        b, t, _ = h.shape
        alpha = self.cfg.router_alpha
        idx = positions.expand(b, t)  # original positions of the current candidates
        aux = h.new_zeros((), dtype=torch.float32)
        stats: dict[str, Tensor] = {}
        for r, (router, cap) in enumerate(zip(self.routers, self.cfg.step_capacities), 1):
            cand = _gather_tokens(h, idx)
            logits = router(cand).squeeze(-1).float()  # [B, n]
            n = logits.shape[1]
            k = min(n, max(1, math.floor(cap * t)))
            if k < n:
                top = logits.topk(k, dim=-1).indices.sort(dim=-1).values
            else:
                top = torch.arange(n, device=h.device).expand(b, n)
            target = torch.zeros_like(logits).scatter_(1, top, 1.0)
            bce = F.binary_cross_entropy_with_logits(logits, target)
            aux = aux + bce
            idx = idx.gather(1, top)
            x = _gather_tokens(cand, top)
            gate = alpha * torch.sigmoid(logits.gather(1, top)).unsqueeze(-1)
            step_cos, step_sin = self.rope_for(idx)  # original RoPE positions, [B, k, hd]
            # Causal within the sorted sub-sequence == causal over the original positions.
            y = self._shared_block(x, step_cos, step_sin)
            h = h.scatter(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]),
                          x + gate.to(x.dtype) * y)
            stats[f"selected_frac/r{r}"] = torch.tensor(k / t)
            stats[f"gate_mean/r{r}"] = gate.detach().mean()
            stats[f"router_bce/r{r}"] = bce.detach()
        return h, self.cfg.aux_loss_coef * aux, stats

    def _recurse_causal(self, h: Tensor, cos: Tensor, sin: Tensor):
        b, t, _ = h.shape
        alpha = self.cfg.router_alpha
        selected = torch.ones(b, t, dtype=torch.bool, device=h.device)
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        eye = torch.eye(t, dtype=torch.bool, device=h.device)
        stats: dict[str, Tensor] = {}
        for r, (router, cap) in enumerate(zip(self.routers, self.cfg.step_capacities), 1):
            logits = router(h).squeeze(-1).float()  # [B, T]
            if cap < 1.0:
                selected = selected & (logits > 0)  # sigmoid(logit) > 0.5
            # Selected queries see selected keys at or before them. Unselected queries get
            # their own key so no softmax row is empty; their output is discarded below.
            mask = (causal & selected.unsqueeze(1)) | eye
            y = self._shared_block(h, cos, sin, attn_mask=mask)
            gate = alpha * torch.sigmoid(logits).unsqueeze(-1).to(h.dtype)
            h = torch.where(selected.unsqueeze(-1), h + gate * y, h)
            stats[f"selected_frac/r{r}"] = selected.float().mean()
            sel_gate = gate.squeeze(-1)[selected]
            stats[f"gate_mean/r{r}"] = sel_gate.mean() if sel_gate.numel() else gate.new_zeros(())
        return h, None, stats
