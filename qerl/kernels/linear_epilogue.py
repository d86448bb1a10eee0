"""The fused epilogue of a linear over a precomputed product: one launch after cuBLAS (a [M, N_rows] product in
the activation dtype) or after a split-K decode kernel ([S, M, N_rows] fp32 partials, summed here).

y = round(p) (+ bias) (+ scale * h @ B.T) (gate|up: silu(g) * u), each step rounded to the output dtype as the
reference module (`QuantLinear.forward` then `F.silu(g) * u`) rounds. h = x @ A.T comes as split-K partials
[S_h, M, R_total] (`lora_shrink`, or the decode kernel's fused shrink), summed here. Rows may belong to up to 3
fused modules (q | k | v): row n uses segment (n >= n1) + (n >= n2), its own R columns of h and B.
The LoRA dot runs in tf32 for bf16/fp16 outputs (finer than their rounding), in fp32 otherwise.
"""

from __future__ import annotations

import torch

from .common import HAS_TRITON, h_splits_tile, lora_args, next_pow2, require, segment_bounds

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common import finish_tile, planes_tile

    @triton.jit
    def _epilogue_kernel(
        p_ptr,
        bias_ptr,
        h_ptr,
        lb_ptr,
        y_ptr,
        M,
        N,
        n1,
        n2,
        n_hsplit,
        lora_scale,
        stride_ps,
        stride_pm,
        stride_hs,
        stride_hm,
        stride_lbn,
        stride_ym,
        S: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_DOT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        LORA_R: tl.constexpr,
        LORA_RP: tl.constexpr,
        NSEG: tl.constexpr,
        HS_P: tl.constexpr,
        GLU: tl.constexpr,
        LORA_PREC: tl.constexpr = "ieee",
        PLANES: tl.constexpr = False,
    ):
        """Epilogue over a precomputed product: the sum of S partials p[s, M, N_rows] (a cuBLAS output when
        S = 1, rounded to its dtype like the reference matmul), + bias, + LoRA, (+ SiLU gate)."""
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = rm < M
        n_mask = rn < N
        msk = m_mask[:, None] & n_mask[None, :]
        out_ty: tl.constexpr = y_ptr.dtype.element_ty
        pp = p_ptr + rm[:, None] * stride_pm + rn[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(S):
            acc += tl.load(pp + s * stride_ps, mask=msk, other=0.0).to(tl.float32)
        seg = (rn >= n1).to(tl.int32) + (rn >= n2).to(tl.int32)
        y = finish_tile(
            acc,
            h_ptr,
            lb_ptr,
            bias_ptr,
            rm,
            m_mask,
            rn,
            n_mask,
            seg,
            n_hsplit,
            lora_scale,
            stride_hs,
            stride_hm,
            stride_lbn,
            out_ty,
            BLOCK_M,
            USE_DOT,
            HAS_BIAS,
            LORA_R,
            LORA_RP,
            NSEG,
            HS_P,
            LORA_PREC,
            True,
        )
        if GLU:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(S):
                acc += tl.load(pp + N + s * stride_ps, mask=msk, other=0.0).to(tl.float32)
            segu = (rn + N >= n1).to(tl.int32) + (rn + N >= n2).to(tl.int32)
            u = finish_tile(
                acc,
                h_ptr,
                lb_ptr,
                bias_ptr,
                rm,
                m_mask,
                rn + N,
                n_mask,
                segu,
                n_hsplit,
                lora_scale,
                stride_hs,
                stride_hm,
                stride_lbn,
                out_ty,
                BLOCK_M,
                USE_DOT,
                HAS_BIAS,
                LORA_R,
                LORA_RP,
                NSEG,
                HS_P,
                LORA_PREC,
                True,
            )
            g = y * tl.sigmoid(y)
            y = g.to(out_ty).to(tl.float32) * u
        if PLANES:  # y in plane order, as the next nvfp4_wgmma reads it: reordered here, stored contiguously
            y = planes_tile(y, BLOCK_M, BLOCK_N)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(out_ty), mask=msk)


