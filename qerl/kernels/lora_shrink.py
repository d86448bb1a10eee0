"""LoRA down-projection for few rows: h = x @ A.T as split-K partial sums, no atomics.

Writes h_partial [S, M, R] fp32 (S = K chunks); the consumer (`fused_linear`'s LoRA
epilogue) sums over S while it loads h, so the shrink needs no second pass, no zeroed
buffer and no atomics, and stays deterministic. A is the concatenation of the fused
modules' A matrices ([R_total, K], fp32 as trained), so q/k/v share one launch.
"""

from __future__ import annotations

import torch

from .common import HAS_TRITON, next_pow2, require

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _lora_shrink_kernel(
        x_ptr,
        a_ptr,
        h_ptr,
        M,
        K,
        R,
        chunk,
        stride_xm,
        stride_ar,
        stride_hs,
        stride_hm,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_DOT: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        pid_r = tl.program_id(1)
        pid_m = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        m_mask = rm < M
        r_mask = rr < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        k_lo = pid_s * chunk
        for kk in range(0, chunk, BLOCK_K):
            rk = k_lo + kk + tl.arange(0, BLOCK_K)
            k_mask = (rk < K) & (rk < k_lo + chunk)
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0
            ).to(tl.float32)
            a = tl.load(
                a_ptr + rr[:, None] * stride_ar + rk[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0
            ).to(tl.float32)
            if USE_DOT:
                acc = tl.dot(x, tl.trans(a), acc, input_precision="ieee")
            else:
                acc += tl.sum(x[:, None, :] * a[None, :, :], axis=2)
        tl.store(
            h_ptr + pid_s * stride_hs + rm[:, None] * stride_hm + rr[None, :],
            acc,
            mask=m_mask[:, None] & r_mask[None, :],
        )


MAX_SPLITS = 32  # the consumer loads all partials of a row in one [next_pow2(S), R] tile


def shrink_chunk(k: int) -> int:
    """K columns per program: at least 256, and few enough chunks (<= MAX_SPLITS) for one tile load."""
    return max(256, next_pow2(-(-k // MAX_SPLITS)))


def shrink_splits(k: int, chunk: int | None = None) -> int:
    chunk = chunk or shrink_chunk(k)
    return (k + chunk - 1) // chunk


def partials_view(buf: torch.Tensor | None, s: int, m: int, r: int, device) -> torch.Tensor:
    """[S, M, R] fp32 partials of h in the first S * M * R values of buf (a new tensor if buf is None)."""
    if buf is None:
        return torch.empty((s, m, r), dtype=torch.float32, device=device)
    if buf.shape == (s, m, r):
        return buf
    if buf.numel() < s * m * r:
        raise ValueError(f"the buffer holds {buf.numel()} values, the LoRA partials need {s * m * r}")
    return buf.view(-1)[: s * m * r].view(s, m, r)


def lora_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    out: torch.Tensor | None = None,
    chunk: int | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """x [M, K] (any float dtype), a [R, K] -> partials [S, M, R] fp32 with S = shrink_splits(K, chunk),
    written to the first S * M * R values of `out` (any fp32 buffer at least that large) if given.

    One program per (K chunk, 16 columns of R, row block): a short loop over wide tiles, so the
    launch is one wave of small independent programs (one long loop over K per row block is latency-bound).
    """
    require(x, a, what="the LoRA shrink kernel")
    m, k = x.shape
    r = a.shape[0]
    if a.shape[1] != k or x.stride(1) != 1 or a.stride(1) != 1:
        raise ValueError("lora_shrink: x [M, K] and A [R, K] must share K and be row-major")
    chunk = chunk or shrink_chunk(k)
    s = shrink_splits(k, chunk)
    out = partials_view(out, s, m, r, x.device)
    # rows a program: one up to 16 rows, [16, BLOCK_K] of A against it (at 16 rows about 2.5x faster than the tf32
    # dot on 16-row blocks, benchmarks/bench_epilogue_gpu.py); above, a tf32 dot
    bm = block_m or (1 if m <= 16 else 32)
    use_dot = bm > 1
    bk = min(64, next_pow2(chunk)) if use_dot else min(256, next_pow2(chunk))
    br = 16
    grid = (s, triton.cdiv(r, br), triton.cdiv(m, bm))
    _lora_shrink_kernel[grid](
        x,
        a,
        out,
        m,
        k,
        r,
        chunk,
        x.stride(0),
        a.stride(0),
        out.stride(0),
        out.stride(1),
        BLOCK_M=bm,
        BLOCK_R=br,
        BLOCK_K=bk,
        USE_DOT=use_dot,
        num_warps=4,
    )
    return out
