"""An analytic throughput model of the decode engine (`mor.decode.Engine`): what a decoding
workload reads, writes, multiplies and launches, and how long that takes on a device.

    from evals.perf.throughput_model import Workload, project, roofline_card, calibrate_cpu
    wl = Workload.from_completions(outs, max_len=238)          # per-token depth trace
    cpu = calibrate_cpu(threads=1)                            # ~10 s micro-benchmarks
    res = project(cfg, wl, "depth", batch=52, profile=cpu)    # modelled tokens/s, breakdown
    card = roofline_card(res, measured_tokens_per_s=3456.0)   # MBU, MFU, ceilings

Three parts (docs/throughput_model.md):

1. Counting. `simulate` replays the engine's scheduler ("sequence": every iteration runs
   every active slot through the whole model; "depth": continuous depth-wise batching, one
   shared-block call per iteration on every token in flight, grouped by recursion step, plus
   first-layer calls for the tokens entering and last-layer + head calls for the tokens
   leaving) from a workload -- requests, their per-token depths, the batch -- mirroring the
   engine's control flow line by line (slot refills, the order tokens leave in, which calls
   see the full batch). For every stage call it counts the weight bytes read, the KV bytes
   read (the engine's padded width and the ideal per-token lengths) and written, the FLOPs,
   and the aten operations the engine issues, from the table `OPS` below (the ONE place to
   update when the engine changes; `tests/evals/perf/test_throughput_model.py` compares it
   with a TorchDispatchMode count of the real engine and prints the difference per op).

2. Device profiles (`DeviceProfile`): datasheet figures for H100 SXM, H200 and A100 80GB;
   `calibrate_cpu` measures this CPU (memory bandwidth, matmul and attention throughput at
   decoding shapes, the cost of each small aten op, and three in-context factors from small
   decoding runs) in ~10 s.

3. Projection (`project`, `roofline_card`): modelled time = sum over calls of each op's
   host cost + the data time of the heavy calls (matmuls, attention, KV gathers, elements
   of the small kernels); tokens/s, per-iteration figures, a breakdown, memory-bandwidth
   ceilings, and MBU / MFU of a measured tokens/s. Validated against bench-infer on CPU
   (benchmarks/throughput_model_check.py).

Prompts longer than one token (prefill through the model's forward), `stop` callbacks and
`keep_logits` are outside the model: bench-infer uses none of them.
"""

# The calibration's benchmark closures are called inside the loop that defines them.
# ruff: noqa: B023
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mor import flops
from mor.config import ModelConfig
from mor.errors import ConfigError

SCHEDULERS = ("sequence", "depth")

# =============================================================================================
# 1. THE CALL TABLE: aten operations the engine issues, piece by piece
# =============================================================================================
# Each entry is the sequence of aten ops (as a TorchDispatchMode sees them under
# torch.inference_mode, overload packet names without "aten.") that one piece of
# mor/decode.py issues, in order. Pseudo entries:
#   "SET"      a setitem `x[index_tensor] = value` whose value has a leading dimension:
#              `index_put_`, preceded by a `view` when that dimension is 1 (torch strips
#              leading unit dimensions of the value).
#   "SLICE"    a `slice`, absent when it spans the whole dimension (torch then returns the
#              tensor itself): `lengths[entries]` of a stage that writes every entry.
#   "ROUTER"   the router module: ("linear",) or ("linear", "gelu", "linear") (router_arch).
#   "GATE"     the router function: "sigmoid" / "tanh" (expert), "softmax" / "sigmoid"
#              (token).
#   "NORM"     decode._rms_norm: `_NORM_FP32` for fp32 activations, else `_NORM_OTHER`.
#   "@token"   host work that is no aten op (emit's Python loop, per token): not counted as
#              a call, charged by the time model.
# When the engine changes, paste the new sequence here (and adjust `_Replay` if its control
# flow changed); the dispatch-count test names the ops that differ.

_ROPE = ("mul", "roll", "addcmul")  # decode._rope: x * cos + roll(x) * sin_signed
_NORM_FP32 = ("mul", "mean", "add_", "rsqrt", "mul", "mul_")  # decode._rms_norm, fp32
_NORM_OTHER = ("to", "mul", "mean", "add_", "rsqrt", "mul", "to", "mul")  # bf16 / fp16
_ROOM = ("index", "clamp", "index", "lt", "clamp", "index", "lt", "__or__")  # Engine._room
_TOLIST = ("resolve_conj", "resolve_neg")  # Tensor.tolist()
_NEW = ("lift_fresh", "detach_")  # torch.tensor(list)

OPS: dict[str, tuple[str, ...]] = {
    # --- Engine._prepare: once per stage call (first / shared / last / plain stack) --------
    "prepare.rope": ("index",),  # self._rope_tab[pos]
    "prepare.rec_tensor": ("unique_consecutive",) + _TOLIST * 2,  # rec a tensor
    "prepare.group_unsorted": ("eq", "nonzero", "squeeze"),  # rows of a step not contiguous
    "prepare.group_sel_slice": ("slice",),  # slots[sel], several steps, sorted
    "prepare.group_sel_index": ("index",),
    "prepare.group_lengths": ("select",),  # cache.lengths[entry]
    "prepare.group_rows": ("index",),  # lengths[slots] (rows not all slots in order)
    "prepare.group_write": ("add",),  # seen = cur + 1
    "prepare.bounds_one": ("aminmax", "stack") + _TOLIST,  # one group: one host sync
    "prepare.bounds_group": ("aminmax", "stack"),  # several groups: per group, then
    "prepare.bounds_many": ("stack",) + _TOLIST,  # ... one stack and one sync
    "prepare.call": ("slice", "slice"),  # cs[:, :1], cs[:, 1:]
    # Engine._mask, rows seeing different numbers of tokens (CPU fp32: additive mask for
    # the matmuls; else a bool mask for SDPA)
    "mask.bmm": ("slice", "unsqueeze", "lt", "where", "unsqueeze", "expand", "reshape"),
    "mask.sdpa": ("slice", "unsqueeze", "lt", "unsqueeze", "unsqueeze"),
    # --- Engine._layer: once per layer per stage call ---------------------------------------
    "layer.attn_norm": ("NORM",),
    "layer.qkv": ("linear", "slice", "view") + _ROPE + ("slice", "slice", "slice", "view"),
    "layer.q_only": ("linear", "view") + _ROPE,  # KV sharing with a read-only group
    "layer.grouped": ("new_empty",),  # several recursion groups: out buffer
    "layer.group.kv_rows_slice": ("slice", "slice"),  # k_rows[sel], v_rows[sel]
    "layer.group.kv_rows_index": ("index", "index"),
    "layer.group.kv_proj_slice": ("slice", "linear", "slice", "view", "slice", "slice")
    + _ROPE + ("slice", "view"),  # KV sharing: K/V of the writing rows only
    "layer.group.kv_proj_index": ("index", "linear", "slice", "view", "index", "index")
    + _ROPE + ("slice", "view"),
    "layer.group.write_pos": ("select", "copy_", "select", "copy_"),  # all slots, one pos
    "layer.group.write_rows": ("SET", "SET"),  # cache.k[w][slots, :, wpos] = k; same v
    "layer.group.read": ("slice", "slice"),  # cache.k[e][:, :, :width], same for v
    "layer.group.read_full": ("alias", "alias"),  # width == the entry's capacity
    "layer.group.gather": ("index_select", "index_select"),  # rows are not all slots
    "layer.group.q_rows_slice": ("slice",),
    "layer.group.q_rows_index": ("index",),
    "layer.group.scatter_slice": ("slice", "copy_"),  # out[sel] = o
    "layer.group.scatter_index": ("SET",),
    "layer.out": ("addmm", "NORM", "linear", "slice", "silu", "slice", "mul_", "addmm"),
    # Engine._attend: CPU fp32 two batched matmuls and a softmax, else SDPA
    "attend.bmm": ("mul", "reshape", "reshape", "transpose", "bmm", "softmax", "reshape",
                   "bmm", "view"),
    "attend.bmm_masked": ("mul", "reshape", "reshape", "transpose", "baddbmm", "softmax",
                          "reshape", "bmm", "view"),
    "attend.sdpa": ("unsqueeze", "scaled_dot_product_attention", "view"),
    # Engine._commit: per writing group, once per stage call
    "commit.pos": ("lift_fresh", "SLICE", "fill_"),  # lengths[entries] = width
    "commit.all": ("SLICE", "view", "expand", "copy_"),  # lengths[entries] = seen
    "commit.rows": ("SLICE", "SET"),  # lengths[entries, slots] = seen
    # --- embedding, head -------------------------------------------------------------------
    "embed": ("embedding",),
    "head": ("NORM", "linear"),
    # --- routing --------------------------------------------------------------------------
    # Engine._expert_decide: step_logits (all N_r routers, then the row's own), causal_take
    # with the knob's threshold, room check, capped count, gate.
    "route.expert.logits": ("clamp", "sub", "unsqueeze", "cat", "to", "gather", "squeeze"),
    "route.expert.logits.per_step": ("ROUTER",),
    "route.expert.take": ("le", "index", "index", "gt", "__or__", "__and__"),
    "route.expert.room": ("clamp",) + _ROOM,
    "route.expert.tail": ("bitwise_not", "__and__", "sum", "item", "__and__", "GATE", "mul",
                          "to"),
    # Engine._token_route: router, token_choice, choice + 1, gate.to
    "route.token": ("ROUTER", "to", "GATE", "argmax", "unsqueeze", "gather", "squeeze", "mul",
                    "add", "to"),
    "route.token.bias": ("add",),  # loss-free balancing bias, or the knob's depth bias
    # --- Engine.step (sequence-wise), MoR ----------------------------------------------------
    "step.init": ("zeros_like", "arange"),
    "step.expert.decide_args": ("full_like", "index", "index"),  # rec, h[act], slots[act]
    "step.expert.select": ("index", "index"),  # act[take], gate[take]
    "step.shared_args": ("index", "index", "index"),  # h|cur[act], pos[act], slots[act]
    "step.expert.update": ("index", "unsqueeze", "mul", "add", "SET"),  # h[act] += g * y
    "step.depth": ("index", "add_", "SET"),  # depth[act] += 1
    "step.token.clone": ("clone",),
    "step.token.filter": ("index", "ge", "index", "full_like", "index") + _ROOM
    + ("bitwise_not", "sum", "item", "index"),
    "step.token.update": ("SET",),  # cur[act] = shared(...)
    "step.token.combine": ("unsqueeze", "mul", "add"),
    "step.depth_sum": ("sum", "item"),
    # --- Engine._sample, _Run.emit -------------------------------------------------------------
    "emit.u": _NEW + ("index",),  # u[slots, tensor(counts)]
    "sample.greedy": ("max",),  # logits.max(-1).indices
    "sample.temperature": ("to", "div", "softmax", "cumsum", "select", "mul", "unsqueeze",
                           "searchsorted", "squeeze", "clamp"),
    "emit.tolist": _TOLIST,
    "emit.depths": _TOLIST,  # MoR: depths.tolist()
    "emit.per_token": ("@token",),  # the Python loop over the emitted tokens
    "emit.all": ("copy_", "add_"),  # every slot: next_tok.copy_, pos.add_(1)
    "emit.rows": ("SET", "slice", "index_add_"),  # next_tok[slots] = tok; pos.index_add_
    # --- _Run bookkeeping ----------------------------------------------------------------------
    "generate.init": ("zero_", "zeros", "zeros", "arange", "ones"),
    "generate.init.sampling": ("zeros",),  # the uniforms (temperature > 0)
    "admit.sampling": ("rand", "select", "slice", "copy_"),  # per admitted request
    "admit.store": ("lift_fresh", "lift_fresh", "index_put_") + _NEW + _NEW + ("SET",)
    + _NEW + ("SET",),  # cache.reset(got); idx; pos[idx] = ..; next_tok[idx] = ..
    "seq.rows": _NEW,  # act = torch.tensor(rows) (after a change of the active slots)
    "seq.step_args": ("index", "index"),  # next_tok[act], pos[act]
    # --- _Run.depth_wise ----------------------------------------------------------------------
    "depth.init": ("zeros", "zeros", "zeros", "zeros", "zeros_like"),
    "depth.init.token": ("zeros_like",),
    "depth.todo": _NEW,  # torch.tensor(admitted slots)
    "depth.feed_args": ("index", "index"),
    "depth.feed_store": ("SET", "lift_fresh", "index_put_", "lift_fresh", "index_put_"),
    "depth.feed_token": ("SET", "SET", "SET"),  # chosen, gate, h1
    "depth.decide.expert_args": ("index", "index"),
    "depth.decide.expert_gate": ("SET",),  # gate[slots] = g
    "depth.decide.token": ("index", "index", "le", "index", "clamp") + _ROOM
    + ("bitwise_not", "__and__", "sum", "item", "__and__"),
    "depth.out": ("bitwise_not", "index"),  # todo[~take]
    "depth.finish.hidden.expert": ("index",),
    "depth.finish.hidden.token": ("index", "index", "unsqueeze", "index", "mul", "add"),
    "depth.finish.pos": ("index",),
    "depth.finish.after": ("index", "sum", "item") + _TOLIST + ("index",),  # depth sum,
    # rows = slots.tolist(), depth[slots]
    "depth.finish.cont": _NEW,  # torch.tensor(cont)
    "depth.rows": _NEW,  # act = torch.tensor(rows), not every slot active
    "depth.order": ("index", "argsort", "index", "index", "index", "index"),
    "depth.update.expert": ("index", "index", "unsqueeze", "mul", "add", "SET"),
    "depth.update.token": ("SET",),
    "depth.advance": ("index", "add_", "SET", "index", "add_", "SET"),  # depth, rec += 1
}
"""The engine's aten calls per piece (see the comment above)."""

