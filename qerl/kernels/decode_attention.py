"""Decode attention (one query token per row) over a static KV cache: split-KV, two launches.

The number of keys to read, `n_keys[0]`, is a device scalar, so the launch can be
captured once in a CUDA graph and replayed at every position while each step reads
only the filled part of the cache (never the whole preallocated length). Keys are
split over NSPLIT programs per (row, kv head) so that batch 1 fills the GPU
(flash-decoding); the GQA query heads of one kv head share each key load. A per-row
key mask (left padding) removes pad slots. The second launch merges the splits'
partial softmax sums.
"""

from __future__ import annotations

import math

import torch

from .common import HAS_TRITON, next_pow2, require

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common import plane_col_tl

    @triton.jit
    def _attn_split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        mask_ptr,
        nkeys_ptr,
        src_ptr,
        plen_ptr,
        o_ptr,
        ml_ptr,
        G,
        sm_scale,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_mb,
        stride_ob,
        stride_oh,
        stride_os,
        stride_mlb,
        stride_mlh,
        NSPLIT: tl.constexpr,
        GP: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
        PREC: tl.constexpr,
        SHARED: tl.constexpr,
    ):
        b = tl.program_id(0)
        hk = tl.program_id(1)
        sp = tl.program_id(2)
        n_keys = tl.load(nkeys_ptr)
        per = tl.cdiv(tl.cdiv(n_keys, NSPLIT), BS) * BS
        lo = sp * per
        hi = tl.minimum(lo + per, n_keys)
        g = tl.arange(0, GP)
        gm = g < G
        heads = hk * G + g
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gm[:, None], other=0.0)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        if SHARED:  # keys below the prefix length live in row src[b] (the group's shared prompt)
            src = tl.load(src_ptr + b)
            plen = tl.load(plen_ptr)
        for s0 in range(lo, hi, BS):
            s = s0 + tl.arange(0, BS)
            smask = s < hi
            valid = smask & (tl.load(mask_ptr + b * stride_mb + s, mask=smask, other=0) != 0)
            if SHARED:
                row = tl.where(s < plen, src, b)
                kv = hk * stride_kh + row[:, None] * stride_kb + s[:, None] * stride_ks + d[None, :]
            else:
                kv = hk * stride_kh + b * stride_kb + s[:, None] * stride_ks + d[None, :]
            k = tl.load(k_ptr + kv, mask=smask[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale  # [GP, BS]
            sc = tl.where(valid[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sc - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv, mask=smask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        obase = o_ptr + b * stride_ob + heads[:, None] * stride_oh + sp * stride_os
        tl.store(obase + d[None, :], acc, mask=gm[:, None])
        mlbase = ml_ptr + b * stride_mlb + heads * stride_mlh + sp * 2
        tl.store(mlbase, m_i, mask=gm)
        tl.store(mlbase + 1, l_i, mask=gm)

    @triton.jit
    def _attn_merge_kernel(
        o_ptr,
        ml_ptr,
        out_ptr,
        stride_ob,
        stride_oh,
        stride_os,
        stride_mlb,
        stride_mlh,
        stride_outb,
        NSPLIT: tl.constexpr,
        NSP: tl.constexpr,
        D: tl.constexpr,
        PLANES: tl.constexpr = False,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.arange(0, NSP)
        spm = sp < NSPLIT
        mlbase = ml_ptr + b * stride_mlb + h * stride_mlh + sp * 2
        m = tl.load(mlbase, mask=spm, other=float("-inf"))
        l = tl.load(mlbase + 1, mask=spm, other=0.0)
        mx = tl.max(m, axis=0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - mx))
        d = tl.arange(0, D)
        o = tl.load(
            o_ptr + b * stride_ob + h * stride_oh + sp[:, None] * stride_os + d[None, :], mask=spm[:, None], other=0.0
        )
        res = tl.sum(o * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        col = plane_col_tl(h * D + d) if PLANES else h * D + d
        tl.store(out_ptr + b * stride_outb + col, res.to(out_ptr.dtype.element_ty))


def attention_splits(batch: int, kv_heads: int, max_len: int, sms: int = 132, *, waves: int = 4) -> int:
    """Enough (row, kv head, split) programs for about `waves` programs an SM, each split >= 64 keys (at most 64
    splits). 4: 1.05-1.08x over 2 at 64 rows, 512-2304 keys (H100, `benchmarks/sweep_decode_gpu.py`); one split
    either way at 128 rows."""
    want = max(1, (waves * sms) // max(1, batch * kv_heads))
    return int(max(1, min(want, 64, (max_len + 63) // 64)))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_mask: torch.Tensor,
    n_keys: torch.Tensor,
    nsplit: int,
    out: torch.Tensor | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    planes: bool = False,
    prefix_rows: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
    *,
    block_keys: int = 32,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D]; k/v_cache [>=B, Hkv, S, D]; key_mask [>=B, S] (nonzero = attend); n_keys int [1].

    -> out [B, Hq * D] in q.dtype; planes: in plane order (`common.plane_col`), as `nvfp4_wgmma` reads it.
    prefix_rows int32 [>=B], prefix_len int32 [1] (device scalars, both or neither): row b reads its keys below
    prefix_len from cache row prefix_rows[b] (a group of samples of one prompt shares its prompt's keys, read
    from DRAM about once while the group's programs run together), the rest from its own row.
    block_keys (a power of 2), num_warps, num_stages (None: Triton's default): the split launch's tile (keys a
    loop step), warps and pipeline depth (benchmarks/sweep_decode_gpu.py); the merge launch keeps its own.
    """
    require(q, k_cache, what="the decode attention kernel")
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    if out is None:
        out = torch.empty((b, hq * d), dtype=q.dtype, device=q.device)
    if workspace is None:
        workspace = (
            torch.empty((b, hq, nsplit, d), dtype=torch.float32, device=q.device),
            torch.empty((b, hq, nsplit, 2), dtype=torch.float32, device=q.device),
        )
    o_part, ml = workspace
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    shared = prefix_rows is not None
    if shared != (prefix_len is not None):
        raise ValueError("decode_attention takes prefix_rows and prefix_len together")
    stages = {} if num_stages is None else dict(num_stages=num_stages)
    _attn_split_kernel[(b, hkv, nsplit)](
        q,
        k_cache,
        v_cache,
        key_mask,
        n_keys,
        prefix_rows if shared else n_keys,
        prefix_len if shared else n_keys,
        o_part,
        ml,
        g,
        1.0 / math.sqrt(d),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        key_mask.stride(0),
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        ml.stride(0),
        ml.stride(1),
        NSPLIT=nsplit,
        GP=max(16, next_pow2(g)),
        D=d,
        BS=block_keys,
        PREC=prec,
        SHARED=shared,
        num_warps=num_warps,
        **stages,
    )
    _attn_merge_kernel[(b, hq)](
        o_part,
        ml,
        out,
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        ml.stride(0),
        ml.stride(1),
        out.stride(0),
        NSPLIT=nsplit,
        NSP=next_pow2(nsplit),
        D=d,
        PLANES=planes,
        num_warps=1,
    )
    return out
