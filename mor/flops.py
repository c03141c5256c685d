"""Analytic parameter and FLOPs accounting, from the config alone (no instantiation).

Two FLOPs conventions, both *forward-only, per token*, for a sequence of length T:

"paper" -- the convention of Bae et al. 2025 (arXiv 2507.10524; MOR_SPEC section 5),
  used for isoFLOP budgets and for comparing with the paper's tables:
  * each linear layer costs 2 x its parameters, with grouped-query attention IGNORED
    (K and V projections counted as full d x d);
  * attention costs 2 * d * T per layer (the causal half of QK^T and AV);
  * embedding, LM head, norms, routers and element-wise ops are not counted;
  * MoR step r: its linear part scales with the capacity c_r, its attention with c_r^2
    (only the selected tokens write and read KV: recursion-wise caching).

"exact" -- what the code really computes in matrix multiplies, as
  `torch.utils.flop_counter` counts it with the math SDPA backend: real GQA shapes, the
  full T x T score and value products (a dense causal kernel computes the masked half
  too), the LM head, and the MoR routers; MoR step r runs on k_r = max(1, floor(c_r T))
  tokens exactly as the model does. Training costs ~3x forward (backward = 2x forward).
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


def router_params(cfg: ModelConfig) -> int:
    return cfg.num_recursions * cfg.d_model if cfg.family == "mor" else 0


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


def _step_tokens(cfg: ModelConfig, seq_len: int) -> list[int]:
    """Tokens per sequence entering each recursion step (MoR's k_r; T otherwise)."""
    return [max(1, math.floor(c * seq_len)) for c in cfg.step_capacities]


def flops_per_token(cfg: ModelConfig, seq_len: int, convention: str = "paper") -> float:
    """Forward FLOPs per token for sequences of `seq_len` tokens (see module docstring)."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"unknown FLOPs convention {convention!r}; choose one of "
                          f"{', '.join(CONVENTIONS)}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    if convention == "paper":
        return _paper_flops(cfg, seq_len)
    return _exact_flops(cfg, seq_len) / seq_len


def _paper_flops(cfg: ModelConfig, seq_len: int) -> float:
    d = cfg.d_model
    linear = 2 * (4 * d * d + 3 * d * cfg.d_ff)  # GQA ignored: K, V counted as d x d
    attention = 2 * d * seq_len
    edge_layers = cfg.num_unique_first + cfg.num_unique_last
    total = edge_layers * (linear + attention)
    if cfg.family == "mor":
        # Capacities c_r: the linear part scales with c_r, attention with c_r^2.
        for c in cfg.step_capacities:
            total += cfg.num_shared * (linear * c + attention * c * c)
    else:
        total += cfg.num_shared * cfg.num_recursions * (linear + attention)
    return float(total)


def _layer_exact(cfg: ModelConfig, n: int) -> int:
    """FLOPs of one decoder layer on a (sub-)sequence of n tokens."""
    d, hd, h, kv = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    proj = 2 * n * d * (h * hd + 2 * kv * hd) + 2 * n * h * hd * d
    mlp = 2 * n * 3 * d * cfg.d_ff
    attention = 4 * n * n * h * hd  # QK^T and AV, full matrices
    return proj + mlp + attention


def _exact_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of one whole sequence of seq_len tokens."""
    t = seq_len
    edge_layers = cfg.num_unique_first + cfg.num_unique_last
    total = edge_layers * _layer_exact(cfg, t)
    total += 2 * t * cfg.d_model * cfg.vocab_size  # LM head
    if cfg.family == "mor":
        candidates = t
        for k in _step_tokens(cfg, t):
            total += 2 * candidates * cfg.d_model  # router Linear(d, 1) on candidates
            total += cfg.num_shared * _layer_exact(cfg, k)
            candidates = k
    else:
        total += cfg.num_shared * cfg.num_recursions * _layer_exact(cfg, t)
    return total

