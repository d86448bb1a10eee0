"""Fused residual add + RMSNorm for the decode step: one read of the row, one launch.

    x = x + delta            (rounded to the activation dtype, as `x + attn(x)` does; x is updated in place)
    y = (w.float() * (x.float() * rsqrt(mean(x.float()**2) + eps))).to(dtype)

matches `qerl.modeling.RMSNorm` (fp32 weight and arithmetic) up to the order of the
sum of squares.
"""

from __future__ import annotations

import torch

from .common import HAS_TRITON, next_pow2, require

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common import planes_tile

    @triton.jit
    def _add_rmsnorm_kernel(
        x_ptr,
        d_ptr,
        w_ptr,
        y_ptr,
        H,
        eps,
        stride_x,
        stride_d,
        stride_y,
        HAS_DELTA: tl.constexpr,
        BLOCK: tl.constexpr,
        PLANES: tl.constexpr = False,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(x_ptr + row * stride_x + cols, x, mask=mask)
        h = x.to(tl.float32)
        ms = tl.sum(h * h, axis=0) / H
        h = h * tl.math.rsqrt(ms + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = w * h
        if PLANES:  # reordered in registers into plane order (H a multiple of 256), stored contiguously
            y = tl.reshape(planes_tile(tl.reshape(y, [1, BLOCK]), 1, BLOCK), [BLOCK])
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    delta: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    planes: bool = False,
) -> torch.Tensor:
    """x [M, H] (updated in place when delta is given) -> normed [M, H]; planes: written in plane order
    (`common.plane_col`, H a multiple of 256), the order `nvfp4_wgmma` reads."""
    require(x, weight, what="the RMSNorm kernel")
    m, h = x.shape
    if out is None:
        out = torch.empty_like(x)
    block = next_pow2(h)
    if planes and h % 256:
        raise ValueError(f"plane order needs H a multiple of 256, got {h}")
    _add_rmsnorm_kernel[(m,)](
        x,
        delta if delta is not None else x,
        weight,
        out,
        h,
        float(eps),
        x.stride(0),
        delta.stride(0) if delta is not None else 0,
        out.stride(0),
        HAS_DELTA=delta is not None,
        BLOCK=block,
        PLANES=planes,
        num_warps=8 if block >= 4096 else 4,
    )
    return out
