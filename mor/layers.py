"""The Llama-style building blocks every model family shares.

RMSNorm, rotary position embeddings in Hugging Face Llama's rotate-half layout, grouped-
query attention on `F.scaled_dot_product_attention`, and a SwiGLU MLP. Parameter names and
shapes map 1:1 onto `transformers`' `LlamaForCausalLM` (see `baselines/vanilla.py`,
`to_hf_state_dict`), so weights convert without reordering heads.

Every block takes the RoPE tables (cos, sin) of explicit positions, so MoR can run a
sub-sequence of selected tokens at their ORIGINAL RoPE positions, and an optional boolean
`attn_mask` (True = may attend) for routing modes whose selections differ between rows of a
batch.

In eager mode the layers compute the same formulas through a few fused autograd functions
(docs/perf.md): one matmul for Q/K/V and one for gate/up (the weights are concatenated per
call; the parameters and the state dict are unchanged), each RMSNorm's weight folded into
the projections that read it, RoPE applied in one pass without transposing copies, GQA
without repeated K/V heads, residual adds inside the branch's last matmul, and the tied
head fused with the cross-entropy (`head_and_loss`). Under `torch.compile`, while hooks
observe the projections, or with `FUSED = False`, the plain formulas run instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from mor.config import ModelConfig

# --- fused autograd functions ------------------------------------------------------------------
# On CPU the training step is bound as much by passes over activations (each eager op streams
# whole tensors through memory, and each is a parallel region with its own fork/join) as by
# matmuls. The functions below compute exactly the textbook formulas -- HF Llama's, to fp32
# round-off (tests/evals/perf/test_train_vs_hf.py compares values and gradients with the
# plain path for every family) -- with hand-written backward passes that need fewer ops,
# fewer passes over memory and fewer temporaries than autograd's composition of the same
# formulas.


FUSED = True
"""Use the fused functions below in eager mode (False: the plain formulas everywhere, e.g.
as a reference in tests)."""


def fused_enabled(*modules: nn.Module) -> bool:
    """Whether the fused functions run for a call involving `modules`: not while
    `torch.compile` traces (inductor fuses the plain formulas itself, without graph breaks),
    and not while a forward (pre-)hook observes one of `modules` or every module -- the fused
    paths do not call those modules, so hooks (e.g. a test counting K projections) see the
    plain path's calls."""
    if not FUSED or torch.compiler.is_compiling():
        return False
    return not (_global_forward_hooks or _global_forward_pre_hooks or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules))


class _RMSNormFn(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) [* weight], normalised in fp32 (as HF Llama) and cast
    back to x's dtype before the weight. Saves the normalised x and the per-row scale."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        xf = x.float()
        # Sum of squares in one reduction (no squared temporary); norm^2 / d is mean(x^2)
        # up to round-off. The rest runs on one value per row.
        r = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
        r = r.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        xn = xf * r
        ctx.save_for_backward(xn, r, weight)
        ctx.in_dtype = x.dtype
        y = xn.to(x.dtype)
        return y if weight is None else weight * y

    @staticmethod
    def backward(ctx, g: Tensor):
        xn, r, weight = ctx.saved_tensors
        grad_w = None
        if weight is not None:
            if ctx.needs_input_grad[1]:
                grad_w = (g * xn.to(g.dtype)).sum(tuple(range(g.dim() - 1))).to(weight.dtype)
            g = g * weight
        g = g.float()
        # d/dx [x r] . g = r (g - xn mean(g xn)).
        # Row dot products as one batched matmul (no product temporary).
        dot = torch.matmul(g.unsqueeze(-2), xn.unsqueeze(-1)).squeeze(-1).div_(xn.shape[-1])
        gx = torch.addcmul(g, xn, dot, value=-1).mul_(r)
        return gx.to(ctx.in_dtype), grad_w, None


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm of the last dimension; `weight` None gives the unscaled normalised x."""
    return _RMSNormFn.apply(x, weight, eps)


def _rotate(x: Tensor, cos: Tensor, s: Tensor, out: Tensor, sign: float) -> None:
    """out = RoPE(x) in rotate-half layout with sign=-1 ([x1 c - x2 s, x2 c + x1 s]), its
    inverse (the gradient) with sign=+1. `cos` full width, `s` the half-width sine."""
    h = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    out[..., :h].addcmul_(x[..., h:], s, value=sign)
    out[..., h:].addcmul_(x[..., :h], s, value=-sign)


class _QKVRope(torch.autograd.Function):
    """The fused projection's output [B, T, (H + 2 KVH) * D] -> q [B, H, T, D], k
    [B, KVH, T, D] with RoPE applied and v [B, KVH, T, D]: views in [B, T, heads, D]
    memory (no transposing copies), the gradient written into one buffer (no concatenation).
    cos/sin [T, D] or [B, T, D] (rotate-half layout: both halves hold the same values)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor, n_q: int, n_kv: int):
        b, t, _ = qkv.shape
        d = cos.shape[-1]
        x = qkv.view(b, t, n_q + 2 * n_kv, d)
        c, s = cos.unsqueeze(-2), sin[..., : d // 2].unsqueeze(-2)  # [.., T, 1, D | D/2]
        nqk = n_q + n_kv
        qk = torch.empty(b, t, nqk, d, dtype=torch.result_type(qkv, cos), device=qkv.device)
        _rotate(x[:, :, :nqk], c, s, qk, -1.0)
        ctx.save_for_backward(c, s)
        ctx.shape = (b, t, n_q, n_kv, d, qkv.dtype)
        return (qk[:, :, :n_q].transpose(1, 2), qk[:, :, n_q:].transpose(1, 2),
                x[:, :, nqk:].transpose(1, 2))

    @staticmethod
    def backward(ctx, gq: Tensor | None, gk: Tensor | None, gv: Tensor | None):
        c, s = ctx.saved_tensors
        b, t, n_q, n_kv, d, dtype = ctx.shape
        nqk = n_q + n_kv
        grad = torch.empty(b, t, nqk + n_kv, d, dtype=dtype, device=c.device)
        for g, lo, hi in ((gq, 0, n_q), (gk, n_q, nqk), (gv, nqk, nqk + n_kv)):
            if g is None:
                grad[:, :, lo:hi].zero_()
            elif hi <= nqk:
                _rotate(g.transpose(1, 2), c, s, grad[:, :, lo:hi], 1.0)
            else:
                grad[:, :, lo:hi].copy_(g.transpose(1, 2))
        return grad.view(b, t, -1), None, None, None, None


class _SwiGLUMLPFn(torch.autograd.Function):
    """residual + down(silu(x Wg^T) * (x Wu^T)) for x [N, d], w_gu = [Wg; Wu] [2F, d],
    w_down [d, F], residual [N, d] or None (the residual add happens inside the last matmul).

    Computed TRANSPOSED -- h^T = w_gu x^T [2F, N] -- so gate and up are contiguous halves
    and the elementwise work streams contiguous memory (row halves of [N, 2F] are strided
    and slower); every matmul of the forward and backward reads its operands in place (the
    BLAS takes transposed views), and the gradient of h^T is written into one buffer. Saves
    h and the product (less than autograd, which also keeps silu(gate))."""

    @staticmethod
    def forward(ctx, x: Tensor, w_gu: Tensor, w_down: Tensor, residual: Tensor | None
                ) -> Tensor:
        ctx.dtypes = (x.dtype, w_gu.dtype, w_down.dtype)
        ctx.has_residual = residual is not None
        dev = x.device.type
        dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                 else torch.result_type(x, w_gu))
        with torch.autocast(dev, enabled=False):  # as autocast would: matmuls in `dtype`
            x, w_gu, w_down = x.to(dtype), w_gu.to(dtype), w_down.to(dtype)
            f = w_gu.shape[0] // 2
            ht = torch.mm(w_gu, x.t())
            act_t = F.silu(ht[:f]).mul_(ht[f:])
            ctx.save_for_backward(x, w_gu, w_down, ht, act_t)
            if residual is not None and residual.dtype == dtype:
                return torch.addmm(residual, act_t.t(), w_down.t())
            y = torch.mm(act_t.t(), w_down.t())
            return y if residual is None else residual + y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w_gu, w_down, ht, act_t = ctx.saved_tensors
        f = w_gu.shape[0] // 2
        need_x, need_gu, need_down, need_res = ctx.needs_input_grad
        grad_res = g if ctx.has_residual and need_res else None
        with torch.autocast(g.device.type, enabled=False):
            g = g.to(ht.dtype)
            gate, up = ht[:f], ht[f:]
            grad_down = torch.mm(g.t(), act_t.t()) if need_down else None
            g_act = torch.mm(w_down.t(), g.t())  # [F, N]
            gh = torch.empty_like(ht)
            g_gate, g_up = gh[:f], gh[f:]
            torch.mul(g_act, up, out=g_gate)
            torch.ops.aten.silu_backward.grad_input(g_gate, gate, grad_input=g_gate)
            torch.ops.aten.silu.out(gate, out=g_up)  # recomputed: nothing more saved
            g_up.mul_(g_act)
            grad_gu = torch.mm(gh, x) if need_gu else None
            grad_x = torch.mm(gh.t(), w_gu) if need_x else None
        return (*(None if t is None else t.to(dt)
                  for t, dt in zip((grad_x, grad_gu, grad_down), ctx.dtypes)), grad_res)


class _HeadLossFn(torch.autograd.Function):
    """logits = h E^T ([N, d] x [V, d]) and their mean cross-entropy over the targets [N]
    that are not `ignore_index` -- `F.linear` + `F.cross_entropy(logits.float(), ...)`
    without a log-probability matrix or a [N, V] gradient: the forward keeps one
    log-sum-exp per row, the backward forms softmax - one-hot block by block and feeds each
    block straight into the two gradient matmuls. Returns (logits, loss); logits keep their
    own gradient path (a gradient arriving through them is added)."""

    BLOCK_BYTES = 8 << 20
    """On CPU, logits are processed in row blocks of about this many bytes (in cache while
    a block's softmax is formed and multiplied); other devices use one block."""

    @staticmethod
    def _rows(logits: Tensor) -> int:
        n, v = logits.shape
        if logits.device.type != "cpu":
            return n
        return max(1, min(n, _HeadLossFn.BLOCK_BYTES // (4 * v)))

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int):
        ctx.set_materialize_grads(False)
        dev = h.device.type
        dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                 else torch.result_type(h, weight))
        with torch.autocast(dev, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            logits = torch.mm(hc, wc.t())
            n, v = logits.shape
            lse = torch.empty(n, 1, dtype=torch.float32, device=h.device)
            rows = _HeadLossFn._rows(logits)
            buf = torch.empty(min(n, rows), v, dtype=torch.float32, device=h.device)
            for i in range(0, n, rows):  # torch.logsumexp, with one scratch buffer
                blk, m, p = logits[i:i + rows], lse[i:i + rows], buf[: min(rows, n - i)]
                m.copy_(blk.amax(dim=-1, keepdim=True))
                m.masked_fill_(m.abs() == float("inf"), 0.0)
                torch.sub(blk, m, out=p)
                m.add_(p.exp_().sum(-1, keepdim=True).log_())
            lse = lse.view(n)
            valid = targets != ignore_index
            safe = torch.where(valid, targets, 0)
            picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1).float()
            count = valid.sum()
            loss = torch.where(valid, lse - picked, 0.0).sum() / count
        ctx.save_for_backward(hc, wc, logits, lse, safe, valid, count)
        ctx.dtypes = (h.dtype, weight.dtype)
        return logits, loss

    @staticmethod
    def backward(ctx, g_logits: Tensor | None, g_loss: Tensor | None):
        hc, wc, logits, lse, safe, valid, count = ctx.saved_tensors
        n, v = logits.shape
        if g_loss is None and g_logits is None:
            return None, None, None, None
        dev = hc.device.type
        with torch.autocast(dev, enabled=False):
            grad_h = torch.empty_like(hc)
            grad_w = torch.empty_like(wc)
            rows = _HeadLossFn._rows(logits)
            scale = None if g_loss is None else torch.where(
                valid, (g_loss / count).float(), 0.0).unsqueeze(1)  # [N, 1]; 0: ignored
            buf = torch.empty(rows, v, dtype=logits.dtype, device=logits.device)
            for i in range(0, n, rows):
                j = min(n, i + rows)
                p = buf[: j - i]
                if scale is None:
                    p.copy_(g_logits[i:j])
                else:  # (softmax - one-hot) * scale, in fp32
                    q = p if p.dtype == torch.float32 else torch.empty_like(p, dtype=torch.float32)
                    torch.sub(logits[i:j], lse[i:j, None], out=q)
                    q.exp_().mul_(scale[i:j])
                    q.scatter_add_(1, safe[i:j, None], -scale[i:j])
                    if g_logits is not None:
                        q += g_logits[i:j]
                    if q is not p:
                        p.copy_(q)
                torch.mm(p, wc, out=grad_h[i:j])
                if i == 0:
                    torch.mm(p.t(), hc[i:j], out=grad_w)
                else:
                    grad_w.addmm_(p.t(), hc[i:j])
        h_dtype, w_dtype = ctx.dtypes
        return grad_h.to(h_dtype), grad_w.to(w_dtype), None, None


def head_and_loss(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100
                  ) -> tuple[Tensor, Tensor]:
    """(logits = h weight^T, F.cross_entropy(logits.float(), targets, ignore_index=...))
    for h [N, d], weight [V, d], targets [N]; the mean is over targets not ignored."""
    return _HeadLossFn.apply(h, weight, targets, ignore_index)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (as HF Llama does) so bf16 autocast does not lose precision.
        if fused_enabled():
            return rms_norm(x, self.weight, self.eps)
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
                shared_kv: tuple[Tensor, Tensor] | None = None, *,
                norm_weight: Tensor | None = None, residual: Tensor | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, T, d] -> (y [B, T, d], (k, v)), k/v [B, n_kv_heads, S, head_dim] after RoPE.

        `shared_kv` replaces this call's own keys/values (recursive KV sharing): the K and V
        projections are then not computed at all, and `attn_mask` [B, T, S] must say which
        of the S shared positions each query may see.

        `norm_weight` [d]: x is RMS-normalised but not yet scaled by its norm's weight, which
        is folded into the projection weights instead ((x * w) W^T = x (W * w)^T).
        `residual` [B, T, d]: returned y is residual + attention (added inside o_proj's
        matmul)."""
        if not fused_enabled(self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            if norm_weight is not None:
                x = norm_weight * x
            y, kv = self._forward_modules(x, cos, sin, attn_mask, shared_kv)
            return (y if residual is None else residual + y), kv
        b, t, _ = x.shape
        H, KVH, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if shared_kv is None:
            # One matmul for Q, K and V; RoPE and the head layout in one pass over Q and K.
            w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            if norm_weight is not None:
                w = w * norm_weight
            q, k, v = _QKVRope.apply(F.linear(x, w), cos, sin, H, KVH)
        else:
            w = self.q_proj.weight if norm_weight is None else self.q_proj.weight * norm_weight
            q = apply_rope(F.linear(x, w).view(b, t, H, hd).transpose(1, 2), cos, sin)
            k, v = shared_kv
        y = self._attend(q, k, v, attn_mask).transpose(1, 2).reshape(b * t, H * hd)
        if residual is not None and residual.dtype == y.dtype and not (
                torch.is_autocast_enabled(y.device.type)):
            out = torch.addmm(residual.reshape(b * t, -1), y, self.o_proj.weight.t())
        else:
            out = F.linear(y, self.o_proj.weight)
            if residual is not None:
                out = residual.reshape(b * t, -1) + out
        return out.view(b, t, -1), (k, v)

    def _forward_modules(self, x, cos, sin, attn_mask, shared_kv):
        """The plain formulas, through the `nn.Linear` modules (see `fused_enabled`)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        if shared_kv is None:
            k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            k = apply_rope(k, cos, sin)
        else:
            k, v = shared_kv
        y = self._attend(q, k, v, attn_mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)), (k, v)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
        # Grouped-query attention without materialising repeated K/V heads.
        gqa = self.n_kv_heads != self.n_heads
        if attn_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.unsqueeze(1),
                                              enable_gqa=gqa)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor, *, norm_weight: Tensor | None = None,
                residual: Tensor | None = None) -> Tensor:
        """`norm_weight`, `residual`: as in `Attention.forward` (folded into the gate/up
        weights; added inside the down projection's matmul)."""
        if not fused_enabled(self.gate_proj, self.up_proj, self.down_proj):
            if norm_weight is not None:
                x = norm_weight * x
            y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
            return y if residual is None else residual + y
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        if norm_weight is not None:
            w = w * norm_weight
        d = x.shape[-1]
        y = _SwiGLUMLPFn.apply(x.reshape(-1, d), w, self.down_proj.weight,
                               None if residual is None else residual.reshape(-1, d))
        return y.view(x.shape)


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
        if not fused_enabled(self.attn_norm, self.mlp_norm, self.attn, self.mlp):
            a, kv = self.attn(self.attn_norm(x), cos, sin, attn_mask, shared_kv)
            x = x + a
            return x + self.mlp(self.mlp_norm(x)), kv
        # Each norm's weight is folded into the projections reading it, and each residual
        # add into the matmul producing the branch (same sums, fewer passes over x).
        x, kv = self.attn(rms_norm(x, None, self.attn_norm.eps), cos, sin, attn_mask,
                          shared_kv, norm_weight=self.attn_norm.weight, residual=x)
        return self.mlp(rms_norm(x, None, self.mlp_norm.eps), norm_weight=self.mlp_norm.weight,
                        residual=x), kv
