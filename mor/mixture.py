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

Routing modes at evaluation (`cfg.eval_routing`, or `forward(routing=...)` for one pass
without switching the model; training uses top-k unless told otherwise):
  "topk"   -- expert-choice as in the paper. NOT causal: whether token t goes deeper
              depends on the scores of later tokens in the same sequence.
  "causal" -- expert-choice: token t takes step r iff it took r-1 and its router (or aux
              predictor) logit is > 0, i.e. sigmoid > 0.5 -- the decision the auxiliary
              objective trains; steps of capacity 1 keep every token, as top-k does.
              Token-choice is always causal: a token's depth depends on itself only.

Top-k over a right-padded batch (`forward(lengths=...)`) is the same path with masks: each
row keeps its top k of its REAL tokens, and losses and statistics cover real tokens only.

Packed rows (`forward(positions=..., attn_mask=...)`, e.g. a shared context and several
continuations in one row; `mor.model.prefix_tree_mask`) run under the causal rule and
token-choice routing, whose decisions depend on each token's own hidden state only: each
step's selected tokens are compacted in row order and attend through the explicit mask
gathered to them (rows and columns; with KV sharing, rows over the first recursion's keys of
the whole row), at their given RoPE positions. Top-k routing compares tokens of one row with
each other, so a packed row would change its decisions: it refuses them.

The routing rules (routers, capacities, selection, the causal rule, token choice, gates) are
the functions of `mor.routing` (docs/routing.md), which the decode engine calls as well.

