"""The front door of the GPU linear: y = x @ deq(W).T (+ bias) (+ LoRA) (gate|up: SiLU gate), by the kernel that
`choice.choose_linear_kernel` names for the rows of x.

- `fused_linear`: the decode step's linear (`qerl.rollout.cuda`), with bias, live LoRA and the SiLU gate fused
  into the launches: a one-pass kernel (`nvfp4_mma_sync`, `nvfp4_wgmma`, `fp4_decode`) or one dequantized layer +
  cuBLAS, then `linear_epilogue`.
- `fp4_matmul` / `fp4_matmul_grad`: `QuantLinear`'s GPU product for prefill and training (no bias, no LoRA:
  the module adds those), behind the custom ops of `nvfp4_matmul.py` / `mxfp4_matmul.py`.

The plain-PyTorch reference every path is tested against: `qerl.quant` dequantize + matmul, then
`QuantLinear.forward`'s roundings (tests/test_kernels.py, tests/test_nvfp4_*.py).
"""

from __future__ import annotations

import torch

from .choice import LinearKernel, choose_linear_kernel
from .common import KernelUnavailable, partials_workspace, require, segment_bounds, to_planes
from .dequant import dequantize, shared_buffer
from .fp4_decode import decode_tiling, fp4_decode_linear, gemv_config, tc_config
from .linear_epilogue import linear_epilogue
from .lora_shrink import lora_shrink, partials_view
from .nvfp4_mma_sync import mma_config, mma_partials, mma_supported
from .nvfp4_wgmma import wgmma_config, wgmma_partials, wgmma_supported


