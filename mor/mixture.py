"""Mixture-of-Recursions (Bae et al. 2025; docs/method.md §3-4).

Middle-Cycle layout "1 + B + 1": a unique first layer, a block of B shared layers applied
up to N_r times, a unique last layer. Tokens that take recursion step r run through the
shared block as a sub-sequence: in causal order, at their ORIGINAL RoPE positions.

Expert-choice (`router="expert"`): before step r a router scores the tokens still selected
at step r-1 (hierarchical filtering); per sequence the top k_r = max(1, floor(c_r T)) take
the step, c_r = (N_r - r + 1)/N_r (or a cosine warm-up from 1.0 towards it):

    H_sel <- H_sel + g * f(H_sel),   g = alpha * sigmoid|tanh(logit)

with f the whole shared block including its residuals; the others pass unchanged. An
auxiliary BCE loss teaches each router its top-k membership ("aux loss"), or a separate
predictor learns it from detached hidden states ("aux router").

Token-choice (`router="token"`): one router on the first layer's output picks each token's
depth i (top-1 of softmax|sigmoid scores); the token runs recursions 1..i and leaves with
H^1 + g_i * f^(i)(H^1). Balancing loss sum_i P_i f_i, or loss-free balancing through a
selection-only bias moved by `after_optimizer_step`; router z-loss.

KV (`kv`): "cache" -- step r attends only among the tokens routed to r (recursion-wise
caching); "share" -- steps r > 1 compute no K/V projections and attend over the first
recursion's keys/values of the whole sequence (queries only for the selected tokens).

Routing modes at evaluation (`cfg.eval_routing`; training always uses top-k):
  "topk"   -- expert-choice as in the paper. NOT causal: whether token t goes deeper
              depends on the scores of later tokens in the same sequence.
  "causal" -- expert-choice: token t takes step r iff it took r-1 and its router (or aux
              predictor) logit is > 0, i.e. sigmoid > 0.5 -- the decision the auxiliary
              objective trains; steps of capacity 1 keep every token, as top-k does.
              Token-choice is always causal: a token's depth depends on itself only.

The auxiliary losses are per-batch means like the LM loss, so gradient accumulation divides
them alike: their weight does not depend on the accumulation count (docs/protocol.md §7).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mor.config import ModelConfig
from mor.model import CausalLM, KVEntry


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


def capacity_schedule(cfg: ModelConfig, step: int | None) -> tuple[float, ...]:
    """Capacities in force at training `step`: a cosine from 1.0 (step 0) to the targets
    (step >= capacity_warmup_steps). None (evaluation) means the targets."""
    targets = cfg.step_capacities
    n = cfg.capacity_warmup_steps
    if n == 0 or step is None:
        return targets
    w = 0.5 * (1.0 + math.cos(math.pi * min(step / n, 1.0)))  # 1 -> 0
    return tuple(c + (1.0 - c) * w for c in targets)


def _gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, T, d], idx [B, k] -> [B, k, d]."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _scatter_tokens(h: Tensor, idx: Tensor, values: Tensor) -> Tensor:
    return h.scatter(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]), values)


def compact_selection(selected: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Boolean [B, T] -> (idx [B, K], valid [B, K] or None when every row has K tokens).

    Row b lists its selected positions in increasing order, then (padding, valid=False) the
    first unselected ones; K is the largest count in the batch. (None, None) if nothing is
    selected anywhere."""
    counts = selected.sum(1)
    k = int(counts.max())
    if k == 0:
        return None, None
    t = selected.shape[1]
    key = (~selected).long() * t + torch.arange(t, device=selected.device)
    idx = key.argsort(dim=1)[:, :k]
    if bool((counts == k).all()):
        return idx, None
    return idx, torch.arange(k, device=selected.device) < counts.unsqueeze(1)


