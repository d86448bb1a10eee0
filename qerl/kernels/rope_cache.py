"""Rotary embedding of q and k for one decode token per row, and the KV-cache write, in one launch.

Reads the fused q|k|v projection [B, (Hq + 2 Hkv) * D], writes rotated q [B, Hq, D] and
stores rotated k and v at cache slot `slot[0]` (a device scalar, so the launch can be
captured in a CUDA graph and replayed at every position). Rotary positions are per
row (left padding). Roundings follow `qerl.modeling.apply_rope` in the activation
dtype: cos/sin rounded to the dtype, each product rounded, then the sum.
"""

from __future__ import annotations

import torch

from .common import HAS_TRITON, require

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_cache_kernel(
        qkv_ptr,
        pos_ptr,
        slot_ptr,
        inv_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        HQ,
        HKV,
        stride_qkv,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_ks,
        D: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)  # 0..HQ-1: a q head; HQ..HQ+HKV-1: a kv head
        HALF: tl.constexpr = D // 2
        i = tl.arange(0, HALF)
        dt = qkv_ptr.dtype.element_ty
        pos = tl.load(pos_ptr + b).to(tl.float32)
        f = pos * tl.load(inv_ptr + i)
        c = tl.cos(f).to(dt).to(tl.float32)
        s = tl.sin(f).to(dt).to(tl.float32)
        base = qkv_ptr + b * stride_qkv + h * D
        x1 = tl.load(base + i).to(tl.float32)
        x2 = tl.load(base + HALF + i).to(tl.float32)
        o1 = ((x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
        if h < HQ:
            qdst = q_ptr + b * stride_qb + h * stride_qh
            tl.store(qdst + i, o1)
            tl.store(qdst + HALF + i, o2)
        else:
            j = h - HQ
            slot = tl.load(slot_ptr)
            off = b * stride_kb + j * stride_kh + slot * stride_ks
            tl.store(k_ptr + off + i, o1)
            tl.store(k_ptr + off + HALF + i, o2)
            vsrc = qkv_ptr + b * stride_qkv + (HQ + HKV + j) * D
            tl.store(v_ptr + off + i, tl.load(vsrc + i))
            tl.store(v_ptr + off + HALF + i, tl.load(vsrc + HALF + i))


def rope_cache(
    qkv: torch.Tensor,
    pos: torch.Tensor,
    slot: torch.Tensor,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """qkv [B, (Hq+2Hkv)*D]; k_cache/v_cache [B_cap, Hkv, S, D] (one layer); -> q [B, Hq, D]."""
    require(qkv, what="the rope/cache kernel")
    b = qkv.shape[0]
    if q_out is None:
        q_out = torch.empty((b, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if k_cache.stride(3) != 1 or qkv.stride(1) != 1:
        raise ValueError("rope_cache: head_dim must be the contiguous dimension")
    _rope_cache_kernel[(b, num_heads + num_kv_heads)](
        qkv,
        pos,
        slot,
        inv_freq,
        q_out,
        k_cache,
        v_cache,
        num_heads,
        num_kv_heads,
        qkv.stride(0),
        q_out.stride(0),
        q_out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        D=head_dim,
        num_warps=1,
    )
    return q_out
