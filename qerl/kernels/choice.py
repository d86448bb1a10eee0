"""Which kernel computes a linear layer's product for m rows of x: one typed value, chosen in one place.

Every row threshold of the GPU path lives here (each the crossover of the kernels' timings on an H100/H200;
the measurements are dated in benchmarks/LOG.md). The decode engine and `QuantLinear`'s GPU forward ask
`choose_linear_kernel` and launch what it returns; nothing else decides.

| kernel     | serves                                                              | module             |
|------------|---------------------------------------------------------------------|--------------------|
| `MMA_SYNC` | NVFP4, bf16 x, sm_90+: 1-8 rows (1-32 where wgmma cannot run)       | `nvfp4_mma_sync`   |
| `WGMMA`    | NVFP4, bf16 x, sm_90: 9-128 rows                                     | `nvfp4_wgmma`      |
| `GEMV`     | NVFP4 / MXFP4 otherwise: 1-4 rows (CUDA cores)                       | `fp4_decode`       |
| `TC`       | NVFP4 / MXFP4 otherwise: 5-64 rows (tensor cores by `tl.dot`)        | `fp4_decode`       |
| `CUBLAS`   | bf16 weights, and every format past those rows: one layer           | `dequant` + cuBLAS |
|            | dequantized into a reused buffer, cuBLAS, then `linear_epilogue`     |                    |

Outside the decode step (`decode=False`: prefill and training forwards, where rows come in hundreds or
thousands and nothing is graph-captured) the one-pass kernels take at most `FORWARD_MAX_ROWS` rows.
"""

from __future__ import annotations

import enum
from collections.abc import Collection

import torch

from .nvfp4_mma_sync import MMA_MAX_M, mma_supported
from .nvfp4_wgmma import WG_MAX_M, wgmma_supported


class LinearKernel(enum.Enum):
    MMA_SYNC = "mma_sync"
    WGMMA = "wgmma"
    GEMV = "gemv"
    TC = "tc"
    CUBLAS = "cublas"


ALL_KERNELS = frozenset(LinearKernel)
MMA_SYNC_MAX_ROWS = 8  # mma.sync up to here where warpgroup MMA takes the rows above (H200: faster at 9-32)
WGMMA_MAX_ROWS = WG_MAX_M  # 128: x [BM, 256] a step in shared memory, BM is the wgmma N
GEMV_MAX_ROWS = 4  # CUDA cores up to here, `tc` from 5 rows (H100 sweep)
TC_MAX_ROWS = 64  # one tile of x; past it one dequantized layer + cuBLAS is faster
FORWARD_MAX_ROWS = 8  # prefill / training forwards: one-pass kernels up to here, else dequantize + cuBLAS


def choose_linear_kernel(
    m: int,
    fmt: str,
    k: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    decode: bool = True,
    allow: Collection[LinearKernel] = ALL_KERNELS,
) -> LinearKernel:
    """The kernel for m rows of x (dtype, on device) against a [*, k] weight in format fmt (nvfp4, mxfp4, bf16).

    decode: the engine's decode step (else a prefill/training forward: one-pass kernels up to FORWARD_MAX_ROWS).
    allow: the kernels that may be chosen (tests and benchmarks narrow it; CUBLAS is always allowed)."""
    fp4 = fmt in ("nvfp4", "mxfp4")
    mma_sync = fp4 and mma_supported(device, dtype, fmt, k)
    wgmma = fp4 and wgmma_supported(device, dtype, fmt, k)
    return kernel_for_rows(m, fp4=fp4, mma_sync=mma_sync, wgmma=wgmma, decode=decode, allow=allow)


def kernel_for_rows(
    m: int,
    *,
    fp4: bool,
    mma_sync: bool,
    wgmma: bool,
    decode: bool = True,
    allow: Collection[LinearKernel] = ALL_KERNELS,
) -> LinearKernel:
    """The rule itself, given what the weight and the GPU allow: fp4 (an NVFP4/MXFP4 weight), mma_sync and wgmma
    (those kernels can run this weight, dtype and K here). Offline tools model a GPU with it."""
    if not fp4 or (not decode and m > FORWARD_MAX_ROWS):
        return LinearKernel.CUBLAS
    wgmma = wgmma and LinearKernel.WGMMA in allow
    if mma_sync and LinearKernel.MMA_SYNC in allow and m <= (MMA_SYNC_MAX_ROWS if wgmma else MMA_MAX_M):
        return LinearKernel.MMA_SYNC
    if wgmma and m <= WGMMA_MAX_ROWS:
        return LinearKernel.WGMMA
    if m <= GEMV_MAX_ROWS and LinearKernel.GEMV in allow:
        return LinearKernel.GEMV
    if m <= TC_MAX_ROWS and LinearKernel.TC in allow:
        return LinearKernel.TC
    return LinearKernel.CUBLAS