class MoRLM(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        f, b, nr = cfg.num_unique_first, cfg.num_shared, cfg.num_recursions
        self.first = list(range(f))
        self.shared = list(range(f, f + b))
        self.last = list(range(f + b, cfg.num_unique_layers))
        if cfg.router == "expert":
            self.routers = nn.ModuleList(Router(cfg.d_model, 1, cfg.router_arch)
                                         for _ in range(nr))
            if cfg.expert_aux == "router":
                self.predictors = nn.ModuleList(Router(cfg.d_model, 1, cfg.router_arch)
                                                for _ in range(nr))
        else:
            self.router = Router(cfg.d_model, nr, cfg.router_arch)
            # Loss-free balancing: added to the scores for the CHOICE of depth only.
            self.register_buffer("router_bias", torch.zeros(nr))
        for name in ("routers", "predictors", "router"):
            if hasattr(self, name):
                getattr(self, name).apply(self._init_weights)

    # --- configuration views -----------------------------------------------------------------
    @property
    def routing_mode(self) -> str:
        if self.cfg.router == "token":
            return "token"
        return "topk" if self.training else self.cfg.eval_routing

    def set_eval_routing(self, mode: str) -> None:
        """Switch the evaluation routing mode of a built model (validated like the config)."""
        self.cfg = self.cfg.replace(eval_routing=mode)

    def _gate(self, logits: Tensor) -> Tensor:
        fn = torch.tanh if self.cfg.router_func == "tanh" else torch.sigmoid
        return self.cfg.router_alpha * fn(logits)

    # --- the stack ---------------------------------------------------------------------------
    def _run_stack(self, h: Tensor, step: int | None, kv_log: list[KVEntry] | None,
                   lengths: Tensor | None = None):
        t = h.shape[1]
        cos, sin = self.rope_for(torch.arange(t, device=h.device))
        for i in self.first:
            h, kv = self.layers[i](h, cos, sin)
            if kv_log is not None:
                kv_log.append(KVEntry(i, 1, *kv))
        mode = self.routing_mode
        if mode == "token":
            h, aux, stats, depths = self._token_choice(h, kv_log)
        elif mode == "topk" and lengths is not None:
            h, aux, stats, depths = self._expert_topk_ragged(h, lengths, step, kv_log)
        elif mode == "topk":
            h, aux, stats, depths = self._expert_topk(h, step, kv_log)
        else:
            h, aux, stats, depths = self._expert_causal(h, kv_log)
        for i in self.last:
            h, kv = self.layers[i](h, cos, sin)
            if kv_log is not None:
                kv_log.append(KVEntry(i, 1, *kv))
        return h, aux, stats, depths

    def _apply_shared(self, x: Tensor, idx: Tensor, valid: Tensor | None, r: int,
                      kv_store: list, kv_log: list[KVEntry] | None) -> Tensor:
        """The shared block on tokens x [B, K, d] at positions idx [B, K], recursion r.

        Recursion-wise caching: the K tokens attend causally among themselves (and padded
        slots, valid=False, are never attended to). KV sharing, r > 1: queries only, over
        the first recursion's keys/values at positions <= each query's position."""
        cos, sin = self.rope_for(idx)
        share = self.cfg.kv == "share" and r > 1
        if share:
            t = kv_store[0][0].shape[2]
            mask = torch.arange(t, device=x.device).view(1, 1, t) <= idx.unsqueeze(-1)
        elif valid is None:
            mask = None  # rectangular selection: plain causal attention within it
        else:
            k = idx.shape[1]
            causal = torch.ones(k, k, dtype=torch.bool, device=x.device).tril()
            # A padded query sees itself so no softmax row is empty; its output is dropped.
            mask = (causal & valid.unsqueeze(1)) | torch.eye(k, dtype=torch.bool,
                                                             device=x.device)
        for j, li in enumerate(self.shared):
            x, kv = self.layers[li](x, cos, sin, mask, kv_store[j] if share else None)
            if self.cfg.kv == "share" and r == 1:
                kv_store.append(kv)
            if kv_log is not None:
                kv_log.append(KVEntry(li, r, *kv, valid=None if share else valid,
                                      shared=share))
        return x

    @staticmethod
    def _selection_stats(stats: dict, r: int, selected: Tensor) -> None:
        frac = selected.float().mean(1)  # per sequence
        stats[f"selected_frac/r{r}"] = frac.mean().detach()
        stats[f"selected_frac_sq/r{r}"] = (frac * frac).mean().detach()

    @staticmethod
    def _dead_ratio(selected_last: Tensor) -> Tensor:
        """Fraction of sequence positions that no sequence of the batch sends through the
        last recursion step: 0 when routing varies across sequences, 1 - c_last when every
        sequence picks the same positions (the paper's 66.7% at N_r=3 is that collapse)."""
        return 1.0 - selected_last.any(0).float().mean()

    # --- expert-choice -----------------------------------------------------------------------
    def _expert_topk(self, h: Tensor, step: int | None, kv_log):
        cfg = self.cfg
        b, t, _ = h.shape
        caps = capacity_schedule(cfg, step)
        idx = torch.arange(t, device=h.device).expand(b, t)  # candidates' positions
        aux = h.new_zeros((), dtype=torch.float32)
        stats: dict[str, Tensor] = {}
        depths = torch.zeros(b, t, dtype=torch.long, device=h.device)
        kv_store: list = []
        accs = []
        for r, router in enumerate(self.routers, 1):
            cand = _gather_tokens(h, idx)
            logits = router(cand).squeeze(-1).float()  # [B, n]
            n = logits.shape[1]
            k = min(n, max(1, math.floor(caps[r - 1] * t)))
            if k < n:
                top = logits.topk(k, dim=-1).indices.sort(dim=-1).values
            else:
                top = torch.arange(n, device=h.device).expand(b, n)
            member = torch.zeros_like(logits).scatter_(1, top, 1.0)
            if cfg.expert_aux == "loss":
                decide = logits
                bce = F.binary_cross_entropy_with_logits(logits, member)
                aux = aux + cfg.aux_loss_coef * bce
            else:
                # The predictor sees detached states: it learns the routing, it cannot
                # change the model it predicts.
                decide = self.predictors[r - 1](cand.detach()).squeeze(-1).float()
                bce = F.binary_cross_entropy_with_logits(decide, member)
                aux = aux + bce
            if cfg.router_z_coef:
                aux = aux + cfg.router_z_coef * logits.pow(2).mean()  # logsumexp of 1 logit
            sel_idx = idx.gather(1, top)
            x = _gather_tokens(cand, top)
            gate = self._gate(logits.gather(1, top)).unsqueeze(-1).to(x.dtype)
            y = self._apply_shared(x, sel_idx, None, r, kv_store, kv_log)
            h = _scatter_tokens(h, sel_idx, x + gate * y)
            depths.scatter_add_(1, sel_idx, torch.ones_like(sel_idx))
            stats[f"selected_frac/r{r}"] = torch.tensor(k / t)
            stats[f"selected_frac_sq/r{r}"] = torch.tensor((k / t) ** 2)
            stats[f"gate_mean/r{r}"] = gate.detach().float().mean()
            stats[f"router_bce/r{r}"] = bce.detach()
            if k < n:
                acc = ((decide > 0) == (member > 0.5)).float().mean().detach()
                stats[f"sampling_acc/r{r}"] = acc
                accs.append(acc)
            idx = sel_idx
        if accs:
            stats["sampling_acc"] = torch.stack(accs).mean()
        if caps[-1] < 1.0:
            last = torch.zeros(b, t, dtype=torch.bool, device=h.device).scatter_(1, idx, True)
            stats["dead_token_ratio"] = self._dead_ratio(last).detach()
        return h, aux, stats, depths

    def _expert_topk_ragged(self, h: Tensor, lengths: Tensor, step: int | None, kv_log):
        """Top-k routing of a right-padded batch: row b's step r keeps its top
        k_b = max(1, floor(c_r * len_b)) REAL candidates; padding never competes, so each
        row routes exactly as it would alone (lm-eval batches of mixed lengths)."""
        cfg = self.cfg
        b, t, _ = h.shape
        caps = capacity_schedule(cfg, step)
        pos = torch.arange(t, device=h.device)
        idx = pos.expand(b, t)
        valid = pos.unsqueeze(0) < lengths.unsqueeze(1)  # real candidates
        aux = h.new_zeros((), dtype=torch.float32)
        stats: dict[str, Tensor] = {}
        depths = torch.zeros(b, t, dtype=torch.long, device=h.device)
        kv_store: list = []
        for r, router in enumerate(self.routers, 1):
            cand = _gather_tokens(h, idx)
            logits = router(cand).squeeze(-1).float()
            k_rows = torch.minimum(valid.sum(1), torch.clamp(
                torch.floor(caps[r - 1] * lengths.float()).long(), min=1))
            k = int(k_rows.max())
            masked = logits.masked_fill(~valid, float("-inf"))
            by_score = masked.topk(k, dim=-1).indices  # best first
            keep = torch.arange(k, device=h.device) < k_rows.unsqueeze(1)
            # Back to causal order, kept tokens first: the compaction layout.
            order = ((~keep).long() * t + idx.gather(1, by_score)).argsort(dim=1)
            top = by_score.gather(1, order)
            step_valid = keep.gather(1, order)
            member = torch.zeros_like(logits).scatter_(1, top, step_valid.float())
            if cfg.expert_aux == "loss":
                bce = F.binary_cross_entropy_with_logits(logits[valid], member[valid])
                aux = aux + cfg.aux_loss_coef * bce
            sel_idx = idx.gather(1, top)
            x = _gather_tokens(cand, top)
            gate = self._gate(logits.gather(1, top)).unsqueeze(-1).to(x.dtype)
            all_valid = bool(step_valid.all())
            y = self._apply_shared(x, sel_idx, None if all_valid else step_valid, r, kv_store,
                                   kv_log)
            new = x + gate * y
            if not all_valid:
                new = torch.where(step_valid.unsqueeze(-1), new, x)
            h = _scatter_tokens(h, sel_idx, new)
            depths.scatter_add_(1, sel_idx, step_valid.long())
            frac = k_rows.float() / lengths.float()
            stats[f"selected_frac/r{r}"] = frac.mean()
            stats[f"selected_frac_sq/r{r}"] = (frac * frac).mean()
            idx, valid = sel_idx, step_valid
        return h, aux, stats, depths

    def _expert_causal(self, h: Tensor, kv_log):
        cfg = self.cfg
        b, t, _ = h.shape
        caps = cfg.step_capacities
        selected = torch.ones(b, t, dtype=torch.bool, device=h.device)
        depths = torch.zeros(b, t, dtype=torch.long, device=h.device)
        stats: dict[str, Tensor] = {}
        kv_store: list = []
        for r, router in enumerate(self.routers, 1):
            logits = router(h).squeeze(-1).float()  # [B, T]; cheap next to the block
            if caps[r - 1] < 1.0:
                decide = (logits if cfg.expert_aux == "loss"
                          else self.predictors[r - 1](h).squeeze(-1).float())
                selected = selected & (decide > 0)  # sigmoid(logit) > 0.5
            self._selection_stats(stats, r, selected)
            idx, valid = compact_selection(selected)
            if idx is None:
                stats[f"gate_mean/r{r}"] = logits.new_zeros(())
                continue  # nobody goes on; deeper steps select from nobody
            x = _gather_tokens(h, idx)
            gate = self._gate(logits.gather(1, idx)).unsqueeze(-1).to(x.dtype)
            y = self._apply_shared(x, idx, valid, r, kv_store, kv_log)
            new = x + gate * y
            if valid is not None:
                new = torch.where(valid.unsqueeze(-1), new, x)
            h = _scatter_tokens(h, idx, new)
            depths += selected.long()
            g_sel = gate.squeeze(-1) if valid is None else gate.squeeze(-1)[valid]
            stats[f"gate_mean/r{r}"] = g_sel.detach().float().mean()
        if caps[-1] < 1.0:
            stats["dead_token_ratio"] = self._dead_ratio(selected).detach()
        return h, None, stats, depths

    # --- token-choice ------------------------------------------------------------------------
    def _token_choice(self, h: Tensor, kv_log):
        cfg = self.cfg
        nr = cfg.num_recursions
        logits = self.router(h).float()  # [B, T, N_r], on the first layer's output
        probs = logits.softmax(-1) if cfg.router_func == "softmax" else logits.sigmoid()
        scores = probs + self.router_bias if cfg.balancing == "loss_free" else probs
        choice = scores.argmax(-1)  # 0-based depth index; the bias never reaches the gate
        depths = choice + 1
        gate = (cfg.router_alpha * probs.gather(-1, choice.unsqueeze(-1))).to(h.dtype)
        h1, cur = h, h
        stats: dict[str, Tensor] = {}
        kv_store: list = []
        for r in range(1, nr + 1):
            selected = depths >= r
            self._selection_stats(stats, r, selected)
            idx, valid = compact_selection(selected)
            if idx is None:
                continue
            x = _gather_tokens(cur, idx)
            y = self._apply_shared(x, idx, valid, r, kv_store, kv_log)
            if valid is not None:
                y = torch.where(valid.unsqueeze(-1), y, x)
            cur = _scatter_tokens(cur, idx, y)
        h = h1 + gate * cur  # H^1 + g_i f^(i)(H^1): cur stopped at each token's depth

        loads = F.one_hot(choice, nr).float().mean((0, 1))  # fraction routed to each depth
        aux = h.new_zeros((), dtype=torch.float32)
        if cfg.balancing == "loss":
            balance = (probs.mean((0, 1)) * (nr * loads)).sum()
            aux = aux + cfg.balance_coef * balance
            stats["balance_loss"] = balance.detach()
        if cfg.router_z_coef:
            z = torch.logsumexp(logits, -1).pow(2).mean()
            aux = aux + cfg.router_z_coef * z
            stats["router_z"] = z.detach()
        for i in range(nr):
            stats[f"load/d{i + 1}"] = loads[i].detach()
        stats["maxvio"] = ((loads.max() - 1.0 / nr) * nr).detach()
        stats["load_entropy"] = -(loads * loads.clamp_min(1e-12).log()).sum().detach()
        stats["gate_mean"] = gate.detach().float().mean()
        return h, aux, stats, depths

    @torch.no_grad()
    def after_optimizer_step(self, stats: dict[str, Tensor]) -> None:
        """Loss-free balancing: b_i += u * sign(mean_load - load_i)."""
        cfg = self.cfg
        if cfg.router != "token" or cfg.balancing != "loss_free":
            return
        loads = torch.stack([stats[f"load/d{i + 1}"].float()
                             for i in range(cfg.num_recursions)]).to(self.router_bias.device)
        self.router_bias += cfg.bias_update_rate * torch.sign(loads.mean() - loads)
