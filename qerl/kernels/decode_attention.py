"""Decode attention (one query token per row) over a static KV cache: split-KV, two launches.

The number of keys to read, `n_keys[0]`, is a device scalar, so the launch can be
captured once in a CUDA graph and replayed at every position while each step reads
only the filled part of the cache (never the whole preallocated length). Keys are
split over NSPLIT programs per (row, kv head) so that batch 1 fills the GPU
(flash-decoding); the GQA query heads of one kv head share each key load. A per-row
key mask (left padding) removes pad slots. The second launch merges the splits'
partial softmax sums.

`decode_attention_rope` does `rope_cache` + both launches in one (the engine's `fuse_attention`): the
programs rope their query heads themselves, the split holding the new slot writes its key and value first,
and the last split of a (row, kv head) to finish merges (an acq_rel count a pair, reset for the next launch).
"""
from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, next_pow2, pdl_launch, pdl_wait, require

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .rope_cache import rope_rows

    @triton.jit
    def _key_range(nkeys_ptr, sp, NSPLIT: tl.constexpr, BS: tl.constexpr):
        """Split sp's keys [lo, hi) of [0, n_keys): NSPLIT runs of whole BS-key blocks."""
        n_keys = tl.load(nkeys_ptr)
        per = tl.cdiv(tl.cdiv(n_keys, NSPLIT), BS) * BS
        return sp * per, tl.minimum(sp * per + per, n_keys)

    @triton.jit
    def _attend(q, kbase, vbase, mrow, lo, hi, sm_scale, stride_ks,
                GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
        """Keys [lo, hi) (BS-key blocks) for the GP query heads q [GP, D] of one kv head: the running max, the
        softmax sum and the unnormalized output (m [GP], l [GP], acc [GP, D], fp32)."""
        d = tl.arange(0, D)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        for s0 in range(lo, hi, BS):
            s = s0 + tl.arange(0, BS)
            smask = s < hi
            valid = smask & (tl.load(mrow + s, mask=smask, other=0) != 0)
            k = tl.load(kbase + s[:, None] * stride_ks + d[None, :], mask=smask[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale  # [GP, BS]
            sc = tl.where(valid[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sc - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(vbase + s[:, None] * stride_ks + d[None, :], mask=smask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _store_split(m_i, l_i, acc, o_ptr, ml_ptr, b, heads, gm, sp, stride_ob, stride_oh, stride_os, stride_mlb,
                     stride_mlh, D: tl.constexpr):
        d = tl.arange(0, D)
        obase = o_ptr + b * stride_ob + heads[:, None] * stride_oh + sp * stride_os
        tl.store(obase + d[None, :], acc, mask=gm[:, None])
        mlbase = ml_ptr + b * stride_mlb + heads * stride_mlh + sp * 2
        tl.store(mlbase, m_i, mask=gm)
        tl.store(mlbase + 1, l_i, mask=gm)

    @triton.jit
    def _merge_head(o_ptr, ml_ptr, out_ptr, b, h, stride_ob, stride_oh, stride_os, stride_mlb, stride_mlh,
                    stride_outb, NSPLIT: tl.constexpr, NSP: tl.constexpr, D: tl.constexpr, CACHE: tl.constexpr):
        """out[b, h] from the NSPLIT partial softmax sums of head h (CACHE: the partials' load cache modifier)."""
        sp = tl.arange(0, NSP)
        spm = sp < NSPLIT
        mlbase = ml_ptr + b * stride_mlb + h * stride_mlh + sp * 2
        m = tl.load(mlbase, mask=spm, other=float("-inf"), cache_modifier=CACHE)
        l = tl.load(mlbase + 1, mask=spm, other=0.0, cache_modifier=CACHE)
        mx = tl.max(m, axis=0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - mx))
        d = tl.arange(0, D)
        o = tl.load(o_ptr + b * stride_ob + h * stride_oh + sp[:, None] * stride_os + d[None, :], mask=spm[:, None],
                    other=0.0, cache_modifier=CACHE)
        res = tl.sum(o * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + b * stride_outb + h * D + d, res.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _attn_split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, nkeys_ptr, o_ptr, ml_ptr, G, sm_scale,
                           stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_mb,
                           stride_ob, stride_oh, stride_os, stride_mlb, stride_mlh,
                           NSPLIT: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                           PREC: tl.constexpr, PDL: tl.constexpr = False):
        pdl_wait(PDL)
        b = tl.program_id(0)
        hk = tl.program_id(1)
        sp = tl.program_id(2)
        g = tl.arange(0, GP)
        gm = g < G
        heads = hk * G + g
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gm[:, None], other=0.0)
        lo, hi = _key_range(nkeys_ptr, sp, NSPLIT, BS)
        m_i, l_i, acc = _attend(q, k_ptr + b * stride_kb + hk * stride_kh, v_ptr + b * stride_kb + hk * stride_kh,
                                mask_ptr + b * stride_mb, lo, hi, sm_scale, stride_ks, GP, D, BS, PREC)
        _store_split(m_i, l_i, acc, o_ptr, ml_ptr, b, heads, gm, sp, stride_ob, stride_oh, stride_os, stride_mlb,
                     stride_mlh, D)

    @triton.jit
    def _attn_merge_kernel(o_ptr, ml_ptr, out_ptr, stride_ob, stride_oh, stride_os, stride_mlb, stride_mlh,
                           stride_outb, NSPLIT: tl.constexpr, NSP: tl.constexpr, D: tl.constexpr,
                           PDL: tl.constexpr = False):
        pdl_wait(PDL)
        _merge_head(o_ptr, ml_ptr, out_ptr, tl.program_id(0), tl.program_id(1), stride_ob, stride_oh, stride_os,
                    stride_mlb, stride_mlh, stride_outb, NSPLIT, NSP, D, "")

    @triton.jit
    def _attn_rope_kernel(qkv_ptr, pos_ptr, slot_ptr, inv_ptr, k_ptr, v_ptr, mask_ptr, nkeys_ptr, o_ptr, ml_ptr,
                          cnt_ptr, out_ptr, G, HKV, sm_scale, stride_qkv, stride_kb, stride_kh, stride_ks, stride_mb,
                          stride_ob, stride_oh, stride_os, stride_mlb, stride_mlh, stride_outb,
                          NSPLIT: tl.constexpr, NSP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                          BS: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr = False):
        """`rope_cache` + the split kernel + the merge kernel in one launch (the same roundings and sums, so the
        same outputs): each program ropes its kv head's G query heads itself; the program whose split holds the
        cache slot writes the new key (roped) and value there before reading; the last split of a (row, kv
        head) to finish (an atomic count a pair, reset by that program) merges the G heads."""
        pdl_wait(PDL)
        b = tl.program_id(0)
        hk = tl.program_id(1)
        sp = tl.program_id(2)
        d = tl.arange(0, D)
        row = qkv_ptr + b * stride_qkv
        pos = tl.load(pos_ptr + b).to(tl.float32)
        kbase = k_ptr + b * stride_kb + hk * stride_kh
        vbase = v_ptr + b * stride_kb + hk * stride_kh
        lo, hi = _key_range(nkeys_ptr, sp, NSPLIT, BS)
        slot = tl.load(slot_ptr)
        if (slot >= lo) & (slot < hi):  # this split reads the new token's key and value
            kv = rope_rows(row + (G * HKV + hk) * D, d, pos, inv_ptr, d < D, D)
            tl.store(kbase + slot * stride_ks + d, kv)
            tl.store(vbase + slot * stride_ks + d, tl.load(row + (G * HKV + HKV + hk) * D + d))
            tl.debug_barrier()  # the program's stores are visible to all its threads before they read them
        g = tl.arange(0, GP)
        gm = g < G
        heads = hk * G + g
        q = rope_rows(row + heads[:, None] * D, d[None, :], pos, inv_ptr, gm[:, None], D)
        m_i, l_i, acc = _attend(q, kbase, vbase, mask_ptr + b * stride_mb, lo, hi, sm_scale, stride_ks, GP, D, BS,
                                PREC)
        _store_split(m_i, l_i, acc, o_ptr, ml_ptr, b, heads, gm, sp, stride_ob, stride_oh, stride_os, stride_mlb,
                     stride_mlh, D)
        tl.debug_barrier()  # every thread's partials stored before the count (release, cumulative over the barrier)
        done = tl.atomic_add(cnt_ptr + b * HKV + hk, 1, sem="acq_rel", scope="gpu")
        if done == NSPLIT - 1:  # the last split of this (row, kv head): every other split's partials are visible
            for gi in range(0, G):
                _merge_head(o_ptr, ml_ptr, out_ptr, b, hk * G + gi, stride_ob, stride_oh, stride_os, stride_mlb,
                            stride_mlh, stride_outb, NSPLIT, NSP, D, ".cg")
            tl.atomic_xchg(cnt_ptr + b * HKV + hk, 0, sem="relaxed", scope="gpu")  # ready for the next launch


def attention_splits(batch: int, kv_heads: int, max_len: int, sms: int = 132) -> int:
    """Enough (row, kv head, split) programs for ~2 waves, each split >= 64 keys."""
    want = max(1, (2 * sms) // max(1, batch * kv_heads))
    return int(max(1, min(want, 64, (max_len + 63) // 64)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor,
                     n_keys: torch.Tensor, nsplit: int, out: torch.Tensor | None = None,
                     workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q [B, Hq, D]; k/v_cache [>=B, Hkv, S, D]; key_mask [>=B, S] (nonzero = attend); n_keys int [1].

    -> out [B, Hq * D] in q.dtype.
    """
    require(q, k_cache, what="the decode attention kernel")
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    if out is None:
        out = torch.empty((b, hq * d), dtype=q.dtype, device=q.device)
    if workspace is None:
        workspace = (torch.empty((b, hq, nsplit, d), dtype=torch.float32, device=q.device),
                     torch.empty((b, hq, nsplit, 2), dtype=torch.float32, device=q.device))
    o_part, ml = workspace
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _attn_split_kernel[(b, hkv, nsplit)](
        q, k_cache, v_cache, key_mask, n_keys, o_part, ml, g, 1.0 / math.sqrt(d),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), key_mask.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), ml.stride(0), ml.stride(1),
        NSPLIT=nsplit, GP=max(16, next_pow2(g)), D=d, BS=32, PREC=prec, num_warps=4, **pdl_launch())
    _attn_merge_kernel[(b, hq)](o_part, ml, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                                ml.stride(0), ml.stride(1), out.stride(0), NSPLIT=nsplit, NSP=next_pow2(nsplit),
                                D=d, num_warps=1, **pdl_launch())
    return out


def decode_attention_rope(qkv: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, inv_freq: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor, n_keys: torch.Tensor,
                          nsplit: int, num_heads: int, out: torch.Tensor | None = None,
                          workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
                          counters: torch.Tensor | None = None) -> torch.Tensor:
    """`rope_cache` + `decode_attention` in one launch, same results: qkv [B, (Hq + 2 Hkv) * D] (the fused
    projection, before RoPE); the new key (roped) and value go to cache slot `slot[0]` (n_keys[0] must be
    slot[0] + 1, as in the engine); counters: int32 [>= B * Hkv], zero, left zero (one a (row, kv head): how
    many of its splits are done). -> out [B, Hq * D]."""
    require(qkv, k_cache, what="the decode attention kernel")
    b = qkv.shape[0]
    hkv, d = k_cache.shape[1], k_cache.shape[3]
    g = num_heads // hkv
    if qkv.shape[1] != (num_heads + 2 * hkv) * d or qkv.stride(1) != 1 or k_cache.stride(3) != 1:
        raise ValueError("decode_attention_rope: qkv must be [B, (Hq + 2 Hkv) * D] with D the contiguous dimension")
    if out is None:
        out = torch.empty((b, num_heads * d), dtype=qkv.dtype, device=qkv.device)
    if workspace is None:
        workspace = (torch.empty((b, num_heads, nsplit, d), dtype=torch.float32, device=qkv.device),
                     torch.empty((b, num_heads, nsplit, 2), dtype=torch.float32, device=qkv.device))
    if counters is None:
        counters = torch.zeros(b * hkv, dtype=torch.int32, device=qkv.device)
    o_part, ml = workspace
    _attn_rope_kernel[(b, hkv, nsplit)](
        qkv, pos, slot, inv_freq, k_cache, v_cache, key_mask, n_keys, o_part, ml, counters, out, g, hkv,
        1.0 / math.sqrt(d), qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), key_mask.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), ml.stride(0), ml.stride(1), out.stride(0),
        NSPLIT=nsplit, NSP=next_pow2(nsplit), GP=max(16, next_pow2(g)), D=d, BS=32,
        PREC="ieee" if qkv.dtype == torch.float32 else "tf32", num_warps=4, **pdl_launch())
    return out