VIEW_OPS = frozenset({"view", "slice", "alias", "select", "unsqueeze", "squeeze", "transpose",
                      "expand", "lift_fresh", "detach_", "resolve_conj", "resolve_neg",
                      "new_empty"})
"""Metadata-only ops (no kernel): their cost is host overhead alone."""
SYNC_OPS = frozenset({"item", "is_nonzero", "nonzero", "unique_consecutive"})
"""Ops that hand a value to the host (on a GPU: wait for the device)."""
MATMUL_OPS = frozenset({"linear", "addmm"})
"""Matmuls with weights (their data time: weight bytes and FLOPs)."""
ATTENTION_OPS = frozenset({"bmm", "baddbmm", "scaled_dot_product_attention"})
"""Attention kernels (their data time: the attention term)."""
HEAVY_OPS = MATMUL_OPS | ATTENTION_OPS | {"index_select"}
"""Ops whose data time the model charges separately (matmuls, attention, KV gathers)."""


def op_class(op: str) -> str:
    """"view", "sync", "token" (per-token Python, a host pseudo op) or "kernel" (everything
    else, heavy ops included: their data time is added separately)."""
    if op == "@token":
        return "token"
    if op in VIEW_OPS:
        return "view"
    if op in SYNC_OPS:
        return "sync"
    return "kernel"


# =============================================================================================
# Workload
# =============================================================================================
@dataclass
class Workload:
    """What bench-infer decodes: one request per entry of `lengths`, each from a one-token
    prompt; `depths[i][t]` the recursion steps token t of request i took (MoR; `None` for
    vanilla/recursive models, or to draw depths from `mean_depth`/`fractions` in `project`)."""

    lengths: list[int]
    depths: list[list[int]] | None = None
    max_len: int | None = None
    """Cache length per slot (the engine's max_len); default max(lengths) + 1."""
    temperature: float = 1.0
    kv_capacity: str = "routed"
    bytes_per_elem: int | None = None
    """Element size of weights, activations and the KV cache (fp32 on CPU: 4; bf16: 2);
    None: the device profile's in `project`, 4 in `simulate`."""

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise ConfigError("a workload needs at least one request of >= 1 tokens")
        if self.depths is not None and (len(self.depths) != len(self.lengths) or any(
                len(d) != n for d, n in zip(self.depths, self.lengths))):
            raise ConfigError("depths must hold one depth per generated token of every "
                                  "request (as Completion.depths)")
        if self.max_len is None:
            self.max_len = max(self.lengths) + 1

    @classmethod
    def from_completions(cls, completions: Sequence[Any], **kw: Any) -> Workload:
        """From `Engine.generate`'s completions (request order): lengths and, for MoR, the
        depth of every token."""
        lengths = [len(c.tokens) for c in completions]
        depths = ([list(c.depths) for c in completions]
                  if all(c.depths for c in completions) else None)
        return cls(lengths, depths, **kw)

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], cfg: ModelConfig | None = None, *,
                     mean_depth: float | None = None,
                     fractions: Sequence[float] | None = None, seed: int = 0,
                     **kw: Any) -> Workload:
        """Requests of `lengths` tokens; MoR depths drawn i.i.d. per token (seeded) from the
        per-step selected fractions `fractions` (fraction of tokens taking step r, r = 1..N_r,
        non-increasing), or from `mean_depth` (the N_r + 1 depth values spread as a
        two-point distribution around it), or the capacities (cfg.step_capacities)."""
        lengths = list(lengths)
        if cfg is None or cfg.family != "mor":
            return cls(lengths, None, **kw)
        probs = depth_distribution(cfg, mean_depth=mean_depth, fractions=fractions)
        rng = random.Random(seed)
        values = list(range(len(probs)))
        depths = [rng.choices(values, probs, k=n) for n in lengths]
        return cls(lengths, depths, **kw)


def depth_distribution(cfg: ModelConfig, *, mean_depth: float | None = None,
                       fractions: Sequence[float] | None = None) -> list[float]:
    """P(depth = d), d = 0..N_r, from per-step selected fractions, a mean depth, or the
    config's capacities."""
    nr = cfg.num_recursions
    if fractions is None and mean_depth is None:
        fractions = cfg.step_capacities
    if fractions is not None:
        fr = [float(f) for f in fractions]
        if len(fr) != nr or any(b > a + 1e-12 for a, b in zip(fr, fr[1:])):
            raise ConfigError(f"fractions must hold {nr} non-increasing values")
        fr = [1.0] + fr + [0.0]
        return [max(0.0, fr[d] - fr[d + 1]) for d in range(nr + 1)]
    if not 0 <= mean_depth <= nr:
        raise ConfigError(f"mean_depth must be in 0..{nr}, got {mean_depth}")
    lo = min(int(math.floor(mean_depth)), nr - 1) if nr else 0
    p = [0.0] * (nr + 1)
    p[lo], p[lo + 1] = lo + 1 - mean_depth, mean_depth - lo
    return p


# =============================================================================================
# Counts
# =============================================================================================
@dataclass
class Counts:
    """Everything a simulated decode issues (whole workload)."""

    ops: Counter = field(default_factory=Counter)
    """aten op name (and "@" host pseudo ops) -> calls."""
    pieces: Counter = field(default_factory=Counter)
    """OPS key -> times issued."""
    iterations: int = 0
    tokens: int = 0
    stage_calls: Counter = field(default_factory=Counter)
    """"first" / "shared" / "last" / "stack" (vanilla layers + head) -> calls."""
    stage_rows: Counter = field(default_factory=Counter)
    weight_bytes: Counter = field(default_factory=Counter)
    """Bytes of weights read, per stage ("first", "shared", "last" incl. the head, "stack",
    "routing")."""
    kv_read_bytes: float = 0.0
    """K and V bytes attention reads: every row over its group's padded width (what the
    engine's kernels read)."""
    kv_read_ideal_bytes: float = 0.0
    """K and V bytes if each token read exactly its own entry's length."""
    kv_write_bytes: float = 0.0
    kv_gather_bytes: float = 0.0
    """Extra traffic of index_select copies of K/V (read + write) for calls on a subset of
    slots."""
    act_bytes: float = 0.0
    """Activation bytes of the matmuls (inputs read + outputs written)."""
    flops_linear: float = 0.0
    flops_attention: float = 0.0
    """4 x rows x padded width x heads x head_dim per layer call (QK^T and AV)."""
    flops_head: float = 0.0
    linear_shapes: Counter = field(default_factory=Counter)
    """(rows, in, out) -> matmul calls."""
    sdpa: list[tuple[int, int, float, bool]] = field(default_factory=list)
    """Per attention call: (rows, padded width, K/V bytes read, rows are all slots: the
    keys are strided views of the cache rather than gathered copies)."""
    depth_sum: int = 0
    bytes_per_elem: int = 4
    """Element size the counts assume (the workload's)."""
    elem_work: float = 0.0
    """Sum over the small kernels of the layers, head and sampling of the elements each
    touches (rows x width): their data time beyond the fixed per-call overhead."""
    stats: Counter = field(default_factory=Counter)
    """What `Engine.stats` counts: "shared_calls", "shared_items", "passes"."""
    by_stage: dict[str, Counts] = field(default_factory=dict)
    """The same counts split by engine stage: "first", "shared", "last" (layers + head),
    "stack" (vanilla: layers + head), "routing", "sampling", "bookkeeping" (the rest)."""

    @property
    def calls(self) -> int:
        """aten ops (kernel calls and views; no host pseudo ops)."""
        return sum(n for op, n in self.ops.items() if not op.startswith("@"))

    def aten_ops(self) -> Counter:
        return Counter({op: n for op, n in self.ops.items() if not op.startswith("@")})

    @property
    def weight_total(self) -> float:
        return float(sum(self.weight_bytes.values()))

    @property
    def flops(self) -> float:
        return self.flops_linear + self.flops_attention + self.flops_head