def epilogue_tile(
    m: int, nseg: int, glu: bool, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None
) -> tuple[int, int, int]:
    """(rows, output columns, warps) a program of the epilogue launch for m rows of a product of nseg fused
    modules (the fastest tiles of the H200 sweep, `benchmarks/bench_epilogue_gpu.py`). Up to 4 rows: all rows,
    64 columns, the LoRA update by FMAs. From 5 rows, 16-row blocks (rows past m masked) and the tf32 dot: 32
    columns for fused modules (q|k|v, gate|up), 64 for one module (o, down), which past 16 rows takes 128
    columns; gate|up past 64 rows 32 x 64. Arguments given override."""
    if m <= 4:
        bm, bn = next_pow2(m), 64
    elif nseg > 1 or glu:
        bm, bn = (32, 64) if glu and m > 64 else (16, 32)
    else:
        bm, bn = 16, (64 if m <= 16 else 128)
    return block_m or bm, block_n or bn, num_warps or 4


def linear_epilogue(
    p: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_h: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    lora_rank: int = 0,
    lora_scale: float = 1.0,
    segments: tuple[int, int] | None = None,
    glu: bool = False,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
    lora_dot: bool | None = None,
    lora_prec: str | None = None,
    planes: bool = False,
) -> torch.Tensor:
    """The fused epilogue over a precomputed product p: [M, N_rows] (a cuBLAS output in the activation
    dtype) or [S, M, N_rows] fp32 split-K partials (summed). Same arguments as `fused_linear`; block_m,
    block_n, num_warps: rows and output columns a program, and its warps (default: `epilogue_tile`);
    lora_dot: the LoRA update by tl.dot (default from 16 rows a program) in lora_prec ("ieee" fp32 or "tf32";
    default: tf32 for a bf16/fp16 output, whose rounding (2**-9) is coarser than tf32's (2**-11)), else by FMAs.
    A tile skips the LoRA product of a fused module none of its rows belongs to (it would only add zeros).
    planes: y written in plane order (`common.plane_col`; N a multiple of 256), the order `nvfp4_wgmma` reads."""
    require(p, what="the linear epilogue kernel")
    p3 = p if p.ndim == 3 else p.unsqueeze(0)
    if p3.stride(2) != 1:
        raise ValueError("the product must have unit stride along N")
    s_, m, n_rows = p3.shape
    n = n_rows // 2 if glu else n_rows
    if out is None:
        out = torch.empty((m, n), dtype=p.dtype, device=p.device)
    n1, n2, nseg = segment_bounds(segments, n, n_rows, glu)
    lora, lora_rp = lora_args(lora_h, lora_B, lora_rank)
    bm, bn, num_warps = epilogue_tile(m, nseg, glu, block_m, block_n, num_warps)
    if planes:  # whole 256-column blocks a program, reordered in registers
        if n % 256:
            raise ValueError(f"y in plane order needs N a multiple of 256, got {n}")
        bn = 256
    dummy = p3
    _epilogue_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        p3,
        bias if bias is not None else dummy,
        lora_h if lora else dummy,
        lora_B if lora else dummy,
        out,
        m,
        n,
        n1,
        n2,
        lora_h.shape[0] if lora else 0,
        float(lora_scale),
        p3.stride(0),
        p3.stride(1),
        lora_h.stride(0) if lora else 0,
        lora_h.stride(1) if lora else 0,
        lora_B.stride(0) if lora else 0,
        out.stride(0),
        S=s_,
        BLOCK_M=bm,
        BLOCK_N=bn,
        USE_DOT=bm >= 16 if lora_dot is None else lora_dot,
        HAS_BIAS=bias is not None,
        LORA_R=lora,
        LORA_RP=lora_rp,
        NSEG=nseg,
        HS_P=h_splits_tile(lora_h, lora),
        GLU=glu,
        LORA_PREC=lora_prec or ("ieee" if out.dtype == torch.float32 else "tf32"),
        PLANES=planes,
        num_warps=num_warps,
    )
    return out
