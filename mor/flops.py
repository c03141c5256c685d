"""Analytic parameter and FLOPs accounting, from the config alone (no instantiation).

Two FLOPs conventions, both *forward-only, per token*, for a sequence of length T:

"paper" -- the convention of Bae et al. 2025 (arXiv 2507.10524; docs/protocol.md §5),
  used for isoFLOP budgets and for comparing with the paper's tables:
  * each linear layer costs 2 x its parameters, with grouped-query attention IGNORED
    (K and V projections counted as full d x d);
  * attention costs 2 * d * T per layer (the causal half of QK^T and AV);
  * embedding, LM head, norms, routers and element-wise ops are not counted;
  * MoR step r: its linear part scales with the capacity c_r, its attention with c_r^2
    (only the selected tokens write and read KV: recursion-wise caching). Under recursive
    KV sharing steps r > 1 skip the K and V projections and their attention scales with
    c_r (the selected queries read the whole first-recursion KV). Token-choice is counted
    under perfect balance, which gives the same per-step fractions as the capacities.

"exact" -- what the code really computes in matrix multiplies, as
  `torch.utils.flop_counter` counts it with the math SDPA backend: real GQA shapes, the
  full T x T score and value products (a dense causal kernel computes the masked half
  too), the LM head, and the MoR routers; MoR step r runs on k_r = max(1, floor(c_r T))
  tokens exactly as the model does (token-choice: under perfect balance unless the
  per-step token counts actually used are passed). Training costs ~3x forward.

"effective" (`effective_flops_per_token`) -- the paper convention with the capacities
  replaced by the routing a run actually took (its measured per-step selected fractions).
"""

from __future__ import annotations

import math

from mor.config import ModelConfig
from mor.errors import ConfigError

CONVENTIONS = ("paper", "exact")


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one decoder layer (attention, SwiGLU, two RMSNorm weights)."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # q, o + k, v
    mlp = 3 * d * cfg.d_ff
    return attn + mlp + 2 * d


def _router_module_params(cfg: ModelConfig, out: int) -> int:
    d = cfg.d_model
    return d * out if cfg.router_arch == "linear" else d * d + d * out


def router_params(cfg: ModelConfig) -> int:
    """Routers (and expert-choice aux predictors) of a MoR model; 0 otherwise."""
    if cfg.family != "mor":
        return 0
    if cfg.router == "token":
        return _router_module_params(cfg, cfg.num_recursions)
    per_step = _router_module_params(cfg, 1) * (2 if cfg.expert_aux == "router" else 1)
    return cfg.num_recursions * per_step


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """{"unique", "non_embedding", "total"}.

    unique: distinct trainable parameters (what `sum(p.numel() for p in model.parameters())`
      gives; a shared layer counts once; the tied head is the embedding).
    non_embedding: unique minus the embedding matrix -- the paper's "Param" / "N-Emb"
      column.
    total: parameters as if every application of a shared layer had its own weights (the
      unrolled stack); equal to unique for vanilla models.
    """
    emb = cfg.vocab_size * cfg.d_model
    per_layer = layer_params(cfg)
    rest = cfg.d_model + router_params(cfg)  # final norm + routers
    unique = emb + cfg.num_unique_layers * per_layer + rest
    return {
        "unique": unique,
        "non_embedding": unique - emb,
        "total": emb + cfg.unrolled_depth * per_layer + rest,
    }


def step_tokens(cfg: ModelConfig, seq_len: int) -> list[int]:
    """Tokens per sequence taking each recursion step: k_r = max(1, floor(c_r T)) for MoR
    (token-choice under perfect balance), T otherwise."""
    return [max(1, math.floor(c * seq_len)) for c in cfg.step_capacities]