class _Sim:
    """Counting primitives of `simulate`: one engine stage call at a time."""

    def __init__(self, cfg: ModelConfig, wl: Workload, batch: int, *,
                 depth_bias: bool = False, attention: str = "bmm") -> None:
        self.cfg, self.wl = cfg, wl
        self.s = min(batch, len(wl.lengths))
        self.mor = cfg.family == "mor"
        if self.mor and wl.depths is None:
            raise ConfigError("a MoR workload needs per-token depths (Workload.depths)")
        if attention not in ("bmm", "sdpa"):
            raise ConfigError(f"attention must be 'bmm' or 'sdpa', got {attention!r}")
        self.kind = cfg.router if self.mor else "plain"
        self.depth_bias, self.attention = depth_bias, attention
        e = wl.bytes_per_elem or 4
        self.c = Counts(bytes_per_elem=e)
        d, hd, H, KVH = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        self.e, self.d, self.hd, self.H, self.KVH = e, d, hd, H, KVH
        self.kv_row = 2 * KVH * hd * e  # K and V bytes of one token in one layer
        # Weight shapes (in, out) of one layer's matmuls in the engine.
        self.w_qkv, self.w_q = (d, (H + 2 * KVH) * hd), (d, H * hd)
        self.w_kv, self.w_o = (d, 2 * KVH * hd), (H * hd, d)
        self.w_gu, self.w_down = (d, 2 * cfg.d_ff), (cfg.d_ff, d)
        if self.mor:
            f, b = cfg.num_unique_first, cfg.num_shared
            self.n_first, self.n_shared = f, b
            self.n_last = cfg.num_unique_layers - f - b
        else:
            self.n_apps = len(cfg.schedule())

    # --- counting primitives --------------------------------------------------------------
    stage = "bookkeeping"
    """The engine stage being counted (`Counts.by_stage`)."""

    def _tee(self) -> tuple[Counts, Counts]:
        sc = self.c.by_stage.get(self.stage)
        if sc is None:
            sc = self.c.by_stage[self.stage] = Counts(bytes_per_elem=self.e)
        return self.c, sc

    @contextlib.contextmanager
    def at(self, stage: str):
        prev, self.stage = self.stage, stage
        try:
            yield
        finally:
            self.stage = prev

    def _add(self, name: str, value: float) -> None:
        for c in self._tee():
            setattr(c, name, getattr(c, name) + value)

    def _cnt(self, name: str, key: Any, value: float) -> None:
        for c in self._tee():
            getattr(c, name)[key] += value

    def _app(self, name: str, item: Any) -> None:
        for c in self._tee():
            getattr(c, name).append(item)

    def op(self, key: str, rows: int = 2, times: int = 1, elems: int = 0,
           span: bool = False) -> None:
        """Issue piece `key`; `rows`: leading size of the values its "SET"s store; `elems`:
        elements each of its small kernels touches (activations of a layer; 0 for [n]
        vectors); `span`: its "SLICE"s span the whole dimension (no op)."""
        if times <= 0:
            return
        self._cnt("pieces", key, times)
        cfg = self.cfg
        names: list[str] = []
        for name in OPS[key]:
            if name == "SET":
                names += ["view", "index_put_"] if rows == 1 else ["index_put_"]
            elif name == "SLICE":
                names += [] if span else ["slice"]
            elif name == "ROUTER":
                names += (["linear"] if cfg.router_arch == "linear"
                          else ["linear", "gelu", "linear"])
            elif name == "GATE":
                names.append(cfg.router_func)
            elif name == "NORM":
                names += _NORM_FP32 if self.e == 4 else _NORM_OTHER
            else:
                names.append(name)
        for name in names:
            self._cnt("ops", name, times)
        if elems:
            kernels = sum(1 for name in names if op_class(name) == "kernel"
                          and name not in HEAVY_OPS)
            self._add("elem_work", times * kernels * elems)

    def linear(self, stage: str, rows: int, shape: tuple[int, int]) -> None:
        k, n = shape
        self._cnt("linear_shapes", (rows, k, n), 1)
        self._cnt("weight_bytes", stage, k * n * self.e)
        self._add("act_bytes", rows * (k + n) * self.e)
        self._add("flops_linear", 2 * rows * k * n)

    # --- stages ---------------------------------------------------------------------------
    def prepare(self, groups: list[dict], all_slots: bool, rec_tensor: bool,
                layout: str) -> None:
        """Engine._prepare: sets each group's "full" (rows are all slots in order: views),
        "pos" (all write at one position: views) and "mask" flags."""
        self.op("prepare.rope")
        if rec_tensor:
            self.op("prepare.rec_tensor")
        grouped = len(groups) > 1
        for g in groups:
            if grouped:
                if layout == "unsorted":
                    self.op("prepare.group_unsorted")
                    self.op("prepare.group_sel_index")
                else:
                    self.op("prepare.group_sel_slice")
            g["full"] = all_slots and not grouped
            self.op("prepare.group_lengths")
            if not g["full"]:
                self.op("prepare.group_rows")
            if g["write"]:
                self.op("prepare.group_write")
            g["mask"] = g["lo"] != g["width"]
            g["pos"] = g["write"] and g["full"] and not g["mask"]
        if grouped:
            self.op("prepare.bounds_group", times=len(groups))
            self.op("prepare.bounds_many")
        else:
            self.op("prepare.bounds_one")
        for g in groups:
            if g["mask"]:
                self.op("mask.sdpa" if self.attention == "sdpa" else "mask.bmm")
        self.op("prepare.call")

    def layer(self, stage: str, n: int, groups: list[dict], unsorted: bool = False) -> None:
        """Engine._layer on n rows; groups: {"rows", "width", "write", "seen_sum", ...}."""
        cfg, e = self.cfg, self.e
        sel = "index" if unsorted else "slice"
        hkv = self.KVH * self.hd
        self._cnt("weight_bytes", stage, 2 * self.d * e)  # the two norm weights
        self.op("layer.attn_norm", elems=n * self.d)
        all_write = all(g["write"] for g in groups)
        if all_write:
            self.op("layer.qkv", elems=n * (self.H + self.KVH) * self.hd)
            self.linear(stage, n, self.w_qkv)
        else:
            self.op("layer.q_only", elems=n * self.H * self.hd)
            self.linear(stage, n, self.w_q)
        grouped = len(groups) > 1
        if grouped:
            self.op("layer.grouped")
        for g in groups:
            m, w = g["rows"], g["width"]
            if g["write"]:
                if all_write:
                    if grouped:
                        self.op(f"layer.group.kv_rows_{sel}")
                else:
                    self.op(f"layer.group.kv_proj_{sel}", elems=m * hkv)
                    self.linear(stage, m, self.w_kv)
                if g["pos"]:
                    self.op("layer.group.write_pos", elems=m * hkv)
                else:
                    self.op("layer.group.write_rows", rows=m, elems=m * hkv)
                self._add("kv_write_bytes", m * self.kv_row)
            self.op("layer.group.read_full" if w == g["capacity"] else "layer.group.read")
            kv = m * w * self.kv_row
            if not g["full"]:
                self.op("layer.group.gather")
                self._add("kv_gather_bytes", 2 * kv)
            if grouped:
                self.op(f"layer.group.q_rows_{sel}")
            if self.attention == "sdpa":
                self.op("attend.sdpa")
            else:
                self.op("attend.bmm_masked" if g["mask"] else "attend.bmm")
            self._add("kv_read_bytes", kv)
            self._add("kv_read_ideal_bytes", g["seen_sum"] * self.kv_row)
            self._add("flops_attention", 4 * m * w * self.H * self.hd)
            self._app("sdpa", (m, w, kv, bool(g["full"])))
            if grouped:
                self.op(f"layer.group.scatter_{sel}", rows=m)
        self.op("layer.out", elems=n * cfg.d_ff)
        self.linear(stage, n, self.w_o)
        self.linear(stage, n, self.w_gu)
        self.linear(stage, n, self.w_down)

    def commit(self, groups: list[dict], span: bool) -> None:
        """Engine._commit: the lengths of the entries the stage wrote."""
        for g in groups:
            if not g["write"]:
                continue
            if g["pos"]:
                self.op("commit.pos", span=span)
            elif g["full"]:
                self.op("commit.all", span=span)
            else:
                self.op("commit.rows", rows=g["rows"], span=span)

    def head(self, stage: str, n: int) -> None:
        cfg, e = self.cfg, self.e
        self.op("head", elems=n * self.d)
        self._cnt("weight_bytes", stage, (cfg.vocab_size * self.d + self.d) * e)
        self._cnt("linear_shapes", (n, self.d, cfg.vocab_size), 1)
        self._add("act_bytes", n * (self.d + cfg.vocab_size) * e)
        self._add("flops_head", 2 * n * self.d * cfg.vocab_size)

    def embed(self, n: int) -> None:
        self.op("embed")
        self._add("act_bytes", 2 * n * self.d * self.e)

    def stack(self, stage: str, layers: int, n: int, groups: list[dict], all_slots: bool,
              rec_tensor: bool = False, layout: str = "identity", span: bool = False) -> None:
        """Engine._run_layers (or _plain_step): one preparation, `layers` layers, one
        commit (`span`: the stage writes every cache entry)."""
        self._cnt("stage_calls", stage, 1)
        self._cnt("stage_rows", stage, n)
        self.prepare(groups, all_slots, rec_tensor, layout)
        for _ in range(layers):
            self.layer(stage, n, groups, unsorted=layout == "unsorted")
        self.commit(groups, span)

    def route_expert(self, n: int) -> None:
        with self.at("routing"):
            cfg = self.cfg
            per = 2 if cfg.expert_aux == "router" else 1
            self.op("route.expert.logits", times=per)
            self.op("route.expert.logits.per_step", times=per * cfg.num_recursions)
            self.op("route.expert.take")
            self.op("route.expert.room")
            self.op("route.expert.tail")
            for _ in range(per * cfg.num_recursions):
                self._router_linears(n, 1)

    def route_token(self, n: int) -> None:
        with self.at("routing"):
            cfg = self.cfg
            self.op("route.token")
            bias = (cfg.balancing == "loss_free") + bool(self.depth_bias)
            self.op("route.token.bias", times=bias)
            self._router_linears(n, cfg.num_recursions)

    def _router_linears(self, n: int, out: int) -> None:
        """One router module on n rows: Linear(d, out), or Linear(d, d) + Linear(d, out)."""
        d = self.d
        shapes = [(d, out)] if self.cfg.router_arch == "linear" else [(d, d), (d, out)]
        for shape in shapes:
            self.linear("routing", n, shape)


