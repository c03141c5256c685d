"""Incremental decoding for every family, with two continuous-batching schedulers.

    engine = Engine(model, max_batch=32, max_len=512)
    outs = engine.generate([Request(prompt=[eos], max_new_tokens=200, id=i) for i in ...])
    outs[0].tokens, outs[0].depths          # generated ids; MoR: recursion steps per pass

One engine interface for vanilla, recursive and MoR models: a static `KVCache` for
`max_batch` sequence slots, `prefill_many` (prompts through the model's own forward as one
right-padded batch, each prompt's keys/values loaded into its slot; `prefill` for one),
`step` (one token per slot through the whole model), and `generate` with a scheduler:

"sequence" -- continuous sequence-wise batching (any family): every iteration runs one token
    of every active slot through the whole stack; the slots whose sequences finished are
    refilled from the queue at once, their prompts prefilled together in one forward.
"depth" -- continuous depth-wise batching (MoR, docs/protocol.md §6): every slot holds one
    token in flight at its own recursion depth. An iteration runs the shared block ONCE on
    all in-flight tokens, whatever their depth (the weights are shared, so they can be
    batched; attention reads each token's own (slot, recursion) cache entry); a token whose
    routing ends its recursion leaves at once through the last layer and the head (their own
    batch), and its slot takes the sequence's next token -- or the next request from the
    queue -- through the embedding and first layer (their own batch), so the next shared
    call is full again.

Routing while decoding is causal by construction: expert-choice decodes with the causal
rule (token t takes step r iff it took r-1 and its router -- or aux predictor -- logit is
> 0, or the threshold of the model's `RoutingKnob`; top-k over a sequence needs the future),
token-choice with its router's depth (plus the knob's depth bias); both through the rules of
`mor.routing` the model's forward uses. With `kv_capacity="routed"` a
recursion step's cache holds k_r = max(1, floor(c_r * max_len)) tokens (the paper's KV
memory); a token routed to a step whose cache is full for its sequence stops recursing there
(counted in `stats["capped"]`); with "full" nothing is ever capped and decoding equals the full
forward in causal mode (`model(ids, routing="causal")`) exactly (up to float rounding).

Batched prefill: a right-padded batch changes no real token's outputs -- attention is causal,
and the MoR forward compacts each step's selected tokens in position order, so a row's
padding (selected or not) only ever comes after its real tokens; only each row's real tokens'
keys/values are loaded (for a recursion step: the first `count` compacted entries, count =
the row's real tokens of depth >= r). Up to `prefill_tokens` padded tokens per forward
(a row's values may differ from a forward of its prompt alone by float rounding).

Speed (decoding small models is bound by per-call overhead and weight reads; see
benchmarks/decode_vs_hf.py): each stage call reads the tokens every row attends over in ONE
host sync, drops the attention mask when every row sees the same number of tokens, writes
keys/values by position (views, not index_put) when the rows are all slots at one position,
and updates the cache lengths once per stage call, not per layer; a layer is 4 matmuls
(fused Q/K/V and gate/up), RoPE on queries and keys in one pass, residual adds inside the
o/down matmuls; on CPU (fp32) attention is two batched matmuls and a softmax (faster there
than SDPA's kernel for one query per row). `cuda_graphs=True` (CUDA, vanilla/recursive
models; off by default until tests/mor/test_decode_gpu.py has passed on a GPU) replays the
sequence-wise step from CUDA graphs: a static-shape step over every slot (idle slots are
padding rows: their keys/values land past their stored tokens, their lengths stay), attention
over a width bucket with a mask, one graph per width bucket (powers of two from 64, then
max_len), captured on first use.

The engine never changes the model it is given: prompts run through the forward with
routing="causal" passed explicitly (the model's `eval_routing` and train/eval flag stay as
they are), and the fused projections are the engine's own copies (`fused_bytes`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mor.errors import ConfigError
from mor.kv_cache import CacheFullError, KVCache, applications
from mor.model import CausalLM
from mor.routing import (
    causal_take,
    expert_gate,
    step_logits,
    step_thresholds,
    token_choice,
)

SCHEDULERS = ("auto", "sequence", "depth")


@dataclass
class Request:
    """Generate exactly `max_new_tokens` tokens after `prompt` (at least one token; a
    "no prompt" request starts from the tokenizer's EOS/BOS id)."""

    prompt: list[int]
    max_new_tokens: int
    id: int | str = 0
    seed: int = 0
    """Sampling stream of this request (temperature > 0): results do not depend on batch
    size, slot or arrival order."""
    stop: Callable[[list[int]], bool] | None = None
    """Called with the tokens generated so far after each new one; True ends the request
    early (stop strings, an end-of-text token). None: exactly `max_new_tokens`."""


@dataclass
class Completion:
    id: int | str
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    """MoR: recursion steps of the pass that produced each token (empty otherwise)."""
    logits: list[Tensor] = field(default_factory=list)
    """With `keep_logits=True`: the logits [V] each token was chosen from."""
    slots: list[int] = field(default_factory=list)
    """Slot the request decoded in (one entry)."""


@dataclass
class _Group:
    """Rows of one stage call at the same recursion step."""

    r: int
    sel: Tensor | slice | None  # rows of the call (None: all)
    slots: Tensor
    wpos: Tensor | int | None
    """Where each row's keys/values go: a tensor [m]; an int when the rows are all slots in
    order and all write at that position (views); None: the rows only read (KV sharing)."""
    seen: Tensor  # tokens each row attends over, its own included
    mask: Tensor | None  # None: every row attends over `width` tokens (see Engine._mask)
    width: int
    all_slots: bool  # rows are slots 0..max_batch-1 in order: the cache is read as views


@dataclass
class _Call:
    cos: Tensor  # [n, 1, head_dim]
    sin: Tensor  # [n, 1, head_dim], first half negated (see _rope)
    groups: list[_Group]
    all_write: bool


@dataclass
class _LayerWeights:
    """What a decoding layer reads: norm weights, the engine's fused copies, and transposed
    views (no copies) of the model's o/down projections."""

    n1: Tensor
    qkv: Tensor
    q: Tensor  # rows of qkv
    kv: Tensor  # rows of qkv
    wo_t: Tensor
    n2: Tensor
    gu: Tensor
    wd_t: Tensor


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE (rotate-half layout) of x [n, heads, hd]: x cos + rotate_half(x) sin, with
    rotate_half(x) sin = roll(x, hd/2) * sin_signed (sin_signed's first half negated)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The model's RMSNorm (HF Llama's formula: x * rsqrt(mean(x^2) + eps), in fp32, then
    the weight), in 6 plain ops -- fewer dispatches than F.rms_norm's composite on CPU."""
    if x.dtype == torch.float32:
        return torch.mul(x, torch.rsqrt(torch.mean(x * x, -1, True).add_(eps))).mul_(weight)
    xf = x.float()
    return weight * torch.mul(xf, torch.rsqrt(torch.mean(xf * xf, -1, True).add_(eps))
                              ).to(x.dtype)


def _buckets(max_len: int, lo: int = 64) -> list[int]:
    """Attention widths of the static step: powers of two from `lo` below max_len, then
    max_len."""
    out, w = [], lo
    while w < max_len:
        out.append(w)
        w *= 2
    return out + [max_len]


class Engine:
    """Decoding state of one model: cache, routing, schedulers. Not thread-safe.

    `prefill_tokens`: padded prompt tokens per prefill forward (a refill's prompts run
    longest first in batches up to that size; a longer prompt runs alone; 1: one prompt per
    forward). `cuda_graphs`: replay the sequence-wise step of a vanilla/recursive model on
    CUDA from CUDA graphs (module docstring)."""

    def __init__(self, model: CausalLM, *, max_batch: int, max_len: int,
                 kv_capacity: str = "routed", temperature: float = 0.0,
                 keep_logits: bool = False, prefill_tokens: int = 2048,
                 cuda_graphs: bool = False) -> None:
        cfg = model.cfg
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        if prefill_tokens < 1:
            raise ConfigError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        self.model, self.cfg = model, cfg
        # Expert-choice prompts run through the forward under the causal rule (top-k needs
        # the whole sequence); passed per call, so the model's own routing is untouched.
        self.routing = "causal" if cfg.family == "mor" and cfg.router == "expert" else None
        self.kind = "plain" if cfg.family != "mor" else cfg.router
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if cuda_graphs and self.device.type != "cuda":
            raise ConfigError(f"cuda_graphs=True needs a model on a CUDA device, this one is "
                              f"on {self.device}")
        if cuda_graphs and self.kind != "plain":
            raise ConfigError("cuda_graphs=True replays the sequence-wise step of vanilla and "
                              "recursive models; MoR models decode eagerly")
        self.cache = KVCache(cfg, max_batch, max_len, kv_capacity=kv_capacity,
                             dtype=self.dtype, device=self.device)
        self.max_batch, self.max_len = max_batch, max_len
        self.temperature, self.keep_logits = temperature, keep_logits
        self.prefill_tokens = prefill_tokens
        self.H, self.KVH, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # RoPE tables [positions, 2, hd]: cos, and sin with its first half negated (_rope).
        cos, sin = model.rope.cos.to(self.dtype), model.rope.sin.to(self.dtype)
        half = self.hd // 2
        self._rope_tab = torch.stack([cos, torch.cat([-sin[:, :half], sin[:, half:]], -1)], 1)
        self._col = torch.arange(max_len, device=self.device)
        # Attention: on CPU two batched matmuls and a softmax (fp32), else SDPA.
        self._sdpa = self.device.type != "cpu" or self.dtype != torch.float32
        self._scale = self.hd ** -0.5
        self._zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self._ninf = torch.full((), float("-inf"), dtype=self.dtype, device=self.device)
        self._entry_sets: dict[tuple, slice | Tensor] = {}
        if cfg.family == "mor":
            self.first, self.shared, self.last = model.first, model.shared, model.last
            self._shared_set = set(self.shared)
            nr = cfg.num_recursions
            self.caps = cfg.step_capacities
            # Entry the first shared layer writes at step r (-1: none), for room checks.
            e = [self.cache.entry_of.get((self.shared[0], r), -1) for r in range(1, nr + 1)]
            self._room_entry = torch.tensor([-1, *e, -1], device=self.device)
            self._always = torch.tensor([True] + [c >= 1.0 for c in self.caps] + [False],
                                        device=self.device)
            # The model's evaluation-time knob (mor.routing.RoutingKnob), read now: thresholds
            # of the causal rule indexed by step (0 and N_r + 1 unused), token-choice depth bias.
            self.knob = model.knob
            thr = step_thresholds(cfg, self.knob)
            self._threshold = torch.tensor([0.0, *thr, 0.0], device=self.device)
            self._depth_bias = (None if self.knob is None or self.knob.depth_bias is None
                                else torch.tensor(self.knob.depth_bias, device=self.device))
        else:
            self.apps = applications(cfg)
            self._shared_set = set()
        self._arange = torch.arange(max_batch, device=self.device)
        self._fuse_weights()
        self._static = _StaticStep(self, graphs=True) if cuda_graphs else None
        self.profile = False
        """Time each stage (`stage_times`): first layers, shared block, last layers + head,
        routing, sampling, bookkeeping -- where a decoding second goes."""
        self.stats: dict[str, float] = {}
        self.stage_times: dict[str, float] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {"iterations": 0, "shared_calls": 0, "shared_items": 0, "capped": 0,
                      "passes": 0, "depth_sum": 0, "prefills": 0, "prefill_calls": 0}
        self.stage_times = {}

    def _timed(self, stage: str, fn, *args):
        if not self.profile:
            return fn(*args)
        t0 = time.perf_counter()
        out = fn(*args)
        self.stage_times[stage] = self.stage_times.get(stage, 0.0) + time.perf_counter() - t0
        return out

    # --- one decoder layer on n tokens of n distinct slots ------------------------------------
    def _fuse_weights(self) -> None:
        """Concatenate each layer's Q/K/V and gate/up projections into one matrix so a
        decoding layer runs 4 matmuls instead of 7 (per-call overhead dominates small
        batches). The fused matrices are the engine's own COPIES: the model's parameters are
        left untouched, at the cost of a second copy of those projections (about 2/3 of each
        layer's weights; the engine's memory, not the KV cache's). The copies are taken now:
        build a new engine after changing the model's weights."""
        self._wqkv, self._wgu, self._lw = [], [], []
        qd = self.H * self.hd
        with torch.no_grad():
            for blk in self.model.layers:
                at, mlp = blk.attn, blk.mlp
                wqkv = torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight])
                wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                self._wqkv.append(wqkv)
                self._wgu.append(wgu)
                self._lw.append(_LayerWeights(
                    blk.attn_norm.weight.detach(), wqkv, wqkv[:qd], wqkv[qd:],
                    at.o_proj.weight.detach().t(), blk.mlp_norm.weight.detach(), wgu,
                    mlp.down_proj.weight.detach().t()))
        self._norm_w = self.model.norm.weight.detach()
        self._embed_w = self.model.embed.weight.detach()
        self._eps = self.cfg.norm_eps
        self.fused_bytes = sum(w.numel() * w.element_size() for w in self._wqkv + self._wgu)
        """Memory of the fused copies, on top of the model's parameters and the KV cache."""

    def _mask(self, seen: Tensor, width: int) -> Tensor:
        """Attention mask of rows that see `seen` [m] of `width` tokens: bool [m, 1, 1, width]
        for SDPA, or additive [m * KVH, 1, width] (0 / -inf) for `_attend`'s matmuls."""
        allowed = self._col[:width] < seen.unsqueeze(1)
        if self._sdpa:
            return allowed[:, None, None]
        m = allowed.shape[0]
        add = torch.where(allowed, self._zero, self._ninf)
        return add.unsqueeze(1).expand(m, self.KVH, width).reshape(m * self.KVH, 1, width)

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> Tensor:
        """q [m, H, hd] over keys/values [m, KVH, W, hd] (grouped-query) -> [m, H * hd]."""
        m, H, KVH, hd = q.shape[0], self.H, self.KVH, self.hd
        if self._sdpa:
            return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask,
                                                  enable_gqa=H != KVH).reshape(m, H * hd)
        w = keys.shape[2]
        qg = torch.mul(q, self._scale).reshape(m * KVH, H // KVH, hd)
        kt = keys.reshape(m * KVH, w, hd).transpose(1, 2)
        s = torch.bmm(qg, kt) if mask is None else torch.baddbmm(mask, qg, kt)
        return torch.bmm(torch.softmax(s, -1), values.reshape(m * KVH, w, hd)).view(m, H * hd)

    def _prepare(self, li: int, pos: Tensor, slots: Tensor, rec: int | Tensor,
                 all_slots: bool) -> _Call:
        """What every layer of one stage shares: RoPE tables, recursion groups, write
        positions and attention masks (all layers of a stage store the same tokens, so their
        entries hold the same lengths; `li` is any layer of the stage). `all_slots`: the rows
        are exactly slots 0..max_batch-1, in order (the caller's promise).

        The tokens each group's rows attend over reach the host in ONE sync: their largest
        count is the attention width (and the room check), and when it equals the smallest
        no mask is needed."""
        cache = self.cache
        cs = self._rope_tab[pos]
        if isinstance(rec, int):
            parts = [(rec, None)]
        else:
            rs, counts = rec.unique_consecutive(return_counts=True)
            rs, counts = rs.tolist(), counts.tolist()
            if len(rs) == 1:
                parts = [(int(rs[0]), None)]
            elif len(set(rs)) == len(rs):  # sorted by recursion: each group a slice (views)
                ends = [sum(counts[: i + 1]) for i in range(len(counts))]
                parts = [(int(r), slice(e - c, e)) for r, c, e in zip(rs, counts, ends)]
            else:
                parts = [(int(r), (rec == r).nonzero().squeeze(1)) for r in sorted(set(rs))]
        specs = []
        for r, sel in parts:
            s_slots = slots if sel is None else slots[sel]
            w = cache.entry_of.get((li, r))
            full = all_slots and sel is None
            lengths = cache.lengths[cache.read_of[(li, r)] if w is None else w]
            cur = lengths if full else lengths[s_slots]
            specs.append((r, sel, s_slots, w, cur, cur if w is None else cur + 1, full))
        if len(specs) == 1:
            bounds = [torch.stack(torch.aminmax(specs[0][5])).tolist()]
        else:
            bounds = torch.stack([torch.stack(torch.aminmax(s[5])) for s in specs]).tolist()
        groups = []
        for (r, sel, s_slots, w, cur, seen, full), (lo, hi) in zip(specs, bounds):
            if w is not None and hi > cache.capacity[w]:
                raise CacheFullError(f"KV cache entry (layer {li}, recursion {r}) is full "
                                     f"({cache.capacity[w]} tokens)")
            wpos = None if w is None else (hi - 1 if full and lo == hi else cur)
            groups.append(_Group(r, sel, s_slots, wpos, seen,
                                 None if lo == hi else self._mask(seen, hi), hi, full))
        return _Call(cs[:, :1], cs[:, 1:], groups, all(g.wpos is not None for g in groups))

    def _entries(self, layers: Sequence[int] | None, r: int) -> slice | Tensor:
        """The cache entries a stage (`layers`; None: a plain model's whole stack) writes at
        step r: a slice when contiguous (always, with KVCache's layout), else a tensor."""
        key = (None if layers is None else tuple(layers), r)
        ents = self._entry_sets.get(key)
        if ents is None:
            cache = self.cache
            if layers is None:
                idx = list(range(len(cache.capacity)))
            else:
                idx = [cache.entry_of[(li, r)] for li in layers if (li, r) in cache.entry_of]
            if idx == list(range(idx[0], idx[-1] + 1)):
                ents = slice(idx[0], idx[-1] + 1)
            else:
                ents = torch.tensor(idx, device=self.device)
            self._entry_sets[key] = ents
        return ents

    def _commit(self, call: _Call, layers: Sequence[int] | None) -> None:
        """After a stage call: the entries it wrote hold one more token per row (one update
        per group for all the stage's layers)."""
        lengths = self.cache.lengths
        for g in call.groups:
            if g.wpos is None:
                continue
            ents = self._entries(layers, g.r)
            if isinstance(g.wpos, int):
                lengths[ents] = g.width
            elif g.all_slots:
                lengths[ents] = g.seen
            else:
                lengths[ents, g.slots] = g.seen

    def _layer(self, li: int, x: Tensor, call: _Call, r: int | None = None) -> Tensor:
        """One decoder layer on x [n, d]: writes the keys/values its (layer, recursion)
        entries store, attends over its read entries (see `_prepare`); `r` overrides the
        groups' recursion (a plain model's stack: one preparation for every application)."""
        lw, cache = self._lw[li], self.cache
        n, H, KVH, hd = x.shape[0], self.H, self.KVH, self.hd
        h = _rms_norm(x, lw.n1, self._eps)
        if call.all_write:
            qkv = F.linear(h, lw.qkv)
            qk = _rope(qkv[:, : (H + KVH) * hd].view(n, H + KVH, hd), call.cos, call.sin)
            q, k_rows = qk[:, :H], qk[:, H:]
            v_rows = qkv[:, (H + KVH) * hd:].view(n, KVH, hd)
        else:  # recursive KV sharing: no K/V projections for the tokens that only read
            q = _rope(F.linear(h, lw.q).view(n, H, hd), call.cos, call.sin)
            k_rows = v_rows = None
        grouped = call.groups[0].sel is not None
        out = q.new_empty(n, H * hd) if grouped else None
        for g in call.groups:
            rr = g.r if r is None else r
            if g.wpos is not None:
                if k_rows is not None:
                    k, v = (k_rows, v_rows) if g.sel is None else (k_rows[g.sel], v_rows[g.sel])
                else:
                    kv = F.linear(h[g.sel], lw.kv)
                    m = kv.shape[0]
                    k = _rope(kv[:, : KVH * hd].view(m, KVH, hd), call.cos[g.sel],
                              call.sin[g.sel])
                    v = kv[:, KVH * hd:].view(m, KVH, hd)
                w = cache.entry_of[(li, rr)]
                if isinstance(g.wpos, int):
                    cache.k[w][:, :, g.wpos] = k
                    cache.v[w][:, :, g.wpos] = v
                else:
                    cache.k[w][g.slots, :, g.wpos] = k
                    cache.v[w][g.slots, :, g.wpos] = v
            e = cache.read_of[(li, rr)]
            keys, values = cache.k[e][:, :, : g.width], cache.v[e][:, :, : g.width]
            if not g.all_slots:
                keys, values = keys.index_select(0, g.slots), values.index_select(0, g.slots)
            o = self._attend(q if g.sel is None else q[g.sel], keys, values, g.mask)
            if grouped:
                out[g.sel] = o
            else:
                out = o
        x = torch.addmm(x, out, lw.wo_t)
        gu = F.linear(_rms_norm(x, lw.n2, self._eps), lw.gu)
        f = gu.shape[1] // 2
        return torch.addmm(x, F.silu(gu[:, :f]).mul_(gu[:, f:]), lw.wd_t)

    def _run_layers(self, layers, x: Tensor, pos: Tensor, slots: Tensor, rec: int | Tensor,
                    all_slots: bool) -> Tensor:
        call = self._prepare(layers[0], pos, slots, rec, all_slots)
        for li in layers:
            x = self._layer(li, x, call)
        self._commit(call, layers)
        return x

    def _head(self, h: Tensor) -> Tensor:
        return F.linear(_rms_norm(h, self._norm_w, self._eps), self._embed_w)

    # --- MoR pieces ---------------------------------------------------------------------------
    def _first(self, tokens: Tensor, pos: Tensor, slots: Tensor, all_slots: bool) -> Tensor:
        return self._timed("first", lambda: self._run_layers(
            self.first, F.embedding(tokens, self._embed_w), pos, slots, 1, all_slots))

    def _last(self, h: Tensor, pos: Tensor, slots: Tensor, all_slots: bool) -> Tensor:
        return self._timed("last+head", lambda: self._head(
            self._run_layers(self.last, h, pos, slots, 1, all_slots)))

    def _shared(self, h: Tensor, pos: Tensor, slots: Tensor, rec: int | Tensor,
                all_slots: bool = False) -> Tensor:
        """The shared block f (all B layers, residuals included) at recursion `rec`."""
        self.stats["shared_calls"] += 1
        self.stats["shared_items"] += h.shape[0]
        return self._timed("shared", self._run_layers, self.shared, h, pos, slots, rec,
                           all_slots)

    def _room(self, rec: Tensor, slots: Tensor) -> Tensor:
        """[n] bool: step `rec` of each slot's cache can store one more token."""
        e = self._room_entry[rec]
        lengths = self.cache.lengths[e.clamp(min=0), slots]
        return (e < 0) | (lengths < self.cache.capacity_t[e.clamp(min=0)])

    def _expert_decide(self, h: Tensor, rec: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Expert-choice, causal rule: (take [n] bool, gate [n]) for step rec (1-based;
        rec > N_r never takes). A token routed to a step whose cache is full for its slot
        does not take it (`stats["capped"]`)."""
        model, cfg, nr = self.model, self.cfg, self.cfg.num_recursions
        logits = step_logits(model.routers, h, rec)
        decide = (step_logits(model.predictors, h, rec) if cfg.expert_aux == "router"
                  else logits)
        take = causal_take(rec <= nr, decide, self._always[rec], self._threshold[rec])
        room = self._room(rec.clamp(max=nr + 1), slots)
        self.stats["capped"] += int((take & ~room).sum())
        return take & room, expert_gate(logits, cfg).to(h.dtype)

    def _token_route(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Token-choice: (depth [n] in 1..N_r, gate [n]) from the first layer's output."""
        choice, _, gate = token_choice(self.model.router(h).float(), self.cfg,
                                       self.model.router_bias, self._depth_bias)
        return choice + 1, gate.to(h.dtype)

    # --- one token per slot through the whole model (sequence-wise) ---------------------------
    @torch.inference_mode()
    def step(self, slots: Tensor, tokens: Tensor, pos: Tensor,
             all_slots: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits [n, V] of the next token for each of `slots` (distinct; `all_slots`: they
        are exactly 0..max_batch-1 in order, so the cache is read through views), and (MoR)
        the depth each pass took."""
        self.stats["passes"] += slots.numel()
        if self.kind == "plain":
            fn = self._plain_step if self._static is None else self._static
            return self._timed("layers+head", fn, tokens, pos, slots, all_slots), None
        nr = self.cfg.num_recursions
        h = self._first(tokens, pos, slots, all_slots)
        depth = torch.zeros_like(slots)
        act = torch.arange(slots.numel(), device=slots.device)
        if self.kind == "expert":
            for r in range(1, nr + 1):
                rec = torch.full_like(act, r)
                take, gate = self._expert_decide(h[act], rec, slots[act])
                act, gate = act[take], gate[take]
                if act.numel() == 0:
                    break
                full = all_slots and act.numel() == slots.numel()
                y = self._shared(h[act], pos[act], slots[act], r, full)
                h[act] = h[act] + gate.unsqueeze(1) * y
                depth[act] += 1
        else:
            chosen, gate = self._token_route(h)
            h1, cur = h, h.clone()
            for r in range(1, nr + 1):
                act = act[chosen[act] >= r]
                room = self._room(torch.full_like(act, r), slots[act])
                self.stats["capped"] += int((~room).sum())
                act = act[room]
                if act.numel() == 0:
                    break
                full = all_slots and act.numel() == slots.numel()
                cur[act] = self._shared(cur[act], pos[act], slots[act], r, full)
                depth[act] += 1
            h = h1 + gate.unsqueeze(1) * cur
        self.stats["depth_sum"] += int(depth.sum())
        return self._last(h, pos, slots, all_slots), depth

    def _plain_step(self, tokens: Tensor, pos: Tensor, slots: Tensor, all_slots: bool
                    ) -> Tensor:
        h = F.embedding(tokens, self._embed_w)
        # Every application stores every token: one preparation serves them all.
        li, r = self.apps[0]
        call = self._prepare(li, pos, slots, r, all_slots)
        for li, r in self.apps:
            h = self._layer(li, h, call, r)
        self._commit(call, None)
        return self._head(h)

    # --- prompts -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int]) -> Tensor:
        """Run `tokens` through the model's full forward (causal routing) and load their
        keys/values into `slot` (emptied first). Returns the logits [T, V]."""
        return self.prefill_many([slot], [tokens])[0]

    @torch.inference_mode()
    def prefill_many(self, slots: Sequence[int], prompts: Sequence[list[int]]) -> list[Tensor]:
        """`prefill` for several slots at once: the prompts run through the model's forward
        as right-padded batches (longest first, up to `prefill_tokens` padded tokens per
        forward), each row's real keys/values loaded into its slot (emptied first). Returns
        each prompt's logits [T_i, V], in the order given."""
        slots = [int(s) for s in slots]
        if len(slots) != len(prompts) or len(set(slots)) != len(slots):
            raise ConfigError("prefill_many needs one distinct slot per prompt")
        for s, p in zip(slots, prompts):
            if not 0 <= s < self.max_batch:
                raise ConfigError(f"slot {s} is not in 0..{self.max_batch - 1}")
            if not 1 <= len(p) <= self.max_len:
                raise ConfigError(f"prompt of {len(p)} tokens: prefill needs 1..max_len="
                                  f"{self.max_len} tokens (the cache's max_len)")
        if not slots:
            return []
        self.cache.reset(slots)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[Tensor | None] = [None] * len(prompts)
        batch: list[int] = []
        for i in order + [-1]:
            if batch and (i < 0 or (len(batch) + 1) * len(prompts[batch[0]])
                          > self.prefill_tokens):
                logits = self._prefill_batch([slots[j] for j in batch],
                                             [prompts[j] for j in batch])
                for j, lg in zip(batch, logits):
                    out[j] = lg
                batch = []
            if i >= 0:
                batch.append(i)
        return out

    def _prefill_batch(self, slots: list[int], prompts: list[list[int]]) -> list[Tensor]:
        """One forward over right-padded prompts; loads each row's real keys/values."""
        cache, dev = self.cache, self.device
        lens_l = [len(p) for p in prompts]
        t = max(lens_l)
        ids = torch.tensor([p + [0] * (t - len(p)) for p in prompts], dtype=torch.long,
                           device=dev)
        self.stats["prefills"] += len(prompts)
        self.stats["prefill_calls"] += 1
        out = self.model(ids, collect_kv=True, routing=self.routing)
        lens = torch.tensor(lens_l, device=dev)
        # Real tokens per row each entry stores: the prompt's length, or for a recursion
        # step of the shared block, its real tokens of depth >= r. The forward compacts a
        # step's selected tokens in position order, so they are the row's first entries.
        steps: dict[int, Tensor] = {}
        if out.depths is not None:
            real = (torch.arange(t, device=dev) < lens.unsqueeze(1)).long()
            for r in range(1, self.cfg.num_recursions + 1):
                steps[r] = ((out.depths >= r).long() * real).sum(1)
        loads = []
        for entry in out.kv:
            if entry.shared:
                continue
            count = steps[entry.recursion] if entry.layer in self._shared_set else lens
            loads.append((cache.entry_of[(entry.layer, entry.recursion)], entry, count))
        most = torch.stack([c.max() for _, _, c in loads]).tolist() if loads else []
        for (e, _, _), s in zip(loads, most):  # every entry checked before any is written
            cache.check_fits(e, s)
        rows = torch.tensor(slots, device=dev)
        for e, entry, count in loads:
            m = min(entry.k.shape[2], cache.capacity[e])
            cache.k[e][rows, :, :m] = entry.k[:, :, :m]
            cache.v[e][rows, :, :m] = entry.v[:, :, :m]
            cache.lengths[e, rows] = count
        return [out.logits[i, :n] for i, n in enumerate(lens_l)]

    # --- sampling -------------------------------------------------------------------------------
    def _sample(self, logits: Tensor, u: Tensor | None) -> Tensor:
        """Greedy at temperature 0; otherwise inverse-CDF sampling with the uniforms u [n]
        drawn from each request's own stream."""
        if self.temperature == 0:
            return logits.max(-1).indices  # the first maximum, as argmax (3x faster on CPU)
        probs = (logits.float() / self.temperature).softmax(-1)
        cdf = probs.cumsum(-1)
        idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
        return idx.clamp(max=logits.shape[-1] - 1)

    # --- schedulers ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: list[Request], scheduler: str = "auto",
                 progress=None) -> list[Completion]:
        """Decode every request; returns completions in request order. `progress(n)` is
        called with the number of tokens each iteration produced."""
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if scheduler == "auto":
            scheduler = "depth" if self.kind != "plain" else "sequence"
        if scheduler == "depth" and self.kind == "plain":
            raise ConfigError(f"depth-wise batching needs a MoR model (its tokens leave the "
                              f"recursion at different depths); a {self.cfg.family} model "
                              "decodes with scheduler='sequence'")
        for i, r in enumerate(requests):
            if not r.prompt or r.max_new_tokens < 1:
                raise ConfigError(f"request {i} ({r.id!r}): needs a prompt of >= 1 token and "
                                  f"max_new_tokens >= 1, got {len(r.prompt)} and "
                                  f"{r.max_new_tokens}")
            if len(r.prompt) + r.max_new_tokens - 1 > self.max_len:
                raise ConfigError(
                    f"request {i} ({r.id!r}): prompt {len(r.prompt)} + {r.max_new_tokens} new "
                    f"tokens needs {len(r.prompt) + r.max_new_tokens - 1} cache positions, "
                    f"the engine has max_len={self.max_len}")
        self.cache.reset()
        self.reset_stats()
        run = _Run(self, requests, progress)
        if scheduler == "sequence":
            run.sequence_wise()
        else:
            run.depth_wise()
        return run.completions


class _Run:
    """Per-slot state of one `generate` call: host lists for the bookkeeping (owner, tokens
    left, tokens generated), device tensors for what the model reads (next token, position)."""

    def __init__(self, engine: Engine, requests: list[Request], progress) -> None:
        self.e, self.progress = engine, progress
        s, dev = engine.max_batch, engine.device
        self.queue = deque(enumerate(requests))
        self.completions = [Completion(r.id, list(r.prompt)) for r in requests]
        self.stops = [r.stop for r in requests]
        self.owner = [-1] * s  # request index per slot (-1: idle)
        self.left = [0] * s  # tokens the slot's request still generates
        self.count = [0] * s  # tokens it generated (the index of its next uniform)
        self.pos = torch.zeros(s, dtype=torch.long, device=dev)
        self.next_tok = torch.zeros(s, dtype=torch.long, device=dev)
        self.u = (torch.zeros(s, engine.max_len, device=dev) if engine.temperature > 0
                  else None)
        self.all = torch.arange(s, device=dev)
        self.ones = torch.ones(s, dtype=torch.long, device=dev)

    def active(self) -> list[int]:
        return [s for s, o in enumerate(self.owner) if o >= 0]

    def admit(self, slots: list[int]) -> list[int]:
        """Give each of `slots` (in order) the next queued request, prefilling all their
        prompts but the last token in batched forwards (`Engine.prefill_many`); slots left
        without one go idle. Returns the slots that got a request."""
        e, dev = self.e, self.e.device
        got, last, start, jobs = [], [], [], []
        for slot in slots:
            if not self.queue:
                self.owner[slot] = -1
                continue
            i, req = self.queue.popleft()
            self.owner[slot] = i
            self.left[slot], self.count[slot] = req.max_new_tokens, 0
            self.completions[i].slots.append(slot)
            got.append(slot)
            last.append(req.prompt[-1])
            start.append(len(req.prompt) - 1)
            if len(req.prompt) > 1:
                jobs.append((slot, req.prompt[:-1]))
            if self.u is not None:
                g = torch.Generator().manual_seed(int(req.seed))
                self.u[slot, : req.max_new_tokens] = torch.rand(req.max_new_tokens, generator=g)
        if got:
            e.cache.reset(got)
            if jobs:
                e.prefill_many([s for s, _ in jobs], [p for _, p in jobs])
            idx = torch.tensor(got, device=dev)
            self.pos[idx] = torch.tensor(start, device=dev)
            self.next_tok[idx] = torch.tensor(last, device=dev)
        return got

    def emit(self, slots: Tensor, rows: list[int], logits: Tensor, depths: Tensor | None
             ) -> list[int]:
        """Sample a token for each of `slots` (`rows`: the same, on the host), record it,
        advance the positions; returns the slots whose request is done."""
        e = self.e
        full = slots is self.all
        u = None
        if self.u is not None:
            u = self.u[slots, torch.tensor([self.count[s] for s in rows], device=e.device)]
        tok = e._timed("sampling", e._sample, logits, u)
        toks = tok.tolist()
        dl = depths.tolist() if depths is not None else None
        done = []
        for k, s in enumerate(rows):
            i = self.owner[s]
            c = self.completions[i]
            c.tokens.append(toks[k])
            if dl is not None:
                c.depths.append(dl[k])
            if e.keep_logits:
                c.logits.append(logits[k].float().clone())
            self.count[s] += 1
            self.left[s] -= 1
            stop = self.stops[i]
            if (stop is not None and stop(c.tokens)) or self.left[s] == 0:
                done.append(s)
        if full:
            self.next_tok.copy_(tok)
            self.pos.add_(1)
        else:
            self.next_tok[slots] = tok
            self.pos.index_add_(0, slots, self.ones[: len(rows)])
        if self.progress is not None:
            self.progress(len(rows))
        return done

    def sequence_wise(self) -> None:
        e, s = self.e, self.e.max_batch
        self.admit(list(range(s)))
        rows = self.active()
        act = None
        while rows:
            e.stats["iterations"] += 1
            full = len(rows) == s
            if full:
                act, tokens, pos = self.all, self.next_tok, self.pos
            else:
                if act is None:
                    act = torch.tensor(rows, device=e.device)
                tokens, pos = self.next_tok[act], self.pos[act]
            logits, depths = e.step(act, tokens, pos, full)
            done = self.emit(act, rows, logits, depths)
            if done:
                self.admit(done)
                rows, act = self.active(), None

    @torch.inference_mode()
    def depth_wise(self) -> None:
        """Continuous depth-wise batching (MoR). Per slot: the hidden state of its token in
        flight, the next recursion step it attempts, and the steps it took."""
        e = self.e
        s, d = e.max_batch, e.cfg.d_model
        dev = e.device
        h = torch.zeros(s, d, device=dev, dtype=e.dtype)
        rec = torch.zeros(s, dtype=torch.long, device=dev)
        depth = torch.zeros(s, dtype=torch.long, device=dev)
        gate = torch.zeros(s, device=dev, dtype=e.dtype)
        token = e.kind == "token"
        h1 = torch.zeros_like(h) if token else None
        chosen = torch.zeros_like(rec)

        def canon(slots: Tensor) -> Tensor:
            """Every slot, in whatever order, becomes slots 0..s-1 in order (all indexing
            below is by slot, so the order is free; in order, the cache is read as views)."""
            return self.all if slots.numel() == s else slots

        def feed(slots: Tensor) -> None:
            """The slots' next tokens through the embedding and first layer(s)."""
            if slots.numel() == 0:
                return
            slots = canon(slots)
            hf = e._first(self.next_tok[slots], self.pos[slots], slots, slots is self.all)
            h[slots] = hf
            rec[slots] = 1
            depth[slots] = 0
            if token:
                c, g = e._token_route(hf)
                chosen[slots], gate[slots], h1[slots] = c, g, hf

        def decide(slots: Tensor) -> Tensor:
            """take [n] for the slots' current step (gates stored for expert-choice)."""
            if token:
                take = rec[slots] <= chosen[slots]
                room = e._room(rec[slots].clamp(max=e.cfg.num_recursions + 1), slots)
                e.stats["capped"] += int((take & ~room).sum())
                return take & room
            take, g = e._timed("routing", e._expert_decide, h[slots], rec[slots], slots)
            gate[slots] = g
            return take

        def finish(slots: Tensor) -> Tensor:
            """Tokens leaving the recursion: last layer(s), head, sampling; returns the
            slots that now hold a new token (their sequence's next, or a new request's)."""
            slots = canon(slots)
            hs = h1[slots] + gate[slots].unsqueeze(1) * h[slots] if token else h[slots]
            logits = e._last(hs, self.pos[slots], slots, slots is self.all)
            e.stats["passes"] += slots.numel()
            e.stats["depth_sum"] += int(depth[slots].sum())
            rows = slots.tolist()
            done = self.emit(slots, rows, logits, depth[slots])
            if not done:
                return slots
            refilled = self.admit(done)
            gone = set(done)
            cont = [x for x in rows if x not in gone]
            if refilled:
                cont = sorted(cont + refilled)
            return torch.tensor(cont, dtype=torch.long, device=dev)

        todo = torch.tensor(self.admit(list(range(s))), dtype=torch.long, device=dev)
        feed(todo)
        while any(o >= 0 for o in self.owner):
            e.stats["iterations"] += 1
            # Route the tokens not yet decided; those that stop leave now, and the tokens
            # that replace them are routed in turn, until every slot's token takes a step.
            while todo.numel():
                take = decide(todo)
                out = todo[~take]
                if out.numel() == 0:
                    break
                todo = finish(out)
                feed(todo)
            rows = self.active()
            if not rows:
                break
            act = self.all if len(rows) == s else torch.tensor(rows, device=dev)
            # Tokens of the same step next to each other: each step's rows are a view. With
            # one step only, the stable sort keeps the slots in order.
            act = act[rec[act].argsort(stable=True)]
            y = e._shared(h[act], self.pos[act], act, rec[act], act.numel() == s)
            if token:
                h[act] = y
            else:
                h[act] = h[act] + gate[act].unsqueeze(1) * y
            depth[act] += 1
            rec[act] += 1
            todo = act


class _StaticStep:
    """The sequence-wise step of a vanilla/recursive model at fixed shapes, for CUDA graphs.

    Every slot is a row: the caller's slots are real rows, the others padding (token 0 at
    position 0, keys/values written past their slot's stored tokens -- where nothing reads
    before a real token overwrites it -- and their lengths left as they are). Attention spans
    the smallest width bucket (`_buckets`) that holds every real row's tokens, with a mask;
    all entries of a plain model hold the same lengths, so one write position and mask serve
    every layer. No host sync inside `run`: one CUDA graph per width bucket is captured on
    first use (`graphs=True`) and replayed; `graphs=False` runs it eagerly (CPU tests)."""

    def __init__(self, engine: Engine, graphs: bool) -> None:
        e, s, dev = engine, engine.max_batch, engine.device
        self.e, self.graphs_on = e, graphs
        self.tokens = torch.zeros(s, dtype=torch.long, device=dev)
        self.pos = torch.zeros(s, dtype=torch.long, device=dev)
        self.real = torch.zeros(s, dtype=torch.long, device=dev)
        self.widths = _buckets(e.cache.capacity[0])
        self.graphs: dict[int, tuple] = {}

    def __call__(self, tokens: Tensor, pos: Tensor, slots: Tensor, all_slots: bool = False
                 ) -> Tensor:
        cache = self.e.cache
        need = int(cache.lengths[0].index_select(0, slots).max()) + 1  # host sync
        if need > cache.capacity[0]:
            raise CacheFullError(f"KV cache is full ({cache.capacity[0]} tokens)")
        width = next(w for w in self.widths if w >= need)
        self.tokens.zero_()
        self.tokens[slots] = tokens
        self.pos.zero_()
        self.pos[slots] = pos
        self.real.zero_()
        self.real[slots] = 1
        if self.graphs_on:
            graph, logits = self._graph(width)
            graph.replay()
        else:
            logits = self.run(width)
        return logits.index_select(0, slots)

    def run(self, width: int) -> Tensor:
        """Logits [max_batch, V]; the real rows' keys/values stored, their lengths + 1."""
        e, cache = self.e, self.e.cache
        wpos = cache.lengths[0].clamp(max=cache.capacity[0] - 1)
        seen = (wpos + 1).clamp(max=width)  # (padding rows may hold more than `width`)
        cs = e._rope_tab[self.pos]
        call = _Call(cs[:, :1], cs[:, 1:], [_Group(1, None, e._arange, wpos, seen,
                                                   e._mask(seen, width), width, True)], True)
        h = F.embedding(self.tokens, e._embed_w)
        for li, r in e.apps:
            h = e._layer(li, h, call, r)
        cache.lengths.add_(self.real)
        return e._head(h)

    def _graph(self, width: int) -> tuple:
        if width in self.graphs:
            return self.graphs[width]
        cache, dev = self.e.cache, self.e.device
        saved = cache.lengths.clone()
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (lazy initialisation, allocator)
                self.run(width)
                cache.lengths.copy_(saved)
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.run(width)
        cache.lengths.copy_(saved)
        self.graphs[width] = (graph, logits)
        return graph, logits
