"""Dequantize NVFP4 / MXFP4 weights on the GPU, for the cuBLAS path of many rows (prefill, training forward and
backward, decode past the one-pass kernels' rows): ONE weight at a time into a reusable bf16 buffer.

The buffer is shared by all layers (one per device and dtype, grown to the largest
weight seen), so the model never holds dequantized copies of more than one Linear.
Ops on one CUDA stream run in order, so the next layer's dequantization cannot
overwrite the buffer before the matmul that reads it has run.
The dequantized values are bit-identical to `qerl.quant.{nvfp4,mxfp4}_dequantize`.
"""

from __future__ import annotations

import torch

from .common import HAS_TRITON, require, shared_scratch

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common import e2m1_scaled, e4m3_value

    @triton.jit
    def _dequant_kernel(
        w_ptr,
        s_ptr,
        gs_ptr,
        out_ptr,
        N,
        KH,
        stride_wn,
        stride_sn,
        stride_on,
        FMT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_KH: tl.constexpr,
    ):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rh = tl.program_id(1) * BLOCK_KH + tl.arange(0, BLOCK_KH)
        m = (rn < N)[:, None] & (rh < KH)[None, :]
        p = tl.load(w_ptr + rn[:, None] * stride_wn + rh[None, :], mask=m, other=0).to(tl.int32)
        if FMT == 0:
            gs = tl.load(gs_ptr)
            sb = tl.load(s_ptr + rn[:, None] * stride_sn + (rh // 8)[None, :], mask=m, other=0).to(tl.int32)
            step = (e4m3_value(sb) / gs) * 16384.0
        else:
            sb = tl.load(s_ptr + rn[:, None] * stride_sn + (rh // 16)[None, :], mask=m, other=0).to(tl.int32)
            step = (sb << 23).to(tl.float32, bitcast=True) * 16384.0
        lo = (e2m1_scaled(p & 15) * step).to(out_ptr.dtype.element_ty)
        hi = (e2m1_scaled(p >> 4) * step).to(out_ptr.dtype.element_ty)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * BLOCK_KH))  # interleave: even column from the low nibble
        rk = tl.program_id(1) * 2 * BLOCK_KH + tl.arange(0, 2 * BLOCK_KH)
        mk = (rn < N)[:, None] & (rk < 2 * KH)[None, :]
        tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :], w, mask=mk)


def dequantize(
    fmt: str,
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor | None,
    dtype=torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N, K/2] packed -> [N, K] in dtype (into `out` when given)."""
    require(packed, what=f"the {fmt} dequantize kernel")
    n, kh = packed.shape
    if out is None:
        out = torch.empty((n, 2 * kh), dtype=dtype, device=packed.device)
    if scale.dtype != torch.uint8:
        scale = scale.view(torch.uint8)
    bn, bkh = 32, 64
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(kh, bkh))](
        packed,
        scale,
        global_scale if global_scale is not None else scale,
        out,
        n,
        kh,
        packed.stride(0),
        scale.stride(0),
        out.stride(0),
        FMT=0 if fmt == "nvfp4" else 1,
        BLOCK_N=bn,
        BLOCK_KH=bkh,
        num_warps=4,
    )
    return out


def shared_buffer(n: int, k: int, dtype, device) -> torch.Tensor:
    """A [N, K] view of the one reusable dequantization buffer for (device, dtype) (`common.shared_scratch`)."""
    return shared_scratch("dequantization (dense_out=)", n * k, dtype, device).view(n, k)