class _Replay(_Sim):
    """The schedulers of `mor.decode._Run`, step by step (mirrors its control flow)."""

    def __init__(self, cfg: ModelConfig, wl: Workload, batch: int, **kw: Any) -> None:
        super().__init__(cfg, wl, batch, **kw)
        s = self.s
        self.queue = list(range(len(wl.lengths)))[::-1]  # pop() takes the next request
        self.owner = [-1] * s
        self.left = [0] * s
        self.count = [0] * s
        nr = cfg.num_recursions if self.mor else 0
        # KV entry lengths per slot: plain: every layer alike (kv_first); MoR: first, last,
        # step r.
        self.kv_first = [0] * s
        self.kv_last = [0] * s
        self.kv_step = [[0] * (nr + 1) for _ in range(s)]
        self.rec = [0] * s
        self.depth = [0] * s
        # Capacity of each step's cache entry (mor.kv_cache.KVCache), index r = 1..N_r.
        self.step_capacity = [wl.max_len] * (nr + 1)
        if self.mor and wl.kv_capacity == "routed":
            self.step_capacity[1:] = flops.step_tokens(cfg, wl.max_len)
        self.stats = self.c.stats

    # --- helpers --------------------------------------------------------------------------
    def target(self, slot: int) -> int:
        """Depth of the token a slot has in flight (from the workload's trace)."""
        return self.wl.depths[self.owner[slot]][self.count[slot]]

    def entry_group(self, slots: list[int], lengths: list[int], write: bool,
                    capacity: int) -> dict:
        seen = [lengths[x] + 1 if write else lengths[x] for x in slots]
        return {"rows": len(slots), "width": max(seen), "lo": min(seen), "write": write,
                "seen_sum": sum(seen), "capacity": capacity}

    def active(self) -> list[int]:
        return [x for x in range(self.s) if self.owner[x] >= 0]

    def canon(self, slots: list[int]) -> tuple[list[int], bool]:
        """_Run.depth_wise's canon: every slot becomes slots 0..s-1 in order."""
        if len(slots) == self.s:
            return list(range(self.s)), True
        return slots, False

    def admit(self, slots: list[int]) -> list[int]:
        got = []
        for slot in slots:
            if not self.queue:
                self.owner[slot] = -1
                continue
            i = self.queue.pop()
            self.owner[slot], self.left[slot], self.count[slot] = i, self.wl.lengths[i], 0
            got.append(slot)
            if self.wl.temperature > 0:
                self.op("admit.sampling")
        if got:
            self.op("admit.store", rows=len(got))
            for slot in got:
                self.kv_first[slot] = self.kv_last[slot] = 0
                self.kv_step[slot] = [0] * len(self.kv_step[slot])
        return got

    def emit(self, slots: list[int], full: bool) -> list[int]:
        n = len(slots)
        if self.wl.temperature > 0:
            self.op("emit.u")
        with self.at("sampling"):
            self.op("sample.temperature" if self.wl.temperature > 0 else "sample.greedy",
                    elems=n * self.cfg.vocab_size)
        self.op("emit.tolist")
        if self.mor:
            self.op("emit.depths")
        self.op("emit.per_token", times=n)
        self.c.tokens += n
        done = []
        for x in slots:
            self.count[x] += 1
            self.left[x] -= 1
            if self.left[x] == 0:
                done.append(x)
        self.op("emit.all" if full else "emit.rows", rows=n)
        return done

    # --- stage calls ----------------------------------------------------------------------
    def first(self, slots: list[int], all_slots: bool) -> None:
        g = self.entry_group(slots, self.kv_first, True, self.wl.max_len)
        with self.at("first"):
            self.embed(len(slots))
            self.stack("first", self.n_first, len(slots), [g], all_slots)
        for x in slots:
            self.kv_first[x] += 1

    def last(self, slots: list[int], all_slots: bool) -> None:
        g = self.entry_group(slots, self.kv_last, True, self.wl.max_len)
        with self.at("last"):
            self.stack("last", self.n_last, len(slots), [g], all_slots)
            self.head("last", len(slots))
        for x in slots:
            self.kv_last[x] += 1

    def shared(self, slots: list[int], recs: list[int], all_slots: bool,
               rec_tensor: bool) -> None:
        """Engine._shared on `slots` (in call order), token x at step recs[k]."""
        share = self.cfg.kv == "share"
        groups = []
        order = list(dict.fromkeys(recs))  # distinct steps, in call order
        layout = "unsorted" if len(order) > 1 and order != sorted(order) else "sorted"
        for r in sorted(order):
            rows = [x for x, q in zip(slots, recs) if q == r]
            write = not (share and r > 1)
            lengths = [self.kv_step[x][r if write else 1] for x in range(self.s)]
            groups.append(self.entry_group(rows, lengths, write,
                                           self.step_capacity[r if write else 1]))
        self.stats["shared_calls"] += 1
        self.stats["shared_items"] += len(slots)
        with self.at("shared"):
            self.stack("shared", self.n_shared, len(slots), groups, all_slots,
                       rec_tensor=rec_tensor, layout=layout)
        for x, r in zip(slots, recs):
            if not (share and r > 1):
                self.kv_step[x][r] += 1

    # --- sequence-wise --------------------------------------------------------------------
    def sequence_wise(self) -> None:
        s = self.s
        self.admit(list(range(s)))
        rows = self.active()
        act = None
        while rows:
            self.c.iterations += 1
            full = len(rows) == s
            if full:
                act = rows
            else:
                if act is None:
                    self.op("seq.rows")
                    act = rows
                self.op("seq.step_args")
            self.step(rows, full)
            done = self.emit(rows, full)
            if done:
                self.admit(done)
                rows, act = self.active(), None

    def step(self, act: list[int], full: bool) -> None:
        n = len(act)
        self.stats["passes"] += n
        if not self.mor:
            g = self.entry_group(act, self.kv_first, True, self.wl.max_len)
            with self.at("stack"):
                self.embed(n)
                self.stack("stack", self.n_apps, n, [g], full, span=True)
                self.head("stack", n)
            for x in act:
                self.kv_first[x] += 1
            return
        nr = self.cfg.num_recursions
        self.first(act, full)
        self.op("step.init")
        tgt = {x: self.target(x) for x in act}
        cur = act
        if self.kind == "expert":
            for r in range(1, nr + 1):
                self.op("step.expert.decide_args")
                self.route_expert(len(cur))
                self.op("step.expert.select")
                cur = [x for x in cur if tgt[x] >= r]
                if not cur:
                    break
                self.op("step.shared_args")
                self.shared(cur, [r] * len(cur), full and len(cur) == n, False)
                self.op("step.expert.update", rows=len(cur))
                self.op("step.depth", rows=len(cur))
        else:
            self.route_token(n)
            self.op("step.token.clone")
            for r in range(1, nr + 1):
                self.op("step.token.filter")
                cur = [x for x in cur if tgt[x] >= r]
                if not cur:
                    break
                self.op("step.shared_args")
                self.shared(cur, [r] * len(cur), full and len(cur) == n, False)
                self.op("step.token.update", rows=len(cur))
                self.op("step.depth", rows=len(cur))
            self.op("step.token.combine")
        self.op("step.depth_sum")
        self.c.depth_sum += sum(tgt.values())
        self.last(act, full)

    # --- depth-wise -----------------------------------------------------------------------
    def depth_wise(self) -> None:
        token = self.kind == "token"
        s = self.s
        self.op("depth.init")
        if token:
            self.op("depth.init.token")
        todo = self.admit(list(range(s)))
        self.op("depth.todo")
        self.feed(todo)
        while any(o >= 0 for o in self.owner):
            self.c.iterations += 1
            while todo:
                take = self.decide(todo)
                self.op("depth.out")
                out = [x for x, t in zip(todo, take) if not t]
                if not out:
                    break
                todo = self.finish(out)
                self.feed(todo)
            rows = self.active()
            if not rows:
                break
            if len(rows) != s:
                self.op("depth.rows")
            self.op("depth.order")
            act = sorted(rows, key=lambda x: self.rec[x])  # stable argsort by step
            self.shared(act, [self.rec[x] for x in act], len(act) == s, True)
            self.op("depth.update.token" if token else "depth.update.expert", rows=len(act))
            self.op("depth.advance", rows=len(act))
            for x in act:
                self.depth[x] += 1
                self.rec[x] += 1
            todo = act

    def feed(self, slots: list[int]) -> None:
        if not slots:
            return
        slots, every = self.canon(slots)
        n = len(slots)
        self.op("depth.feed_args")
        self.first(slots, every)
        self.op("depth.feed_store", rows=n)
        if self.kind == "token":
            self.route_token(n)
            self.op("depth.feed_token", rows=n)
        for x in slots:
            self.rec[x], self.depth[x] = 1, 0

    def decide(self, slots: list[int]) -> list[bool]:
        n = len(slots)
        if self.kind == "token":
            self.op("depth.decide.token")
        else:
            self.op("depth.decide.expert_args")
            self.route_expert(n)
            self.op("depth.decide.expert_gate", rows=n)
        return [self.rec[x] <= self.target(x) for x in slots]

    def finish(self, slots: list[int]) -> list[int]:
        slots, every = self.canon(slots)
        n = len(slots)
        self.op("depth.finish.hidden.token" if self.kind == "token"
                else "depth.finish.hidden.expert")
        self.op("depth.finish.pos")
        self.last(slots, every)
        self.stats["passes"] += n
        self.c.depth_sum += sum(self.depth[x] for x in slots)
        self.op("depth.finish.after")
        done = self.emit(slots, every)
        if not done:
            return slots
        refilled = self.admit(done)
        gone = set(done)
        cont = [x for x in slots if x not in gone]
        if refilled:
            cont = sorted(cont + refilled)
        self.op("depth.finish.cont")
        return cont


def simulate(cfg: ModelConfig, workload: Workload, scheduler: str, batch: int, *,
             depth_bias: bool = False, attention: str = "bmm") -> Counts:
    """Replay `Engine.generate(requests, scheduler)` with `max_batch = batch` on `workload`
    and count what it issues (`Counts`). `depth_bias`: the model's RoutingKnob has a
    token-choice depth bias (one more add in routing). `attention`: the engine's attention
    path, "bmm" (CPU fp32: two batched matmuls and a softmax) or "sdpa" (other devices and
    dtypes)."""
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if scheduler == "depth" and cfg.family != "mor":
        raise ConfigError("depth-wise batching needs a MoR model")
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    sim = _Replay(cfg, workload, batch, depth_bias=depth_bias, attention=attention)
    sim.op("generate.init")
    if workload.temperature > 0:
        sim.op("generate.init.sampling")
    if scheduler == "sequence":
        sim.sequence_wise()
    else:
        sim.depth_wise()
    return sim.c


# =============================================================================================
# 2. Device profiles
# =============================================================================================
OP_CLASSES = ("view", "kernel", "sync", "token")