def fused_linear(
    x: torch.Tensor,
    fmt: str,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    lora_h: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    lora_rank: int = 0,
    lora_scale: float = 1.0,
    segments: tuple[int, int] | None = None,
    glu: bool = False,
    out: torch.Tensor | None = None,
    *,
    lora_A: torch.Tensor | None = None,
    kernel: LinearKernel | None = None,
    config: dict | None = None,
    h_out: torch.Tensor | None = None,
    dense_out: torch.Tensor | None = None,
    product_out: torch.Tensor | None = None,
    x_planes: bool = False,
    out_planes: bool = False,
    partials_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] -> y [M, N] (or [M, N/2] with glu) in x.dtype.

    weight: nvfp4/mxfp4 packed uint8 [N, K/2] (+ scale [N, K/16] e4m3 or [N, K/32] e8m0, + global_scale fp32
    [n_segments] for nvfp4), or dense [N, K] (fmt "bf16").
    lora_h: [S, M, R_total] fp32 partial sums of x @ A.T; lora_B: [N, r] fp32. lora_A: [R_total, K] instead of
    lora_h: h computed by the product kernel itself where it can (no `lora_shrink` launch), else by `lora_shrink`.
    segments: (n1, n2) row boundaries of fused modules (q | k | v); with glu, rows of up start at N/2.
    kernel: which kernel (default: `choose_linear_kernel` for M rows); config: its tile (default: the kernel's
    table; a config with MMA / WGMMA / TC set names its kernel when kernel is None).
    h_out, dense_out, product_out: reused scratch (the engine's, so CUDA graphs keep their addresses) for h's
    partials (>= MAX_SPLITS * M * R_total fp32), one dequantized layer (>= N * K) and the cuBLAS product
    (>= M * N) in x.dtype; allocated when None. partials_out: fp32 split-K partials (>= `partials_numel`;
    when None, a buffer shared by all callers, `common.shared_scratch`).
    x_planes: x is in plane order (`common.plane_col`), as the decode step's producers write it for the
    `nvfp4_wgmma` kernel (only that kernel takes it); out_planes: write y in plane order (for the next one).
    """
    require(x, weight, what="the fused linear kernels")
    if fmt not in ("nvfp4", "mxfp4", "bf16"):
        raise ValueError(f"no fused linear kernel for format '{fmt}'")
    if x.ndim != 2 or x.stride(1) != 1:
        raise ValueError("x must be a 2-D tensor with unit stride along K")
    if weight.stride(1) != 1:
        raise ValueError("weight must be row-major")
    m, k = x.shape
    n_rows = weight.shape[0]
    kw = weight.shape[1] * (2 if fmt != "bf16" else 1)
    if kw != k:
        raise ValueError(f"x has K={k} but the weight has K={kw}")
    n = n_rows // 2 if glu else n_rows
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if kernel is None:
        kernel = _kernel_of(config) if config else choose_linear_kernel(m, fmt, k, x.device, x.dtype)
    if x_planes and kernel is not LinearKernel.WGMMA:
        raise ValueError(f"x in plane order is read by the wgmma kernel only, not {kernel.value}")
    epilogue = (bias, lora_h, lora_B, lora_rank, lora_scale, segments, glu, out, out_planes)
    if kernel is LinearKernel.CUBLAS:
        return _cublas_linear(x, fmt, weight, scale, global_scale, lora_A, h_out, dense_out, product_out, *epilogue)
    if fmt == "bf16":
        raise ValueError(f"the {kernel.value} kernel takes NVFP4/MXFP4 weights; bf16 weights use cuBLAS")
    if kernel in (LinearKernel.MMA_SYNC, LinearKernel.WGMMA):
        wg = kernel is LinearKernel.WGMMA
        if not (wgmma_supported if wg else mma_supported)(x.device, x.dtype, fmt, k):
            raise KernelUnavailable(f"{kernel.value} needs NVFP4, bf16 x, K % 256 == 0, a Hopper GPU and Gluon")
        cfg = config or (wgmma_config if wg else mma_config)(m, n, k)
        return _mma_linear(x, weight, scale, global_scale, cfg, wg, lora_A, h_out, partials_out, n, x_planes, *epilogue)
    cfg = config or (tc_config if kernel is LinearKernel.TC else gemv_config)(m, n, k)
    y = fp4_decode_linear(x, fmt, weight, scale, global_scale, *epilogue[:-1], n, cfg, lora_A, h_out, partials_out)
    return out.copy_(to_planes(y)) if out_planes else y  # (its fused epilogue writes natural order only)


def partials_numel(m: int, fmt: str, n_rows: int, k: int, glu: bool, kernel: LinearKernel) -> int:
    """fp32 split-K partials that `fused_linear` writes for m rows of x against an [n_rows, k] weight with
    `kernel` and its default tile (0: none; a caller's `partials_out` must hold at least this many)."""
    n = n_rows // 2 if glu else n_rows
    if kernel in (LinearKernel.MMA_SYNC, LinearKernel.WGMMA):
        return (wgmma_config if kernel is LinearKernel.WGMMA else mma_config)(m, n, k)["SPLIT"] * m * n_rows
    if kernel in (LinearKernel.GEMV, LinearKernel.TC):
        cfg = (tc_config if kernel is LinearKernel.TC else gemv_config)(m, n, k)
        split = decode_tiling(fmt, m, k, cfg, True)[0]
        return split * m * n_rows if split > 1 else 0
    return 0


def _kernel_of(config: dict) -> LinearKernel:
    if config.get("WGMMA"):
        return LinearKernel.WGMMA
    if config.get("MMA"):
        return LinearKernel.MMA_SYNC
    return LinearKernel.TC if config.get("TC") else LinearKernel.GEMV


def _mma_linear(x, weight, scale, global_scale, cfg, wg, lora_A, h_out, partials_out, n, x_planes, *epilogue):
    """fp32 partials by `nvfp4_mma_sync` / `nvfp4_wgmma` (whose extra programs also write the LoRA shrink's
    partials when given lora_A), then the epilogue launch."""
    bias, lora_h, lora_B, lora_rank, lora_scale, segments, glu, out, planes = epilogue
    m, n_rows = x.shape[0], weight.shape[0]
    fuse_shrink = lora_A is not None and lora_h is None
    if fuse_shrink:
        lora_h = partials_view(h_out, cfg["SPLIT"], m, lora_A.shape[0], x.device)
    n1, n2, _ = segment_bounds(segments, n, n_rows, glu)
    w32 = weight.view(torch.int32) if weight.dtype == torch.uint8 else weight
    ws = partials_workspace(cfg["SPLIT"] * m * n_rows, x.device, partials_out).view(cfg["SPLIT"], m, n_rows)
    shrink = (lora_A, lora_h) if fuse_shrink else (None, None)
    if wg:
        wgmma_partials(x, w32, scale.view(torch.uint8), global_scale, n1, n2, cfg, ws, *shrink, x_planes=x_planes)
    else:
        mma_partials(x, w32, scale.view(torch.uint8), global_scale, n1, n2, cfg, ws, *shrink)
    return linear_epilogue(ws, bias, lora_h, lora_B, lora_rank, lora_scale, segments, glu, out, planes=planes)


def _cublas_linear(x, fmt, weight, scale, global_scale, lora_A, h_out, dense_out, product_out, *epilogue):
    """One layer dequantized (per fused module: each has its own NVFP4 global scale) into a reused buffer, one
    cuBLAS product, then the epilogue launch."""
    bias, lora_h, lora_B, lora_rank, lora_scale, segments, glu, out, planes = epilogue
    m, k = x.shape
    n_rows = weight.shape[0]
    if lora_A is not None and lora_h is None and lora_rank:
        lora_h = lora_shrink(x, lora_A, out=h_out)
    if fmt == "bf16":
        w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    else:
        w = (
            dense_out[: n_rows * k].view(n_rows, k)
            if dense_out is not None
            else shared_buffer(n_rows, k, x.dtype, x.device)
        )
        n1, n2, _ = segment_bounds(segments, n_rows // 2 if glu else n_rows, n_rows, glu)
        bounds = [0] + [b for b in (n1, n2) if b < n_rows] + [n_rows]
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            gs = global_scale[i : i + 1] if global_scale is not None and global_scale.numel() > 1 else global_scale
            dequantize(fmt, weight[lo:hi], scale[lo:hi], gs, x.dtype, out=w[lo:hi])
    y0 = (
        product_out[: m * n_rows].view(m, n_rows)
        if product_out is not None
        else torch.empty((m, n_rows), dtype=x.dtype, device=x.device)
    )
    torch.mm(x, w.t(), out=y0)
    return linear_epilogue(y0, bias, lora_h, lora_B, lora_rank, lora_scale, segments, glu, out, planes=planes)


def fp4_matmul(
    fmt: str, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None
) -> torch.Tensor:
    """y = x @ deq(W).T for x [..., K]: a one-pass kernel for few rows, else the shared dequantization buffer
    (`dequant.shared_buffer`) + cuBLAS (`choose_linear_kernel(decode=False)`)."""
    require(x, packed, what=f"the {fmt} matmul kernels")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = packed.shape[0]
    kernel = choose_linear_kernel(x2.shape[0], fmt, x2.shape[1], x.device, x.dtype, decode=False)
    if kernel is not LinearKernel.CUBLAS:
        y = fused_linear(x2, fmt, packed, scale, global_scale, kernel=kernel)
    else:
        w = dequantize(fmt, packed, scale, global_scale, x.dtype, out=shared_buffer(n, x2.shape[1], x.dtype, x.device))
        y = x2 @ w.T
    return y.reshape(*lead, n)


def fp4_matmul_grad(
    fmt: str, g: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None
) -> torch.Tensor:
    """dx = g @ deq(W) for g [..., N] (the weight is frozen: no weight gradient)."""
    require(g, packed, what=f"the {fmt} matmul kernels")
    n, kh = packed.shape
    w = dequantize(fmt, packed, scale, global_scale, g.dtype, out=shared_buffer(n, 2 * kh, g.dtype, g.device))
    return (g.reshape(-1, n) @ w).reshape(*g.shape[:-1], 2 * kh)