def flops_per_token(cfg: ModelConfig, seq_len: int, convention: str = "paper",
                    tokens_per_step: list[int] | None = None) -> float:
    """Forward FLOPs per token for sequences of `seq_len` tokens (see module docstring).

    `tokens_per_step` (exact convention, MoR): the tokens per sequence that each recursion
    step really ran on, instead of those the capacities imply."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"unknown FLOPs convention {convention!r}; choose one of "
                          f"{', '.join(CONVENTIONS)}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    if convention == "paper":
        fr = cfg.step_capacities
        return _paper_flops(cfg, seq_len, fr, [c * c for c in fr])
    return _exact_flops(cfg, seq_len, tokens_per_step) / seq_len


def effective_flops_per_token(cfg: ModelConfig, seq_len: int,
                              routing: dict[str, float]) -> float:
    """Paper-convention FLOPs per token with the routing a run took: `routing` holds the
    measured mean `selected_frac/r{r}` and `selected_frac_sq/r{r}` (mean over sequences of
    the squared per-sequence fraction) of every step, as MoR models report in `out.stats`."""
    if cfg.family != "mor":
        return flops_per_token(cfg, seq_len, "paper")
    nr = cfg.num_recursions
    try:
        fr = [float(routing[f"selected_frac/r{r}"]) for r in range(1, nr + 1)]
        sq = [float(routing[f"selected_frac_sq/r{r}"]) for r in range(1, nr + 1)]
    except KeyError as e:
        raise ConfigError(f"routing statistics lack {e.args[0]!r}; pass the stats a MoR "
                          "model reports") from None
    return _paper_flops(cfg, seq_len, fr, sq)


def _paper_flops(cfg: ModelConfig, seq_len: int, fracs, fracs_sq) -> float:
    d = cfg.d_model
    qkvo, mlp = 4 * d * d, 3 * d * cfg.d_ff  # GQA ignored: K, V counted as d x d
    linear = 2 * (qkvo + mlp)
    attention = 2 * d * seq_len
    edge_layers = cfg.num_unique_first + cfg.num_unique_last
    total = edge_layers * (linear + attention)
    if cfg.family == "mor":
        for r, (c, c2) in enumerate(zip(fracs, fracs_sq), 1):
            if cfg.kv == "share" and r > 1:
                # No K/V projections; queries read the whole first-recursion KV.
                step = 2 * (2 * d * d + mlp) * c + attention * c
            else:
                step = linear * c + attention * c2
            total += cfg.num_shared * step
    else:
        total += cfg.num_shared * cfg.num_recursions * (linear + attention)
    return float(total)


def _layer_exact(cfg: ModelConfig, n: int, keys: int | None = None) -> int:
    """FLOPs of one decoder layer on n query tokens; `keys` set = KV sharing (no K/V
    projections, attention over `keys` shared positions)."""
    d, hd, h, kv = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    qo = 2 * n * d * h * hd * 2
    kv_proj = 0 if keys is not None else 2 * n * d * 2 * kv * hd
    mlp = 2 * n * 3 * d * cfg.d_ff
    attention = 4 * n * (n if keys is None else keys) * h * hd  # QK^T and AV, full matrices
    return qo + kv_proj + mlp + attention


def _exact_flops(cfg: ModelConfig, seq_len: int,
                 tokens_per_step: list[int] | None = None) -> int:
    """Forward FLOPs of one whole sequence of seq_len tokens."""
    t = seq_len
    edge_layers = cfg.num_unique_first + cfg.num_unique_last
    total = edge_layers * _layer_exact(cfg, t)
    total += 2 * t * cfg.d_model * cfg.vocab_size  # LM head
    if cfg.family != "mor":
        return total + cfg.num_shared * cfg.num_recursions * _layer_exact(cfg, t)
    ks = tokens_per_step if tokens_per_step is not None else step_tokens(cfg, t)
    if cfg.router == "token":
        total += 2 * t * _router_module_params(cfg, cfg.num_recursions)
    candidates = t
    for r, k in enumerate(ks, 1):
        if cfg.router == "expert":
            # Router (and aux predictor) on the step's candidates.
            per = _router_module_params(cfg, 1) * (2 if cfg.expert_aux == "router" else 1)
            total += 2 * candidates * per
        shared_keys = t if (cfg.kv == "share" and r > 1) else None
        total += cfg.num_shared * _layer_exact(cfg, k, shared_keys)
        candidates = k
    return total


# --- KV-cache size (docs/method.md §4) ----------------------------------------------------
def kv_cache_tokens(cfg: ModelConfig, seq_len: int,
                    tokens_per_step: list[int] | None = None) -> int:
    """(layer application, token) pairs whose keys/values a cache holds for one sequence.

    Vanilla: every layer, every token. Recursive: every recursion owns its slot. MoR with
    recursion-wise caching: step r stores only its k_r tokens; with KV sharing only the
    first recursion stores anything."""
    t = seq_len
    edge = (cfg.num_unique_first + cfg.num_unique_last) * t
    if cfg.family != "mor":
        return edge + cfg.num_shared * cfg.num_recursions * t
    if cfg.kv == "share":
        return edge + cfg.num_shared * t
    ks = tokens_per_step if tokens_per_step is not None else step_tokens(cfg, t)
    return edge + cfg.num_shared * sum(ks)


def kv_cache_bytes(cfg: ModelConfig, seq_len: int, batch_size: int = 1,
                   bytes_per_elem: int = 2,
                   tokens_per_step: list[int] | None = None) -> int:
    """Bytes of K and V for `batch_size` sequences (bf16 by default)."""
    per_token = 2 * cfg.n_kv_heads * cfg.head_dim * bytes_per_elem
    return batch_size * per_token * kv_cache_tokens(cfg, seq_len, tokens_per_step)


def kv_memory_ratio(cfg: ModelConfig) -> float:
    """KV memory of the recursion blocks relative to a vanilla model of the same depth
    (docs/method.md §4 table): (N_r + 1) / (2 N_r) for recursion-wise caching with the
    default capacities, 1 / N_r for recursive sharing; 1 for non-MoR models."""
    if cfg.family != "mor":
        return 1.0
    if cfg.kv == "share":
        return 1.0 / cfg.num_recursions
    return sum(cfg.step_capacities) / cfg.num_recursions
