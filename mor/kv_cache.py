"""Static (preallocated) KV caches for incremental decoding, one class for all families.

A cache holds one *entry* per layer application that stores keys/values, each a pair of
tensors [max_batch, n_kv_heads, capacity, head_dim] preallocated for `max_batch` sequence
slots, plus the number of tokens each slot has stored (`lengths` [entries, max_batch]).
Keys are stored after RoPE, so an entry needs no positions: attention at a slot covers its
first `lengths` tokens, which are in causal order.

    vanilla     one entry per layer, capacity max_len
    recursive   one entry per recursion of every shared layer (each visit its own slot)
    MoR cache   recursion-wise caching (docs/method.md §4): entry (layer j, recursion r)
                stores only the tokens routed to step r; with kv_capacity="routed" its
                capacity is k_r = max(1, floor(c_r * max_len)) tokens, so the bytes equal
                `mor.flops.kv_cache_bytes` -- the paper's (N_r + 1) / (2 N_r) of vanilla for
                the recursion block. With "full" every entry can hold max_len tokens.
    MoR share   recursive KV sharing: only recursion 1 stores keys/values; deeper
                recursions READ the first recursion's entry (`read_entry`), 1 / N_r.

The first and last (unique) layers of MoR and every vanilla layer hold every token.
The cache is storage and accounting; `mor.decode.Engine` appends to and attends over it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mor import flops
from mor.config import ModelConfig
from mor.errors import ConfigError

KV_CAPACITY = ("routed", "full")


class CacheFullError(ConfigError):
    """A slot's entry has no room left (a prompt longer than the cache, or a prefill that
    routes more tokens to a recursion step than its routed capacity holds)."""


def applications(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(unique layer, recursion) of every layer application in the unrolled stack, in order."""
    visits: dict[int, int] = {}
    out = []
    for i in cfg.schedule():
        visits[i] = visits.get(i, 0) + 1
        out.append((i, visits[i]))
    return out


class KVCache:
    """Preallocated keys/values for `max_batch` slots of up to `max_len` tokens each."""

    def __init__(self, cfg: ModelConfig, max_batch: int, max_len: int, *,
                 kv_capacity: str = "routed", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        if kv_capacity not in KV_CAPACITY:
            raise ConfigError(f"kv_capacity must be one of {KV_CAPACITY}, got {kv_capacity!r}")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ConfigError(f"max_len must be in 1..max_seq_len={cfg.max_seq_len}, got "
                              f"{max_len}; raise max_seq_len in the model config")
        self.cfg, self.max_batch, self.max_len = cfg, max_batch, max_len
        self.kv_capacity = kv_capacity
        caps_by_step = flops.step_tokens(cfg, max_len) if cfg.family == "mor" else None
        shared = set()
        if cfg.family == "mor":
            f, b = cfg.num_unique_first, cfg.num_shared
            shared = set(range(f, f + b))
        self.entry_of: dict[tuple[int, int], int] = {}
        """(layer, recursion) -> the entry that application WRITES (absent: writes none)."""
        self.read_of: dict[tuple[int, int], int] = {}
        """(layer, recursion) -> the entry that application attends over."""
        self.capacity: list[int] = []
        self.keys: list[tuple[int, int]] = []
        apps = (applications(cfg) if cfg.family != "mor" else
                [(i, 1) for i in range(cfg.num_unique_first)]
                + [(j, r) for r in range(1, cfg.num_recursions + 1) for j in sorted(shared)]
                + [(i, 1) for i in range(cfg.num_unique_first + cfg.num_shared,
                                         cfg.num_unique_layers)])
        for layer, r in apps:
            if layer in shared and cfg.kv == "share" and r > 1:
                self.read_of[(layer, r)] = self.entry_of[(layer, 1)]
                continue
            cap = max_len
            if layer in shared and kv_capacity == "routed":
                cap = caps_by_step[r - 1]
            self.entry_of[(layer, r)] = self.read_of[(layer, r)] = len(self.capacity)
            self.capacity.append(cap)
            self.keys.append((layer, r))
        shape = (max_batch, cfg.n_kv_heads)
        self.k = [torch.zeros(*shape, c, cfg.head_dim, dtype=dtype, device=device)
                  for c in self.capacity]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.lengths = torch.zeros(len(self.capacity), max_batch, dtype=torch.long,
                                   device=device)
        self.capacity_t = torch.tensor(self.capacity, dtype=torch.long, device=device)
        """`capacity` as a tensor, for vectorised room checks."""

    # --- accounting --------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of all preallocated key and value tensors (what the cache costs)."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    # --- slots -------------------------------------------------------------------------------
    def reset(self, slots: Tensor | list[int] | int | None = None) -> None:
        """Forget what slots hold (all slots when None); the memory stays allocated."""
        if slots is None:
            self.lengths.zero_()
        else:
            self.lengths[:, slots] = 0

    def check_fits(self, entry: int, tokens: int) -> None:
        """Prefill: refuse to store `tokens` tokens per slot in `entry` beyond its capacity."""
        if tokens > self.capacity[entry]:
            layer, r = self.keys[entry]
            raise CacheFullError(
                f"prefill stores {tokens} tokens in KV entry (layer {layer}, recursion {r}) "
                f"whose capacity is {self.capacity[entry]}; the prompt routes more tokens to "
                "this step than its capacity -- use kv_capacity='full' or a shorter prompt")
