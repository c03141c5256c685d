"""The Llama-style building blocks every model family shares.

RMSNorm, rotary position embeddings in Hugging Face Llama's rotate-half layout, grouped-
query attention on `F.scaled_dot_product_attention`, and a SwiGLU MLP. Parameter names and
shapes map 1:1 onto `transformers`' `LlamaForCausalLM` (see `baselines/vanilla.py`,
`to_hf_state_dict`), so weights convert without reordering heads.

Every block takes the RoPE tables (cos, sin) of explicit positions, so MoR can run a
sub-sequence of selected tokens at their ORIGINAL RoPE positions, and an optional boolean
`attn_mask` (True = may attend) for routing modes whose selections differ between rows of a
batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mor.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (as HF Llama does) so bf16 autocast does not lose precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE, indexed by absolute position."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: [f0..f_{h/2}, f0..f_{h/2}]
        # Not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [T] or [B, T] -> cos, sin of shape [..., T, head_dim]."""
        return self.cos[positions], self.sin[positions]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D]; cos/sin [T, D] or [B, T, D]."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None,
                shared_kv: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, T, d] -> (y [B, T, d], (k, v)), k/v [B, n_kv_heads, S, head_dim] after RoPE.

        `shared_kv` replaces this call's own keys/values (recursive KV sharing): the K and V
        projections are then not computed at all, and `attn_mask` [B, T, S] must say which
        of the S shared positions each query may see."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        if shared_kv is None:
            k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            k = apply_rope(k, cos, sin)
        else:
            k, v = shared_kv
        kk, vv = k, v
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=attn_mask.unsqueeze(1))
        y = self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        return y, (k, v)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None,
                shared_kv: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """-> (output, the (k, v) this layer attended over; see `Attention.forward`)."""
        a, kv = self.attn(self.attn_norm(x), cos, sin, attn_mask, shared_kv)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv
