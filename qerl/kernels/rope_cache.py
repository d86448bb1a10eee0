"""Rotary embedding of q and k for one decode token per row, and the KV-cache write, in one launch.

Reads the fused q|k|v projection [B, (Hq + 2 Hkv) * D], writes rotated q [B, Hq, D] and
stores rotated k and v at cache slot `slot[0]` (a device scalar, so the launch can be
captured in a CUDA graph and replayed at every position). Rotary positions are per
row (left padding). Roundings follow `qerl.modeling.apply_rope` in the activation
dtype: cos/sin rounded to the dtype, each product rounded, then the sum.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, pdl_launch, pdl_wait, require

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def rope_rows(base, d, pos, inv_ptr, mask, D: tl.constexpr):
        """Rotary embedding of rows of D values at base + d (d: offsets 0..D-1 broadcast against base's rows) at
        position pos, in base's dtype, rounded as `apply_rope`: x * cos + rotate_half(x) * sin, cos/sin and each
        product rounded to the dtype (rotate_half: -x[D/2:] for the first half, x[:D/2] for the second)."""
        HALF: tl.constexpr = D // 2
        dt = base.dtype.element_ty
        f = pos * tl.load(inv_ptr + d % HALF)
        c = tl.cos(f).to(dt).to(tl.float32)
        s = tl.sin(f).to(dt).to(tl.float32)
        x = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
        xr = tl.load(base + (d + HALF) % D, mask=mask, other=0.0).to(tl.float32)
        xr = tl.where(d < HALF, -xr, xr)
        return ((x * c).to(dt).to(tl.float32) + (xr * s).to(dt).to(tl.float32)).to(dt)

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, pos_ptr, slot_ptr, inv_ptr, q_ptr, k_ptr, v_ptr,
                           HQ, HKV, stride_qkv, stride_qb, stride_qh,
                           stride_kb, stride_kh, stride_ks, D: tl.constexpr, PDL: tl.constexpr = False):
        pdl_wait(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)  # 0..HQ-1: a q head; HQ..HQ+HKV-1: a kv head
        d = tl.arange(0, D)
        pos = tl.load(pos_ptr + b).to(tl.float32)
        o = rope_rows(qkv_ptr + b * stride_qkv + h * D, d, pos, inv_ptr, d < D, D)
        if h < HQ:
            tl.store(q_ptr + b * stride_qb + h * stride_qh + d, o)
        else:
            j = h - HQ
            off = b * stride_kb + j * stride_kh + tl.load(slot_ptr) * stride_ks
            tl.store(k_ptr + off + d, o)
            tl.store(v_ptr + off + d, tl.load(qkv_ptr + b * stride_qkv + (HQ + HKV + j) * D + d))


def rope_cache(qkv: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, inv_freq: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
               q_out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [B, (Hq+2Hkv)*D]; k_cache/v_cache [B_cap, Hkv, S, D] (one layer); -> q [B, Hq, D]."""
    require(qkv, what="the rope/cache kernel")
    b = qkv.shape[0]
    if q_out is None:
        q_out = torch.empty((b, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if k_cache.stride(3) != 1 or qkv.stride(1) != 1:
        raise ValueError("rope_cache: head_dim must be the contiguous dimension")
    _rope_cache_kernel[(b, num_heads + num_kv_heads)](
        qkv, pos, slot, inv_freq, q_out, k_cache, v_cache, num_heads, num_kv_heads,
        qkv.stride(0), q_out.stride(0), q_out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        D=head_dim, num_warps=1, **pdl_launch())
    return q_out
