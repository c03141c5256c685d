"""Incremental decoding for every family, with two continuous-batching schedulers.

    engine = Engine(model, max_batch=32, max_len=512)
    outs = engine.generate([Request(prompt=[eos], max_new_tokens=200, id=i) for i in ...])
    outs[0].tokens, outs[0].depths          # generated ids; MoR: recursion steps per pass

One engine interface for vanilla, recursive and MoR models: a static `KVCache` for
`max_batch` sequence slots, `prefill` (a prompt through the model's own forward, its
keys/values loaded into a slot), `step` (one token per slot through the whole model), and
`generate` with a scheduler:

"sequence" -- continuous sequence-wise batching (any family): every iteration runs one token
    of every active slot through the whole stack; a finished sequence's slot is refilled
    from the queue at once.
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

The engine never changes the model it is given: prompts run through the forward with
routing="causal" passed explicitly (the model's `eval_routing` and train/eval flag stay as
they are), and the fused projections are the engine's own copies (`fused_bytes`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mor.errors import ConfigError
from mor.kv_cache import CacheFullError, KVCache, applications
from mor.layers import _rotate_half
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
    """Tokens of one stage call at the same recursion step."""

    r: int
    sel: Tensor | slice | None  # rows of the call (None: all)
    slots: Tensor
    wpos: Tensor | None  # where each token's keys/values go (None: reads only)
    seen: Tensor  # tokens each row attends over
    mask: Tensor  # [m, 1, 1, width]
    width: int
    all_slots: bool


@dataclass
class _Call:
    cos: Tensor
    sin: Tensor
    groups: list[_Group]
    all_write: bool


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [n, heads, hd], cos/sin [n, hd]."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


class Engine:
    """Decoding state of one model: cache, routing, schedulers. Not thread-safe."""

    def __init__(self, model: CausalLM, *, max_batch: int, max_len: int,
                 kv_capacity: str = "routed", temperature: float = 0.0,
                 keep_logits: bool = False) -> None:
        cfg = model.cfg
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        self.model, self.cfg = model, cfg
        # Expert-choice prompts run through the forward under the causal rule (top-k needs
        # the whole sequence); passed per call, so the model's own routing is untouched.
        self.routing = "causal" if cfg.family == "mor" and cfg.router == "expert" else None
        self.kind = "plain" if cfg.family != "mor" else cfg.router
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = KVCache(cfg, max_batch, max_len, kv_capacity=kv_capacity,
                             dtype=self.dtype, device=self.device)
        self.max_batch, self.max_len = max_batch, max_len
        self.temperature, self.keep_logits = temperature, keep_logits
        self.cos, self.sin = model.rope.cos.to(self.dtype), model.rope.sin.to(self.dtype)
        self.H, self.KVH, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if cfg.family == "mor":
            self.first, self.shared, self.last = model.first, model.shared, model.last
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
        self._arange = torch.arange(max_batch, device=self.device)
        self._fuse_weights()
        self.profile = False
        """Time each stage (`stage_times`): first layers, shared block, last layers + head,
        routing, sampling, bookkeeping -- where a decoding second goes."""
        self.stats: dict[str, float] = {}
        self.stage_times: dict[str, float] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {"iterations": 0, "shared_calls": 0, "shared_items": 0, "capped": 0,
                      "passes": 0, "depth_sum": 0, "prefills": 0}
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
        self._wqkv, self._wgu = [], []
        with torch.no_grad():
            for blk in self.model.layers:
                at, mlp = blk.attn, blk.mlp
                self._wqkv.append(torch.cat([at.q_proj.weight, at.k_proj.weight,
                                             at.v_proj.weight]))
                self._wgu.append(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.fused_bytes = sum(w.numel() * w.element_size() for w in self._wqkv + self._wgu)
        """Memory of the fused copies, on top of the model's parameters and the KV cache."""

    def _prepare(self, li: int, pos: Tensor, slots: Tensor, rec: int | Tensor,
                 all_slots: bool) -> _Call:
        """What every layer of one stage shares: RoPE tables, recursion groups, write
        positions and attention masks (all layers of a stage store the same tokens, so their
        entries hold the same lengths; `li` is any layer of the stage)."""
        cache = self.cache
        # Views of whole cache tensors only when the rows are exactly slots 0..max_batch-1.
        all_slots = all_slots and slots.numel() == self.max_batch and bool(
            (slots == self._arange).all())
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
        groups = []
        for r, sel in parts:
            s_slots = slots if sel is None else slots[sel]
            w = cache.entry_of.get((li, r))
            e = cache.read_of[(li, r)]
            if w is not None:
                wpos = cache.lengths[w, s_slots]
                if bool((wpos >= cache.capacity[w]).any()):
                    raise CacheFullError(f"KV cache entry (layer {li}, recursion {r}) is full "
                                         f"({cache.capacity[w]} tokens)")
                seen = wpos + 1
            else:
                wpos, seen = None, cache.lengths[e, s_slots]
            width = int(seen.max())
            mask = (torch.arange(width, device=pos.device) < seen.unsqueeze(1))[:, None, None]
            groups.append(_Group(r, sel, s_slots, wpos, seen, mask, width,
                                 all_slots and sel is None))
        return _Call(self.cos[pos], self.sin[pos], groups,
                     all(g.wpos is not None for g in groups))

    def _layer(self, li: int, x: Tensor, call: _Call) -> Tensor:
        """One decoder layer on x [n, d]: writes the keys/values its (layer, recursion)
        entries store, attends over its read entries (see `_prepare`)."""
        blk, cache = self.model.layers[li], self.cache
        n, H, KVH, hd = x.shape[0], self.H, self.KVH, self.hd
        h = blk.attn_norm(x)
        wqkv = self._wqkv[li]
        if call.all_write:
            qkv = F.linear(h, wqkv)
            q, kv = qkv[:, : H * hd], qkv[:, H * hd:]
        else:  # recursive KV sharing: no K/V projections for the tokens that only read
            q, kv = F.linear(h, wqkv[: H * hd]), None
        q = _rope(q.view(n, H, hd), call.cos, call.sin)
        out = None if call.groups[0].sel is None else q.new_empty(n, H, hd)
        for g in call.groups:
            if g.wpos is not None:
                if kv is not None:
                    kvg = kv if g.sel is None else kv[g.sel]
                else:
                    kvg = F.linear(h[g.sel], wqkv[H * hd:])
                m = kvg.shape[0]
                cos, sin = ((call.cos, call.sin) if g.sel is None
                            else (call.cos[g.sel], call.sin[g.sel]))
                k = _rope(kvg[:, : KVH * hd].reshape(m, KVH, hd), cos, sin)
                v = kvg[:, KVH * hd:].reshape(m, KVH, hd)
                w = cache.entry_of[(li, g.r)]
                cache.k[w][g.slots, :, g.wpos] = k
                cache.v[w][g.slots, :, g.wpos] = v
                cache.lengths[w, g.slots] = g.seen
            e = cache.read_of[(li, g.r)]
            keys, values = cache.k[e][:, :, : g.width], cache.v[e][:, :, : g.width]
            if not g.all_slots:
                keys, values = keys.index_select(0, g.slots), values.index_select(0, g.slots)
            qs = q if g.sel is None else q[g.sel]
            o = F.scaled_dot_product_attention(qs.unsqueeze(2), keys, values,
                                               attn_mask=g.mask,
                                               enable_gqa=H != KVH).squeeze(2)
            if g.sel is None:
                out = o
            else:
                out[g.sel] = o
        x = x + blk.attn.o_proj(out.reshape(n, H * hd))
        gate, up = F.linear(blk.mlp_norm(x), self._wgu[li]).chunk(2, dim=-1)
        return x + blk.mlp.down_proj(F.silu(gate) * up)

    def _run_layers(self, layers, x: Tensor, pos: Tensor, slots: Tensor, rec: int | Tensor,
                    all_slots: bool) -> Tensor:
        call = self._prepare(layers[0], pos, slots, rec, all_slots)
        for li in layers:
            x = self._layer(li, x, call)
        return x

    def _head(self, h: Tensor) -> Tensor:
        return F.linear(self.model.norm(h), self.model.embed.weight)

    # --- MoR pieces ---------------------------------------------------------------------------
    def _first(self, tokens: Tensor, pos: Tensor, slots: Tensor, all_slots: bool) -> Tensor:
        return self._timed("first", lambda: self._run_layers(
            self.first, self.model.embed(tokens), pos, slots, 1, all_slots))

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
        """Logits [n, V] of the next token for each slot, and (MoR) the depth each pass took."""
        self.stats["passes"] += slots.numel()
        if self.kind == "plain":
            return self._timed("layers+head", self._plain_step, tokens, pos, slots,
                               all_slots), None
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
        h = self.model.embed(tokens)
        call = None
        for li, r in self.apps:
            # Every application stores every token: one preparation serves them all.
            call = call or self._prepare(li, pos, slots, r, all_slots)
            h = self._layer(li, h, _Call(call.cos, call.sin, [
                dataclasses.replace(g, r=r) for g in call.groups], True))
        return self._head(h)

    # --- prompts -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int]) -> Tensor:
        """Run `tokens` through the model's full forward (causal routing) and load their
        keys/values into `slot` (emptied first). Returns the logits [T, V]."""
        if len(tokens) > self.max_len:
            raise ConfigError(f"prompt of {len(tokens)} tokens exceeds the cache's max_len="
                              f"{self.max_len}")
        self.cache.reset(slot)
        self.stats["prefills"] += 1
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        out = self.model(ids, collect_kv=True, routing=self.routing)
        for entry in out.kv:
            if entry.shared:
                continue
            e = self.cache.entry_of[(entry.layer, entry.recursion)]
            k, v = entry.k[0], entry.v[0]
            if entry.valid is not None:
                keep = entry.valid[0]
                k, v = k[:, keep], v[:, keep]
            self.cache.load(e, slot, k, v)
        return out.logits[0]

    # --- sampling -------------------------------------------------------------------------------
    def _sample(self, logits: Tensor, u: Tensor) -> Tensor:
        """Greedy at temperature 0; otherwise inverse-CDF sampling with the uniforms u [n]
        drawn from each request's own stream."""
        if self.temperature == 0:
            return logits.argmax(-1)
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
    """Per-slot state of one `generate` call (tensors indexed by slot)."""

    def __init__(self, engine: Engine, requests: list[Request], progress) -> None:
        self.e, self.progress = engine, progress
        s, dev = engine.max_batch, engine.device
        self.queue = deque(enumerate(requests))
        self.completions = [Completion(r.id, list(r.prompt)) for r in requests]
        self.stops = [r.stop for r in requests]
        self.owner = [-1] * s  # request index per slot
        self.active = torch.zeros(s, dtype=torch.bool, device=dev)
        self.pos = torch.zeros(s, dtype=torch.long, device=dev)
        self.remaining = torch.zeros(s, dtype=torch.long, device=dev)
        self.generated = torch.zeros(s, dtype=torch.long, device=dev)
        self.next_tok = torch.zeros(s, dtype=torch.long, device=dev)
        self.u = torch.zeros(s, engine.max_len, device=dev)
        self.all = torch.arange(s, device=dev)

    def admit(self, slot: int) -> bool:
        """Give `slot` the next queued request (prefilling all but its last prompt token);
        False when the queue is empty."""
        if not self.queue:
            self.active[slot] = False
            self.owner[slot] = -1
            return False
        i, req = self.queue.popleft()
        e = self.e
        e.cache.reset(slot)
        if len(req.prompt) > 1:
            e.prefill(slot, req.prompt[:-1])
        self.owner[slot] = i
        self.completions[i].slots.append(slot)
        self.active[slot] = True
        self.pos[slot] = len(req.prompt) - 1
        self.remaining[slot] = req.max_new_tokens
        self.generated[slot] = 0
        self.next_tok[slot] = req.prompt[-1]
        if e.temperature > 0:
            g = torch.Generator().manual_seed(int(req.seed))
            self.u[slot, : req.max_new_tokens] = torch.rand(req.max_new_tokens, generator=g)
        return True

    def emit(self, slots: Tensor, logits: Tensor, depths: Tensor | None) -> tuple[Tensor, list]:
        """Sample a token for each slot, record it; returns (slots still generating,
        slots freed). Positions advance."""
        e = self.e
        tok = e._timed("sampling", e._sample, logits, self.u[slots, self.generated[slots]])
        toks, slot_list = tok.tolist(), slots.tolist()
        dl = depths.tolist() if depths is not None else None
        stopped = []
        for k, s in enumerate(slot_list):
            c = self.completions[self.owner[s]]
            c.tokens.append(toks[k])
            if dl is not None:
                c.depths.append(dl[k])
            if e.keep_logits:
                c.logits.append(logits[k].float().clone())
            stop = self.stops[self.owner[s]]
            if stop is not None and stop(c.tokens):
                stopped.append(s)
        self.next_tok[slots] = tok
        self.generated[slots] += 1
        self.remaining[slots] -= 1
        if stopped:
            self.remaining[stopped] = 0
        self.pos[slots] += 1
        done = self.remaining[slots] == 0
        if self.progress is not None:
            self.progress(len(slot_list))
        return slots[~done], slots[done].tolist()

    def sequence_wise(self) -> None:
        e = self.e
        for s in range(e.max_batch):
            self.admit(s)
        while bool(self.active.any()):
            e.stats["iterations"] += 1
            act = self.active.nonzero().squeeze(1)
            full = act.numel() == e.max_batch
            logits, depths = e.step(act, self.next_tok[act], self.pos[act], full)
            _, freed = self.emit(act, logits, depths)
            for s in freed:
                self.admit(s)

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

        def feed(slots: Tensor) -> None:
            """The slots' next tokens through the embedding and first layer(s)."""
            if slots.numel() == 0:
                return
            hf = e._first(self.next_tok[slots], self.pos[slots], slots,
                          slots.numel() == s)
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
            hs = h1[slots] + gate[slots].unsqueeze(1) * h[slots] if token else h[slots]
            logits = e._last(hs, self.pos[slots], slots, slots.numel() == s)
            e.stats["passes"] += slots.numel()
            e.stats["depth_sum"] += int(depth[slots].sum())
            cont, freed = self.emit(slots, logits, depth[slots])
            refilled = [x for x in freed if self.admit(x)]
            if refilled:
                cont = torch.cat([cont, torch.tensor(refilled, device=dev)]).sort().values
            return cont

        for x in range(s):
            self.admit(x)
        feed(self.active.nonzero().squeeze(1))
        todo = self.active.nonzero().squeeze(1)
        while bool(self.active.any()):
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
            act = self.active.nonzero().squeeze(1)
            if act.numel() == 0:
                break
            # Tokens of the same step next to each other: each step's rows are a view.
            act = act[rec[act].argsort(stable=True)]
            y = e._shared(h[act], self.pos[act], act, rec[act], act.numel() == s)
            if token:
                h[act] = y
            else:
                h[act] = h[act] + gate[act].unsqueeze(1) * y
            depth[act] += 1
            rec[act] += 1
            todo = act