The auxiliary losses are per-batch means like the LM loss, so gradient accumulation divides
them alike: their weight does not depend on the accumulation count (docs/protocol.md §7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mor.config import ModelConfig
from mor.errors import ConfigError
from mor.model import CausalLM, KVEntry
from mor.routing import (
    Router,
    capacity_schedule,
    causal_take,
    compact_selection,
    expert_gate,
    forward_mode,
    gather_tokens,
    scatter_tokens,
    selection_sizes,
    step_logits,
    step_thresholds,
    token_choice,
    topk_select,
)


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    return x.mean() if mask is None else x[mask].mean()


def _masked_bce(logits: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.binary_cross_entropy_with_logits(logits[mask], target[mask])


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
        """The routing a forward pass uses unless told otherwise (`forward(routing=...)`)."""
        return forward_mode(self.cfg, self.training)

    def set_eval_routing(self, mode: str) -> None:
        """Switch the evaluation routing mode of a built model (validated like the config)."""
        self.cfg = self.cfg.replace(eval_routing=mode)

    # --- the stack ---------------------------------------------------------------------------
    def _run_stack(self, h: Tensor, step: int | None, kv_log: list[KVEntry] | None,
                   lengths: Tensor | None = None, routing: str | None = None, *,
                   positions: Tensor | None = None, attn_mask: Tensor | None = None):
        t = h.shape[1]
        mode = forward_mode(self.cfg, self.training, routing)
        packed = positions is not None or attn_mask is not None
        if packed and mode == "topk":
            raise ConfigError("top-k expert-choice routing is not causal (a token's depth "
                              "depends on the other tokens of its row): packed rows with "
                              "positions/attn_mask need routing 'causal' or token-choice")
        cos, sin = self.rope_for(torch.arange(t, device=h.device) if positions is None
                                 else positions)
        for i in self.first:
            h, kv = self.layers[i](h, cos, sin, attn_mask)
            if kv_log is not None:
                kv_log.append(KVEntry(i, 1, *kv))
        if mode == "token":
            h, aux, stats, depths = self._token_choice(h, kv_log, positions=positions,
                                                       attn_mask=attn_mask)
        elif mode == "topk":
            h, aux, stats, depths = self._expert_topk(h, step, kv_log, lengths)
        else:
            h, aux, stats, depths = self._expert_causal(h, kv_log, positions=positions,
                                                        attn_mask=attn_mask)
        for i in self.last:
            h, kv = self.layers[i](h, cos, sin, attn_mask)
            if kv_log is not None:
                kv_log.append(KVEntry(i, 1, *kv))
        return h, aux, stats, depths

    def _apply_shared(self, x: Tensor, idx: Tensor, valid: Tensor | None, r: int,
                      kv_store: list, kv_log: list[KVEntry] | None, *,
                      positions: Tensor | None = None,
                      attn_mask: Tensor | None = None) -> Tensor:
        """The shared block on tokens x [B, K, d] at row indices idx [B, K], recursion r.

        Recursion-wise caching: the K tokens attend causally among themselves (and padded
        slots, valid=False, are never attended to). KV sharing, r > 1: queries only, over
        the first recursion's keys/values at positions <= each query's position.

        Packed rows: `positions` [B, T] are the RoPE positions of the row's tokens (default:
        the row index) and `attn_mask` [B, T, T] replaces "causal" above: gathered to the
        selected queries' rows and, with caching, to the selected keys' columns; with sharing,
        to all columns (the first recursion ran every token of the row, in row order)."""
        cos, sin = self.rope_for(idx if positions is None else positions.gather(1, idx))
        share = self.cfg.kv == "share" and r > 1
        if attn_mask is not None:
            rows = attn_mask.gather(1, idx.unsqueeze(-1).expand(-1, -1, attn_mask.shape[2]))
            if share:
                if kv_store[0][0].shape[2] != attn_mask.shape[2]:
                    raise ConfigError("KV sharing needs the first recursion to run every token")
                mask = rows  # [B, K, T]: the first recursion's keys are the whole row
            else:
                k = idx.shape[1]
                mask = rows.gather(2, idx.unsqueeze(1).expand(-1, k, -1))  # [B, K, K]
                if valid is not None:
                    # Padded slots are never attended to; a padded query sees itself.
                    mask = (mask & valid.unsqueeze(1)) | torch.eye(
                        k, dtype=torch.bool, device=x.device)
        elif share:
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
    def _dead_ratio(selected_last: Tensor, real: Tensor | None = None) -> Tensor:
        """Fraction of sequence positions (`real` [T]: those that hold a token in some row of
        a padded batch) that no sequence of the batch sends through the last recursion step:
        0 when routing varies across sequences, 1 - c_last when every sequence picks the same
        positions (the paper's 66.7% at N_r=3 is that collapse)."""
        return 1.0 - _masked_mean(selected_last.any(0).float(), real)

    # --- expert-choice -----------------------------------------------------------------------
    def _expert_topk(self, h: Tensor, step: int | None, kv_log,
                     lengths: Tensor | None = None):
        """Top-k expert-choice routing (training, and evaluation under "topk").

        `lengths` None: every row has T real tokens and step r keeps k_r = max(1,
        floor(c_r T)) of them. `lengths` [B] (a right-padded batch, e.g. lm-eval batches of
        mixed lengths): row b keeps k_b = max(1, floor(c_r len_b)) REAL candidates and
        padding never competes, so each row routes exactly as it would alone; losses and
        statistics are then taken over real candidates only (`valid`)."""
        cfg = self.cfg
        b, t, _ = h.shape
        caps = capacity_schedule(cfg, step)
        if not self.training and self.knob is not None and self.knob.capacities is not None:
            caps = self.knob.capacities  # evaluation-time capacities (RoutingKnob)
        pos = torch.arange(t, device=h.device)
        idx = pos.expand(b, t)  # candidates' positions
        # Real candidates: None when every candidate of every row is real (rectangular).
        valid = None if lengths is None else pos.unsqueeze(0) < lengths.unsqueeze(1)
        aux = h.new_zeros((), dtype=torch.float32)
        stats: dict[str, Tensor] = {}
        depths = torch.zeros(b, t, dtype=torch.long, device=h.device)
        kv_store: list = []
        accs = []
        for r, router in enumerate(self.routers, 1):
            cand = gather_tokens(h, idx)
            logits = router(cand).squeeze(-1).float()  # [B, n]
            n = logits.shape[1]
            top, keep, k = topk_select(logits, caps[r - 1], t, lengths, valid, idx)
            member = torch.zeros_like(logits).scatter_(
                1, top, 1.0 if keep is None else keep.float())
            if cfg.expert_aux == "loss":
                decide = logits
                bce = _masked_bce(logits, member, valid)
                aux = aux + cfg.aux_loss_coef * bce
            else:
                # The predictor sees detached states: it learns the routing, it cannot
                # change the model it predicts.
                decide = step_logits(self.predictors, cand.detach(), r)
                bce = _masked_bce(decide, member, valid)
                aux = aux + bce
            if cfg.router_z_coef:
                # logsumexp of a single logit is the logit itself
                aux = aux + cfg.router_z_coef * _masked_mean(logits.pow(2), valid)
            sel_idx = idx.gather(1, top)
            x = gather_tokens(cand, top)
            gate = expert_gate(logits.gather(1, top), cfg).unsqueeze(-1).to(x.dtype)
            all_kept = keep is None or bool(keep.all())
            y = self._apply_shared(x, sel_idx, None if all_kept else keep, r, kv_store,
                                   kv_log)
            new = x + gate * y
            if not all_kept:
                new = torch.where(keep.unsqueeze(-1), new, x)
            h = scatter_tokens(h, sel_idx, new)
            if keep is None:
                depths.scatter_add_(1, sel_idx, torch.ones_like(sel_idx))
                stats[f"selected_frac/r{r}"] = torch.tensor(k / t)
                stats[f"selected_frac_sq/r{r}"] = torch.tensor((k / t) ** 2)
                partial = k < n
            else:
                depths.scatter_add_(1, sel_idx, keep.long())
                frac = k.float() / lengths.float()
                stats[f"selected_frac/r{r}"] = frac.mean()
                stats[f"selected_frac_sq/r{r}"] = (frac * frac).mean()
                partial = bool((k < valid.sum(1)).any())
            stats[f"gate_mean/r{r}"] = _masked_mean(gate.squeeze(-1).detach().float(), keep)
            stats[f"router_bce/r{r}"] = bce.detach()
            if partial:  # some candidates were left out: the decision had something to learn
                hit = ((decide > 0) == (member > 0.5)).float()
                acc = _masked_mean(hit, valid).detach()
                stats[f"sampling_acc/r{r}"] = acc
                accs.append(acc)
            idx, valid = sel_idx, keep
        if accs:
            stats["sampling_acc"] = torch.stack(accs).mean()
        if caps[-1] < 1.0:
            last = torch.zeros(b, t, dtype=torch.bool, device=h.device).scatter_(
                1, idx, True if valid is None else valid)
            real = None if lengths is None else pos < lengths.max()
            stats["dead_token_ratio"] = self._dead_ratio(last, real).detach()
        return h, aux, stats, depths

    def _expert_causal(self, h: Tensor, kv_log, *, positions: Tensor | None = None,
                       attn_mask: Tensor | None = None):
        cfg = self.cfg
        b, t, _ = h.shape
        caps = cfg.step_capacities
        thresholds = step_thresholds(cfg, self.knob)
        trace = self.routing_trace
        selected = torch.ones(b, t, dtype=torch.bool, device=h.device)
        depths = torch.zeros(b, t, dtype=torch.long, device=h.device)
        stats: dict[str, Tensor] = {}
        kv_store: list = []
        for r, router in enumerate(self.routers, 1):
            logits = router(h).squeeze(-1).float()  # [B, T]; cheap next to the block
            full = caps[r - 1] >= 1.0
            decide = None  # a full step keeps everyone: no decision to compute
            if not full:
                decide = (logits if cfg.expert_aux == "loss"
                          else step_logits(self.predictors, h, r))
            if trace is not None and decide is not None:
                trace.append((r, decide.detach(), selected))
            selected = causal_take(selected, decide, full, thresholds[r - 1])
            self._selection_stats(stats, r, selected)
            idx, valid = compact_selection(selected)
            if idx is None:
                stats[f"gate_mean/r{r}"] = logits.new_zeros(())
                continue  # nobody goes on; deeper steps select from nobody
            x = gather_tokens(h, idx)
            gate = expert_gate(logits.gather(1, idx), cfg).unsqueeze(-1).to(x.dtype)
            y = self._apply_shared(x, idx, valid, r, kv_store, kv_log, positions=positions,
                                   attn_mask=attn_mask)
            new = x + gate * y
            if valid is not None:
                new = torch.where(valid.unsqueeze(-1), new, x)
            h = scatter_tokens(h, idx, new)
            depths += selected.long()
            g_sel = gate.squeeze(-1) if valid is None else gate.squeeze(-1)[valid]
            stats[f"gate_mean/r{r}"] = g_sel.detach().float().mean()
        if caps[-1] < 1.0:
            stats["dead_token_ratio"] = self._dead_ratio(selected).detach()
        return h, None, stats, depths

    # --- token-choice ------------------------------------------------------------------------
    def _token_choice(self, h: Tensor, kv_log, *, positions: Tensor | None = None,
                      attn_mask: Tensor | None = None):
        cfg = self.cfg
        nr = cfg.num_recursions
        logits = self.router(h).float()  # [B, T, N_r], on the first layer's output
        depth_bias = None
        if not self.training and self.knob is not None and self.knob.depth_bias is not None:
            depth_bias = torch.tensor(self.knob.depth_bias, device=logits.device)
        choice, probs, gate = token_choice(logits, cfg, self.router_bias, depth_bias)
        depths = choice + 1  # choice is the 0-based depth index
        gate = gate.unsqueeze(-1).to(h.dtype)
        h1, cur = h, h
        stats: dict[str, Tensor] = {}
        kv_store: list = []
        # Every step's selection is known up front (depth >= r), so the token counts that
        # shape the steps' sub-sequences are read in one host sync for the whole pass (one
        # torch.compile graph break, outside the loop: docs/gpu.md §3).
        selections = [depths >= r for r in range(1, nr + 1)]
        sizes = selection_sizes(torch.stack(selections))
        for r, selected in enumerate(selections, 1):
            self._selection_stats(stats, r, selected)
            idx, valid = compact_selection(selected, sizes[r - 1])
            if idx is None:
                continue
            x = gather_tokens(cur, idx)
            y = self._apply_shared(x, idx, valid, r, kv_store, kv_log, positions=positions,
                                   attn_mask=attn_mask)
            if valid is not None:
                y = torch.where(valid.unsqueeze(-1), y, x)
            cur = scatter_tokens(cur, idx, y)
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