@dataclass
class DeviceProfile:
    """What a device costs per byte, per FLOP and per call.

    The required fields are the roofline: memory bandwidth, dense peak FLOP/s, the overhead
    of one kernel call, and where the figures come from. The optional ones refine the time
    model (`time_breakdown`); left at None they follow from the required ones."""

    name: str
    mem_bandwidth_bytes_per_s: float
    peak_flops_per_s: float
    per_call_overhead_s: float
    source: str
    overheads: dict[str, float] | None = None
    """Seconds per call by op class ("view", "kernel", "sync", "token"; see `op_class`);
    None: per_call_overhead_s for kernels, views and syncs."""
    op_costs: dict[str, float] | None = None
    """Seconds per call of individual aten ops (small tensors, measured one op at a time);
    ops not listed cost their class's overhead."""
    elem_s: float = 0.0
    """Cost per element a small kernel touches (activations of [rows, width])."""
    matmul_fixed_s: float | None = None
    """Fixed cost of one matmul call (default per_call_overhead_s)."""
    matmul_flops_per_s: float | None = None
    """Matmul throughput at decoding shapes (default peak_flops_per_s)."""
    attn_fixed_s: float | None = None
    """Fixed cost of one attention call -- every op of the engine's `_attend` (default
    per_call_overhead_s x its ops)."""
    attn_row_head_s: float = 0.0
    """Attention cost per (query row, head), independent of the keys."""
    attn_flops_per_s: float | None = None
    """Attention throughput at decoding shapes, one query per row (default the peak)."""
    copy_bandwidth_bytes_per_s: float | None = None
    """Bytes moved per second (read + write) by a gather copy (default the bandwidth)."""
    overlap: bool = True
    """True (GPUs): a call's data time is max(bytes / bandwidth, FLOPs / peak), and the
    host issues calls while the device computes (time = max(host, device)); False (CPUs,
    one thread does both): the terms add up."""
    attention: str = "sdpa"
    """The engine's attention path on this device: "sdpa" (GPUs, bf16) or "bmm" (CPU fp32:
    two batched matmuls and a softmax, `mor.decode.Engine._attend`)."""
    bytes_per_elem: int = 2
    """Element size the engine decodes in on this device (bf16: 2; fp32 CPU: 4)."""
    host_scale: float = 1.0
    """Factor on every host cost (the "calls/..." terms but "calls/elements"): the engine's
    own Python between its calls (function calls, attribute lookups, its dataclasses, list
    bookkeeping), which a stream of bare ops does not have. `calibrate_cpu` measures it in
    small decoding runs (`_measure_context`); 1.0 for the datasheet profiles."""
    control_scale: float = 1.0
    """Factor on the host cost of the control path (routing, sampling, scheduler
    bookkeeping: small ops between Python data structures, module calls of the routers).
    Measured with host_scale; 1.0 for the datasheet profiles."""
    data_scale: float = 1.0
    """Factor on every data term (matmuls, attention, gathers, "calls/elements"): what the
    rest of a decoding step does to each kernel's caches, which an isolated benchmark does
    not see. Measured with host_scale; 1.0 for the datasheet profiles."""
    threads: int | None = None
    """CPU threads the profile was measured with."""
    details: dict[str, Any] = field(default_factory=dict)
    """Raw calibration figures (CPU)."""

    def overhead(self, cls: str) -> float:
        if self.overheads is not None and cls in self.overheads:
            return self.overheads[cls]
        return self.per_call_overhead_s if cls in ("view", "kernel", "sync") else 0.0

    def op_cost(self, op: str) -> float:
        """Host cost of one call of aten op `op`: its own measured figure (`op_costs`), else
        its class's overhead."""
        if self.op_costs and op in self.op_costs:
            return self.op_costs[op]
        return self.overhead(op_class(op))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_NVIDIA_EAGER = ("per-call overhead: an ASSUMPTION, not a datasheet figure -- ~5 us per "
                 "kernel issued by eager PyTorch from Python (launch + dispatcher), ~2 us per "
                 "view, ~10 us per host sync; no CUDA graphs, no torch.compile")


def _gpu(name: str, bandwidth: float, peak: float, datasheet: str) -> DeviceProfile:
    return DeviceProfile(
        name=name, mem_bandwidth_bytes_per_s=bandwidth, peak_flops_per_s=peak,
        per_call_overhead_s=5e-6, source=f"{datasheet}; {_NVIDIA_EAGER}",
        overheads={"view": 2e-6, "kernel": 5e-6, "sync": 10e-6, "token": 0.5e-6},
        overlap=True, attention="sdpa", bytes_per_elem=2)


DEVICE_PROFILES: dict[str, DeviceProfile] = {
    "h100-sxm": _gpu("NVIDIA H100 SXM5 80GB", 3.35e12, 989e12,
                     "NVIDIA H100 Tensor Core GPU datasheet: H100 SXM 3.35 TB/s HBM3, "
                     "989 TFLOPS dense BF16 tensor core (1,979 with sparsity)"),
    "h200": _gpu("NVIDIA H200 SXM 141GB", 4.8e12, 989e12,
                 "NVIDIA H200 Tensor Core GPU datasheet: H200 SXM 4.8 TB/s HBM3e, "
                 "989 TFLOPS dense BF16 tensor core (1,979 with sparsity)"),
    "a100-80gb": _gpu("NVIDIA A100 80GB SXM", 2.039e12, 312e12,
                      "NVIDIA A100 Tensor Core GPU datasheet: A100 80GB SXM 2,039 GB/s "
                      "HBM2e, 312 TFLOPS dense BF16 tensor core (624 with sparsity)"),
}
"""Datasheet profiles (dense BF16 peaks, HBM bandwidth; eager per-call overhead assumed)."""


def device_profile(name: str) -> DeviceProfile:
    key = name.lower()
    if key not in DEVICE_PROFILES:
        raise ConfigError(f"unknown device profile {name!r}; known: "
                          f"{', '.join(DEVICE_PROFILES)}, or calibrate_cpu()")
    return DEVICE_PROFILES[key]


# --- CPU calibration -------------------------------------------------------------------------
_CLOCK = [time.process_time]
"""The calibration clock: CPU time of this process with one thread (time other processes
take from the cores does not count), wall-clock time with several (CPU time would add up
the threads, spin-waits included)."""


def _best_time(fn, inner: int, reps: int = 5) -> float:
    """Seconds per call of fn on the calibration clock (`_CLOCK`): the best of `reps`
    loops of `inner` calls."""
    clock = _CLOCK[0]
    for _ in range(max(2, inner // 10)):
        fn()
    best = math.inf
    for _ in range(reps):
        t0 = clock()
        for _ in range(inner):
            fn()
        best = min(best, (clock() - t0) / inner)
    return best


def _lstsq(rows: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares for a few unknowns, residuals relative to y (every timing
    counts alike, small calls included); a negative unknown is dropped and the rest refit."""
    import torch

    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    w = 1.0 / b
    keep = list(range(a.shape[1]))
    while True:
        sol = torch.linalg.lstsq(a[:, keep] * w[:, None], b * w).solution
        if (sol >= 0).all() or len(keep) == 1:
            out = [0.0] * a.shape[1]
            for k, v in zip(keep, sol.tolist()):
                out[k] = max(0.0, v)
            return out
        keep.pop(int(sol.argmin()))


_POOL_BYTES = 24 * 2**20
"""Every calibration benchmark cycles through this many bytes of inputs, more than a core's
L2, so each call finds its data where a decoding step does (the rest of the model has
evicted it) -- not hot in L1/L2 as in a loop over one tensor."""


def _pool(make, nbytes: int = _POOL_BYTES) -> list:
    first = make()
    size = sum(t.numel() * t.element_size() for t in (first if isinstance(first, tuple)
                                                      else (first,)))
    return [first] + [make() for _ in range(max(1, nbytes // max(1, size)) - 1)]


def _cpu_attention(q, keys, values, mask, scale: float):
    """mor.decode.Engine._attend's CPU fp32 path: q [m, H, hd] over keys/values
    [m, KVH, W, hd] as two batched matmuls and a softmax (the same ops, for calibration)."""
    import torch

    m, H, hd = q.shape
    KVH, w = keys.shape[1], keys.shape[2]
    qg = torch.mul(q, scale).reshape(m * KVH, H // KVH, hd)
    kt = keys.reshape(m * KVH, w, hd).transpose(1, 2)
    s = torch.bmm(qg, kt) if mask is None else torch.baddbmm(mask, qg, kt)
    return torch.bmm(torch.softmax(s, -1), values.reshape(m * KVH, w, hd)).view(m, H * hd)


def calibrate_cpu(*, threads: int | None = None, d_model: int = 128, d_ff: int = 352,
                  n_heads: int = 4, n_kv_heads: int = 2, quick: bool = False,
                  host_run: bool = True) -> DeviceProfile:
    """Measure this CPU for the time model (~10 s; `quick`, `host_run=False`: ~1 s, for
    tests). With one thread in CPU time of this process (time other processes take from the
    cores does not count -- contention for caches and memory bandwidth still does), with
    several in wall-clock time (run those on a quiet machine). Inputs cycle through pools
    larger than L2 (`_POOL_BYTES`), as a decoding step meets them.

    * memory bandwidth: summing a 64 MiB fp32 tensor (read);
    * per-call overhead by op class: streams of many different small ops (broadcast
      multiply on a strided view, add, row gather, row scatter into a 4-D cache, cat,
      comparison, max, sum, silu, ...; views) at 8 and 128 rows of d_model: the fixed cost
      per kernel and per view, and the cost per element; host syncs (.item()); the Python of
      emit's per-token loop;
    * matmuls at decoding shapes (F.linear, rows 1..128, the layer's d x 2 d_ff, d_ff x d
      and d x d weights): fixed cost and FLOP/s fitted with the weight bytes charged at the
      measured bandwidth;
    * attention as the engine computes it on CPU (`_cpu_attention`: one query per row, GQA,
      strided cache views, 8..200 keys): fixed cost, cost per (row, head), FLOP/s fitted;
    * gather copies (index_select of cache rows): bytes moved (read + write) per second;
    * `host_scale`, `data_scale`: the engine's calls in context, from two small decoding
      runs (`HOST_RUNS`, `_measure_context`).

    Run it with the thread count the decoding will use (`threads`, default torch's)."""
    import torch
    import torch.nn.functional as F

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    old_clock = _CLOCK[0]
    _CLOCK[0] = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    inner = 60 if quick else 200
    reps = 3 if quick else 5
    details: dict[str, Any] = {}
    hd = d_model // n_heads
    try:
        with torch.inference_mode():
            g = torch.Generator().manual_seed(0)

            def rnd(*shape):
                return torch.randn(*shape, generator=g)

            # --- bandwidth ------------------------------------------------------------------------
            big = rnd(16 * 2**20)
            bandwidth = big.numel() * 4 / _best_time(big.sum, 3 if quick else 6, reps)
            del big
            # --- per-call overheads ---------------------------------------------------------------
            # Streams of many DIFFERENT small ops, as a decoding step issues them: one op
            # looped alone runs with its code and data hot and costs ~2/3 of what it costs
            # among others. Kernels at two row counts give the fixed cost per call and the
            # cost per element; the views are timed inside the same stream.
            t_k, t_v = {}, {}
            for n in (8, 128):
                pool = _pool(lambda: (rnd(n, d_model), rnd(n, (n_heads + 2 * n_kv_heads) * hd),
                                      rnd(n, hd), torch.zeros(n, n_kv_heads, 16, hd)))
                kernels, views = _small_op_streams(n, d_model, n_heads, n_kv_heads, hd)
                st = [0]

                def run(fns, pool=pool, st=st) -> None:
                    st[0] = (st[0] + 1) % len(pool)
                    args = pool[st[0]]
                    for f in fns:
                        f(*args)

                t_k[n] = _best_time(lambda: run(kernels), inner // 4, reps) / len(kernels)
                t_all = _best_time(lambda: run(kernels + views), inner // 4, reps)
                t_v[n] = (t_all - len(kernels) * t_k[n]) / len(views)
            per_elem = max(0.0, (t_k[128] - t_k[8]) / ((128 - 8) * d_model))
            kern = max(0.0, t_k[8] - 8 * d_model * per_elem)
            one = torch.tensor([3])
            overheads = {"view": max(0.0, min(t_v.values())), "kernel": kern,
                         "sync": _best_time(lambda: one.item(), inner, reps),
                         "token": _emit_loop_time(inner, reps)}
            details.update({"stream_kernel_s": t_k, "stream_view_s": t_v})
            op_costs = {name: _best_time(fn, inner, reps)
                        for name, fn in _op_benches(d_model, n_heads, n_kv_heads).items()}
            op_costs["index_put_"] /= 2
            # --- matmuls --------------------------------------------------------------------------
            rows_a, y_a, wb = [], [], []
            for k, m in ((d_model, 2 * d_ff), (d_ff, d_model), (d_model, d_model)):
                ws = _pool(lambda: rnd(m, k))
                for r in ((1, 16, 64) if quick else (1, 4, 16, 32, 64, 128)):
                    xs = _pool(lambda: rnd(r, k), 4 * 2**20)
                    st = [0]

                    def mm() -> None:
                        st[0] += 1
                        F.linear(xs[st[0] % len(xs)], ws[st[0] % len(ws)])

                    y_a.append(_best_time(mm, inner // 2, reps))
                    rows_a.append([1.0, 2.0 * r * k * m])
                    wb.append(k * m * 4 / bandwidth)
            # Weight bytes charged at the bandwidth; fit the fixed cost and the FLOP/s.
            c0, inv_peak = _lstsq(rows_a, [max(t - b, 0.05 * t) for t, b in zip(y_a, wb)])
            # --- attention ------------------------------------------------------------------------
            rows_b, y_b = [], []
            scale = hd ** -0.5
            for r in ((1, 32) if quick else (1, 16, 64)):
                kv = _pool(lambda: (rnd(r, n_kv_heads, 208, hd), rnd(r, n_kv_heads, 208, hd)))
                qs = _pool(lambda: rnd(r, n_heads, hd), 2**20)
                for width in ((8, 200) if quick else (8, 64, 200)):
                    st = [0]

                    def att() -> None:
                        st[0] += 1
                        kk, vv = kv[st[0] % len(kv)]
                        _cpu_attention(qs[st[0] % len(qs)], kk[:, :, :width],
                                       vv[:, :, :width], None, scale)

                    rows_b.append([1.0, r * n_heads, 4.0 * r * width * n_heads * hd])
                    y_b.append(_best_time(att, max(10, inner // 8), reps))
            a0, a_rh, inv_attn = _lstsq(rows_b, y_b)
            # --- gather copy ----------------------------------------------------------------------
            caches = _pool(lambda: rnd(64, n_kv_heads, 208, hd))
            sel = torch.arange(0, 64, 2)
            st = [0]

            def gather() -> None:
                st[0] += 1
                caches[st[0] % len(caches)].index_select(0, sel)

            t = _best_time(gather, max(10, inner // 4), reps)
            copy_bw = 2 * sel.numel() * n_kv_heads * 208 * hd * 4 / max(t - kern, 1e-9)
    finally:
        torch.set_num_threads(old_threads)
        clock, _CLOCK[0] = _CLOCK[0], old_clock
    used = threads or old_threads
    peak = 1.0 / inv_peak if inv_peak > 0 else math.inf
    attn_peak = 1.0 / inv_attn if inv_attn > 0 else math.inf
    details.update({"matmul_points_s": y_a, "attention_points_s": y_b})
    profile = DeviceProfile(
        name=f"CPU ({_cpu_name()}, {used} thread{'s' if used != 1 else ''})",
        mem_bandwidth_bytes_per_s=bandwidth, peak_flops_per_s=peak,
        per_call_overhead_s=overheads["kernel"],
        source=("measured by evals.perf.throughput_model.calibrate_cpu (process CPU time): "
                "fp32 sum of 64 MiB (bandwidth), F.linear at decoding shapes (matmul fit), "
                "the engine's CPU attention with one query per row (attention fit), streams "
                "of small aten ops (per-call overheads), two small decoding runs (host_scale, "
                "data_scale)"),
        overheads=overheads, op_costs=op_costs, elem_s=per_elem, matmul_fixed_s=c0,
        matmul_flops_per_s=peak,
        attn_fixed_s=a0, attn_row_head_s=a_rh, attn_flops_per_s=attn_peak,
        copy_bandwidth_bytes_per_s=copy_bw, overlap=False, attention="bmm",
        bytes_per_elem=4, threads=used, details=details)
    if host_run:
        _CLOCK[0] = clock
        try:
            profile.host_scale, profile.control_scale, profile.data_scale = _measure_context(
                profile, threads, reps, d_model=d_model, d_ff=d_ff, n_heads=n_heads,
                n_kv_heads=n_kv_heads)
        finally:
            _CLOCK[0] = old_clock
    profile.details["clock"] = "cpu" if clock is time.process_time else "wall"
    return profile


HOST_RUNS: tuple[dict[str, Any], ...] = (
    {"family": "vanilla", "layers": 8, "batch": 4, "scheduler": "sequence",
     "lengths": [60 + (37 * k) % 171 for k in range(8)]},
    {"family": "vanilla", "layers": 8, "batch": 48, "scheduler": "sequence",
     "lengths": [60 + (37 * k) % 171 for k in range(96)]},
    {"family": "mor", "layers": 6, "batch": 8, "scheduler": "depth",
     "lengths": [20 + (13 * k) % 41 for k in range(16)]},
)
"""The decoding runs `calibrate_cpu` measures the engine in context on: randomly
initialised models of the profile's width -- an 8-layer vanilla model on sequences of
60..230 tokens (a working set of weights and KV cache well beyond L2, as decoding such
models has) at a batch where host overhead dominates and one where the data terms do, and a
6-layer MoR-2 model (1+2+1) decoded depth-wise at batch 8, where routing and scheduling
take a large share -- temperature 1."""


def _measure_context(profile: DeviceProfile, threads: int | None, reps: int, *,
                     d_model: int, d_ff: int, n_heads: int, n_kv_heads: int
                     ) -> tuple[float, float, float]:
    """(host_scale, control_scale, data_scale): what the engine's calls cost in context
    relative to the isolated micro-benchmarks. Decodes `HOST_RUNS` and solves
    measured_i = host_scale x layer host_i + control_scale x control host_i
    + data_scale x data_i (non-negative least squares, relative residuals). The host
    factors are the engine's own Python between its calls (function and module calls,
    attribute lookups, its dataclasses, list bookkeeping) and a step's many different ops
    competing for the core's caches and predictors; the data factor what the rest of a step
    does to each kernel's caches. Other depths, batches and sequence lengths than the models
    projected, so a projection that matches those tests the model rather than these three
    numbers."""
    import torch

    from mor.decode import Engine, Request
    from mor.registry import build_model

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    unit = dataclasses.replace(profile, host_scale=1.0, control_scale=1.0, data_scale=1.0)
    rows, times = [], []
    try:
        state = torch.random.get_rng_state()
        for run in HOST_RUNS:
            lengths, batch = run["lengths"], run["batch"]
            kw = {"num_recursions": 2} if run["family"] == "mor" else {}
            cfg = ModelConfig(vocab_size=257, d_model=d_model, n_layers=run["layers"],
                              n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff,
                              max_seq_len=max(lengths) + 1, family=run["family"], **kw)
            torch.manual_seed(0)
            model = build_model(cfg).eval()
            engine = Engine(model, max_batch=batch, max_len=max(lengths) + 1,
                            temperature=1.0)
            reqs = [Request(prompt=[cfg.vocab_size - 1], max_new_tokens=n, id=k, seed=k)
                    for k, n in enumerate(lengths)]
            engine.generate(reqs[: max(2, batch // 2)], run["scheduler"])
            best, outs = math.inf, None
            clock = _CLOCK[0]
            for _ in range(max(2, min(reps, 3))):
                t0 = clock()
                outs = engine.generate(reqs, run["scheduler"])
                best = min(best, clock() - t0)
            wl = Workload.from_completions(outs, max_len=max(lengths) + 1, temperature=1.0)
            counts = simulate(cfg, wl, run["scheduler"], batch, attention=profile.attention)
            layer_host = control_host = data = 0.0
            for stage, sc in counts.by_stage.items():
                h, dt = _host_data(_breakdown(cfg, sc, unit, 1.0))
                if stage in LAYER_STAGES:
                    layer_host += h
                else:
                    control_host += h
                data += dt
            rows.append([layer_host, control_host, data])
            times.append(best)
        torch.random.set_rng_state(state)
    finally:
        torch.set_num_threads(old)
    hs, cs, ds = _lstsq(rows, times)
    profile.details["context_runs"] = [
        {"measured_s": t, "modelled_layer_host_s": r[0], "modelled_control_host_s": r[1],
         "modelled_data_s": r[2], **{k: v for k, v in run.items() if k != "lengths"}}
        for t, r, run in zip(times, rows, HOST_RUNS)]
    # Guard against a degenerate solve: every factor in [0.5, 4].
    return tuple(min(4.0, max(0.5, v)) for v in (hs, cs, ds))


def _small_op_streams(n: int, d: int, heads: int, kv_heads: int, hd: int):
    """(kernels, views): small aten ops like those of a decoding step, each a function of
    (x [n, d], qkv [n, (heads + 2 kv_heads) hd], cos [n, hd], cache [n, kv_heads, 16, hd])."""
    import torch
    import torch.nn.functional as F

    rows = torch.arange(0, n, 2)
    col = torch.full((rows.numel(),), 3)
    lengths = torch.zeros(4, n, dtype=torch.long)
    qw = heads * hd
    w = torch.ones(d)

    def rope(x, qkv, cos, cache):
        q = qkv[:, :qw].view(n, heads, hd)  # 2 views, counted with the kernels
        return torch.addcmul(q * cos.unsqueeze(1), q.roll(hd // 2, -1), cos.unsqueeze(1))

    def put(x, qkv, cos, cache):
        cache[rows, :, col] = qkv[: rows.numel(), qw: qw + kv_heads * hd].view(
            -1, kv_heads, hd)

    def put_len(x, qkv, cos, cache):
        lengths[1, rows] = col

    kernels = [
        lambda x, qkv, cos, cache: x + x, lambda x, qkv, cos, cache: x * x,
        lambda x, qkv, cos, cache: F.rms_norm(x, (d,), w, 1e-5),
        lambda x, qkv, cos, cache: torch.cat((x, x), -1),
        lambda x, qkv, cos, cache: x[rows], rope, put, put_len,
        lambda x, qkv, cos, cache: x.sum(), lambda x, qkv, cos, cache: x.max(),
        lambda x, qkv, cos, cache: x < 0, lambda x, qkv, cos, cache: F.silu(x),
        lambda x, qkv, cos, cache: x.clamp(max=1.0),
        lambda x, qkv, cos, cache: x.to(torch.float32),
        lambda x, qkv, cos, cache: x.argmax(-1),
        lambda x, qkv, cos, cache: qkv[:, qw:].reshape(n, 2 * kv_heads, hd),
    ]
    views = [
        lambda x, qkv, cos, cache: x.view(n, -1, 2),
        lambda x, qkv, cos, cache: qkv[:, :qw], lambda x, qkv, cos, cache: x.unsqueeze(1),
        lambda x, qkv, cos, cache: x.select(0, 1), lambda x, qkv, cos, cache: x.chunk(2, -1),
        lambda x, qkv, cos, cache: cache[:, :, :8], lambda x, qkv, cos, cache: cos.squeeze(0),
    ]
    return kernels, views


def _op_benches(d: int, heads: int, kv_heads: int) -> dict[str, Any]:
    """One call of each small aten op the engine issues, on tensors of decoding sizes (8
    rows of d; [rows] index and length vectors), for `calibrate_cpu`'s per-op costs."""
    import torch
    import torch.nn.functional as F

    n, s, hd = 8, 16, d // heads
    x, y = torch.randn(n, d), torch.randn(n, d)
    q = torch.randn(n, heads, hd)
    cos = torch.randn(n, 1, hd)
    v = torch.randn(n)
    pv = v.abs() + 0.1
    u = torch.rand(n, 1)
    h = torch.randn(s, d)
    idx = torch.arange(0, 2 * n, 2)
    rec = torch.arange(n) % 3 + 1
    lengths = torch.zeros(6, s, dtype=torch.long)
    b = v > 0
    logits = torch.randn(n, 257)
    cdf = logits.softmax(-1).cumsum(-1)
    one = torch.tensor([3])
    four = [torch.randn(n, 1) for _ in range(4)]
    cat4 = torch.cat(four, -1)
    r0 = rec.unsqueeze(1) - 1
    emb = torch.randn(257, d)
    tok = torch.randint(0, 257, (n,))
    big, big2 = torch.zeros(s, 257), torch.ones(s, 257)
    ones, pos = torch.ones(s, dtype=torch.long), torch.zeros(s, dtype=torch.long)
    cache = torch.zeros(s, kv_heads, 32, hd)
    kv = torch.randn(n, kv_heads, hd)

    def put() -> None:  # half the engine's index_put_ are rows, half cache writes
        h[idx] = x
        cache[idx, :, rec] = kv

    return {
        "index": lambda: h[idx], "index_put_": put, "add": lambda: x + y,
        "mul": lambda: q * cos, "mul_": lambda: x.mul_(1.0), "add_": lambda: x.add_(0.0),
        "mean": lambda: torch.mean(x, -1, True), "rsqrt": lambda: pv.rsqrt(),
        "roll": lambda: q.roll(hd // 2, -1), "addcmul": lambda: torch.addcmul(q, q, cos),
        "silu": lambda: F.silu(x), "softmax": lambda: logits.softmax(-1),
        "cumsum": lambda: logits.cumsum(-1), "div": lambda: logits / 1.0,
        "searchsorted": lambda: torch.searchsorted(cdf, u),
        "max": lambda: logits.max(-1), "argmax": lambda: logits.argmax(-1),
        "to": lambda: x.to(torch.float32), "clamp": lambda: rec.clamp(max=3),
        "sub": lambda: rec - 1, "eq": lambda: rec == 2, "lt": lambda: rec < 2,
        "le": lambda: rec <= 2, "gt": lambda: v > 0, "ge": lambda: rec >= 2,
        "__or__": lambda: b | b, "__and__": lambda: b & b, "bitwise_not": lambda: ~b,
        "where": lambda: torch.where(b, v, v), "sum": lambda: b.sum(),
        "item": lambda: one.item(), "aminmax": lambda: torch.aminmax(rec),
        "stack": lambda: torch.stack([v, v]), "cat": lambda: torch.cat(four, -1),
        "gather": lambda: cat4.gather(1, r0),
        "sigmoid": lambda: v.sigmoid(), "tanh": lambda: v.tanh(), "gelu": lambda: F.gelu(x),
        "embedding": lambda: F.embedding(tok, emb), "copy_": lambda: big.copy_(big2),
        "fill_": lambda: lengths.fill_(1), "zero_": lambda: lengths.zero_(),
        "index_add_": lambda: pos.index_add_(0, idx, ones[:n]),
        "unique_consecutive": lambda: rec.unique_consecutive(return_counts=True),
        "nonzero": lambda: b.nonzero(), "argsort": lambda: rec.argsort(stable=True),
        "sort": lambda: rec.sort(), "clone": lambda: x.clone(),
        "zeros_like": lambda: torch.zeros_like(rec), "full_like": lambda: torch.full_like(
            rec, 2), "arange": lambda: torch.arange(n), "zeros": lambda: torch.zeros(s, d),
        "ones": lambda: torch.ones(s, dtype=torch.long), "rand": lambda: torch.rand(128),
        "reshape": lambda: q.reshape(n * kv_heads, heads // kv_heads, hd),
    }


def _emit_loop_time(inner: int, reps: int) -> float:
    """Python cost of one pass of `_Run.emit`'s per-token loop (list appends, lookups)."""

    class _C:
        def __init__(self) -> None:
            self.tokens: list[int] = []
            self.depths: list[int] = []

    comps = [_C() for _ in range(8)]
    owner = list(range(8))
    stops = [None] * 8
    count, left = [0] * 8, [10**9] * 8
    toks, slots, dl = list(range(32)), [k % 8 for k in range(32)], [1] * 32

    def loop() -> None:
        done = []
        for k, s in enumerate(slots):
            i = owner[s]
            c = comps[i]
            c.tokens.append(toks[k])
            if dl is not None:
                c.depths.append(dl[k])
            count[s] += 1
            left[s] -= 1
            stop = stops[i]
            if (stop is not None and stop(c.tokens)) or left[s] == 0:
                done.append(s)
        for c in comps:
            c.tokens.clear()
            c.depths.clear()

    return _best_time(loop, max(10, inner // 8), reps) / len(slots)


def _cpu_name() -> str:
    from evals.training.device import hardware_info

    return str(hardware_info().get("cpu") or "unknown")


# =============================================================================================
# 3. Projection
# =============================================================================================
LAYER_STAGES = frozenset({"first", "shared", "last", "stack"})
"""Stages that run decoder layers (their host cost scales with `host_scale`; the others --
routing, sampling, bookkeeping -- with `control_scale`)."""


def time_breakdown(cfg: ModelConfig, counts: Counts, profile: DeviceProfile
                   ) -> dict[str, float]:
    """Seconds per component for the whole workload (see docs/throughput_model.md):

    calls/<class>      host cost of the calls of each op class ("view", "kernel", "sync",
                       "token"): each op's measured cost (`DeviceProfile.op_cost`)
    calls/elements     the small kernels' cost per element they touch
    calls/matmul       fixed cost of each matmul
    calls/attention    fixed cost of each attention call, all its ops
    matmul_weights     weight bytes / bandwidth        (overlap: max with matmul_flops)
    matmul_flops       2 x rows x in x out / matmul FLOP/s
    attention          per (row, head) cost + attention FLOPs / attention FLOP/s (overlap
                       profiles: max of K/V bytes / bandwidth and FLOPs / peak)
    kv_gather          index_select copies of K/V / copy bandwidth
    other_bytes        KV writes and matmul activations / bandwidth (overlap profiles only;
                       on a CPU they are inside the calls' measured costs)

    Host terms (calls/..., but calls/elements) are multiplied by `profile.host_scale` in the
    layer stages and by `profile.control_scale` elsewhere; data terms by
    `profile.data_scale` (the in-context factors `calibrate_cpu` measures)."""
    if not counts.by_stage:
        return _breakdown(cfg, counts, profile, profile.host_scale)
    out: dict[str, float] = {}
    for stage, sc in counts.by_stage.items():
        k = profile.host_scale if stage in LAYER_STAGES else profile.control_scale
        for key, v in _breakdown(cfg, sc, profile, k).items():
            out[key] = out.get(key, 0.0) + v
    return out


def _breakdown(cfg: ModelConfig, counts: Counts, profile: DeviceProfile, k: float
               ) -> dict[str, float]:
    bw = profile.mem_bandwidth_bytes_per_s
    out: dict[str, float] = {}
    ops = Counter(counts.ops)
    n_att = 0
    for key, times in counts.pieces.items():
        if key.startswith("attend."):
            n_att += times
            for name in OPS[key]:
                ops[name] -= times
    n_mm = sum(ops.pop(name, 0) for name in MATMUL_OPS)
    for cls in OP_CLASSES:
        out[f"calls/{cls}"] = 0.0
    for op, n in ops.items():
        out[f"calls/{op_class(op)}"] += k * n * profile.op_cost(op)
    out["calls/elements"] = counts.elem_work * profile.elem_s
    fixed_mm = (profile.matmul_fixed_s if profile.matmul_fixed_s is not None
                else profile.per_call_overhead_s)
    fixed_at = (profile.attn_fixed_s if profile.attn_fixed_s is not None
                else profile.per_call_overhead_s * len(OPS[f"attend.{profile.attention}"]))
    out["calls/matmul"] = k * n_mm * fixed_mm
    out["calls/attention"] = k * n_att * fixed_at
    peak_mm = profile.matmul_flops_per_s or profile.peak_flops_per_s
    w_t = f_t = 0.0
    e = counts.bytes_per_elem
    for (rows, kk, n), calls in counts.linear_shapes.items():
        wt = kk * n * e / bw
        ft = 2 * rows * kk * n / peak_mm
        if profile.overlap:
            w_t += calls * wt if wt >= ft else 0.0
            f_t += calls * ft if ft > wt else 0.0
        else:
            w_t += calls * wt
            f_t += calls * ft
    out["matmul_weights"], out["matmul_flops"] = w_t, f_t
    peak_at = profile.attn_flops_per_s or profile.peak_flops_per_s
    att = 0.0
    for rows, width, kv, _ in counts.sdpa:
        fl = 4 * rows * width * cfg.n_heads * cfg.head_dim
        data = max(kv / bw, fl / peak_at) if profile.overlap else fl / peak_at
        att += rows * cfg.n_heads * profile.attn_row_head_s + data
    out["attention"] = att
    out["kv_gather"] = counts.kv_gather_bytes / (profile.copy_bandwidth_bytes_per_s or bw)
    out["other_bytes"] = ((counts.kv_write_bytes + counts.act_bytes) / bw
                          if profile.overlap else 0.0)
    for key in list(out):
        if key == "calls/elements" or not key.startswith("calls/"):
            out[key] *= profile.data_scale
    return out


def _host_data(parts: dict[str, float]) -> tuple[float, float]:
    """(host, data) seconds of a breakdown: the per-call overheads, the data terms (the
    small kernels' per-element cost counts as data)."""
    host = sum(v for k, v in parts.items() if k.startswith("calls/") and k != "calls/elements")
    return host, sum(parts.values()) - host


def project(cfg: ModelConfig, workload: Workload, scheduler: str, batch: int,
            profile: DeviceProfile, *, mean_depth: float | None = None,
            fractions: Sequence[float] | None = None, seed: int = 0,
            depth_bias: bool = False, attention: str | None = None) -> dict[str, Any]:
    """Modelled decoding of `workload` with `scheduler` at `batch` slots on `profile`.

    A MoR workload without depths takes them from `mean_depth` / `fractions` (per-step
    selected fractions) / the capacities, drawn per token with `seed`. The element size is
    the workload's, else the profile's (bf16 on GPUs, fp32 on the CPU); the attention path
    the profile's unless given. Returns tokens/s, time, iterations, per-iteration bytes /
    FLOPs / calls, the time breakdown (seconds and shares) and roofline ceilings;
    `roofline_card` turns it into a display table."""
    elem = workload.bytes_per_elem or profile.bytes_per_elem
    if cfg.family == "mor" and workload.depths is None:
        workload = Workload.from_lengths(
            workload.lengths, cfg, mean_depth=mean_depth, fractions=fractions, seed=seed,
            max_len=workload.max_len, temperature=workload.temperature,
            kv_capacity=workload.kv_capacity)
    workload = dataclasses.replace(workload, bytes_per_elem=elem)
    c = simulate(cfg, workload, scheduler, batch, depth_bias=depth_bias,
                 attention=attention or profile.attention)
    parts = time_breakdown(cfg, c, profile)
    host, device = _host_data(parts)
    total = max(host, device) if profile.overlap else host + device
    it = max(1, c.iterations)
    kv_bytes = c.kv_read_bytes + c.kv_write_bytes
    moved = c.weight_total + kv_bytes
    bw, peak = profile.mem_bandwidth_bytes_per_s, profile.peak_flops_per_s
    return {
        "device": profile.name, "scheduler": scheduler, "batch_size": min(batch,
                                                                         len(workload.lengths)),
        "family": cfg.family, "layers": cfg.layer_plan,
        "tokens": c.tokens, "iterations": c.iterations,
        "time_s": total, "tokens_per_s": c.tokens / total if total else math.inf,
        "ms_per_iteration": 1000 * total / it,
        "tokens_per_iteration": c.tokens / it,
        "mean_depth": c.depth_sum / c.tokens if cfg.family == "mor" else None,
        "per_iteration": {
            "weight_bytes": c.weight_total / it,
            "weight_bytes_by_stage": {k: v / it for k, v in c.weight_bytes.items()},
            "kv_read_bytes": c.kv_read_bytes / it,
            "kv_read_ideal_bytes": c.kv_read_ideal_bytes / it,
            "kv_write_bytes": c.kv_write_bytes / it,
            "kv_gather_bytes": c.kv_gather_bytes / it,
            "flops": c.flops / it,
            "calls": c.calls / it,
            "stage_calls": {k: v / it for k, v in c.stage_calls.items()},
            "stage_rows": {k: v / max(1, c.stage_calls[k]) for k, v in c.stage_rows.items()},
        },
        "per_token": {"weight_bytes": c.weight_total / c.tokens,
                      "kv_bytes": kv_bytes / c.tokens, "flops": c.flops / c.tokens,
                      "calls": c.calls / c.tokens},
        "totals": {"weight_bytes": c.weight_total, "kv_read_bytes": c.kv_read_bytes,
                   "kv_read_ideal_bytes": c.kv_read_ideal_bytes,
                   "kv_write_bytes": c.kv_write_bytes, "kv_gather_bytes": c.kv_gather_bytes,
                   "flops": c.flops, "calls": c.calls},
        "breakdown_s": parts,
        "breakdown_share": {k: v / (host + device) for k, v in parts.items()}
        if host + device else {},
        "host_s": host, "device_s": device,
        "ceilings_tokens_per_s": {
            "memory_bandwidth": c.tokens * bw / moved if moved else math.inf,
            "compute": c.tokens * peak / c.flops if c.flops else math.inf,
            "call_overhead": c.tokens / host if host else math.inf,
        },
        "profile": {"name": profile.name, "mem_bandwidth_bytes_per_s": bw,
                    "peak_flops_per_s": peak, "source": profile.source},
        "counts": c,
    }


def roofline_card(projection: dict[str, Any], measured_tokens_per_s: float | None = None
                  ) -> dict[str, Any]:
    """A display dict of one projection: bytes per decode iteration (weights, KV), FLOPs and
    calls per iteration, the bandwidth / compute / call-overhead ceilings, the modelled
    tokens/s and, given a measured tokens/s, the achieved MBU (bytes the decode had to move
    per second / bandwidth) and MFU (FLOP/s / peak) and the model's error."""
    p = projection
    per_it, per_tok = p["per_iteration"], p["per_token"]
    card = {
        "device": p["device"], "scheduler": p["scheduler"], "batch_size": p["batch_size"],
        "iterations": p["iterations"], "tokens_per_iteration": p["tokens_per_iteration"],
        "weight_bytes_per_iteration": per_it["weight_bytes"],
        "kv_read_bytes_per_iteration": per_it["kv_read_bytes"],
        "kv_write_bytes_per_iteration": per_it["kv_write_bytes"],
        "flops_per_iteration": per_it["flops"],
        "calls_per_iteration": per_it["calls"],
        "bytes_per_token": per_tok["weight_bytes"] + per_tok["kv_bytes"],
        "flops_per_token": per_tok["flops"],
        "ceiling_memory_tokens_per_s": p["ceilings_tokens_per_s"]["memory_bandwidth"],
        "ceiling_compute_tokens_per_s": p["ceilings_tokens_per_s"]["compute"],
        "ceiling_calls_tokens_per_s": p["ceilings_tokens_per_s"]["call_overhead"],
        "modelled_tokens_per_s": p["tokens_per_s"],
        "modelled_ms_per_iteration": p["ms_per_iteration"],
        "bound": max(p["breakdown_share"], key=p["breakdown_share"].get)
        if p["breakdown_share"] else None,
    }
    if measured_tokens_per_s is not None:
        bw = p["profile"]["mem_bandwidth_bytes_per_s"]
        peak = p["profile"]["peak_flops_per_s"]
        card["measured_tokens_per_s"] = measured_tokens_per_s
        card["mbu"] = card["bytes_per_token"] * measured_tokens_per_s / bw
        card["mfu"] = card["flops_per_token"] * measured_tokens_per_s / peak
        card["model_error"] = p["tokens_per_s"] / measured_tokens_per_s - 1.0
    return card


def format_card(card: dict[str, Any]) -> str:
    """The card as aligned text lines."""
    def num(v: Any) -> str:
        if isinstance(v, float):
            if v != v or math.isinf(v):
                return str(v)
            if abs(v) >= 1e6:
                return f"{v:.3e}"
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    width = max(len(k) for k in card)
    return "\n".join(f"{k:<{width}}  {num(v)}" for k, v in card.items())


# =============================================================================================
# Keeping the call table honest
# =============================================================================================
def engine_ops(engine: Any, requests: Sequence[Any], scheduler: str,
               shapes: bool = False) -> tuple[Counter, list[Any], dict[str, Counter]]:
    """Run `engine.generate(requests, scheduler)` under a TorchDispatchMode and count the
    aten ops it issues (as `OPS` names them). Returns (op counts, completions, shapes):
    with `shapes`, the (rows, in, out) of every weight matmul ("linear") and the (rows,
    width) of every attention call ("attention"), to compare with `Counts.linear_shapes`
    and `Counts.sdpa`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    kvh = engine.cfg.n_kv_heads
    found: dict[str, Counter] = {"linear": Counter(), "attention": Counter()}

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter = Counter()
            self.after_softmax = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket).split(".")[-1]
            self.ops[name] += 1
            if shapes:
                if name == "linear":
                    x, w = args[0], args[1]
                    found["linear"][(x.shape[0], w.shape[1], w.shape[0])] += 1
                elif name == "addmm":
                    a, b = args[1], args[2]
                    found["linear"][(a.shape[0], a.shape[1], b.shape[1])] += 1
                elif name == "bmm" and self.after_softmax:  # probabilities x values
                    v = args[1]
                    found["attention"][(v.shape[0] // kvh, v.shape[1])] += 1
                elif name == "scaled_dot_product_attention":
                    k = args[1]
                    found["attention"][(k.shape[0], k.shape[2])] += 1
                # The probabilities x values bmm follows the softmax and a reshape.
                if name == "softmax":
                    self.after_softmax = True
                elif name != "reshape":
                    self.after_softmax = False
            return func(*args, **(kwargs or {}))

    with _Count() as mode:
        outs = engine.generate(list(requests), scheduler)
    return mode.ops, outs, found


def ops_diff(engine: Counter, modelled: Counter) -> str:
    """The ops whose counts differ, with the `OPS` pieces that issue each (empty string when
    they agree): what to update when the engine changes."""
    lines = []
    for op in sorted(set(engine) | set(modelled)):
        a, b = engine.get(op, 0), modelled.get(op, 0)
        if a != b:
            pieces = [k for k, seq in OPS.items() if op in seq]
            lines.append(f"  {op:30s} engine {a:7d}  model {b:7d}  ({b - a:+d})  pieces: "
                         f"{', '.join(pieces) or '(none: a new op)'}")
    if not lines:
        return ""
    return ("aten ops the engine issued vs evals.perf.throughput_model (OPS table and "
            "_Replay):\n" + "\n".join(lines) + "\nPaste the engine's new sequences into OPS "
            "(trace one decode with a TorchDispatchMode); if its control flow changed, "
            "mirror it in _Replay.")
