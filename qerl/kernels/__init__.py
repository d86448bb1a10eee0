"""GPU kernels (Triton) beside the plain-PyTorch references they must match.

One op per file:
- `nvfp4_matmul.py`, `mxfp4_matmul.py`: `torch.ops.qerl.{nvfp4,mxfp4}_matmul` (+ `_grad`),
  what `QuantLinear(backend="triton")` calls. Few rows: `fused_linear`; many rows:
  `dequant` into one shared bf16 buffer + cuBLAS.
- `fused_linear.py`: the one-pass W4A16 / bf16 linear for decode (CUDA cores at 1-4 rows,
  tensor cores up to 64), with bias, LoRA and gate/up (SiLU) epilogues fused; on Hopper its NVFP4
  rows go to `nvfp4_mma.py` (`mma.sync` fed from registers, 1-32 rows, used up to 8) and
  `nvfp4_wgmma.py` (warpgroup MMA, x in shared memory, 9-128 rows).
- `lora_shrink.py`: x @ A.T (split-K partials) for the fused LoRA epilogue.
- `rmsnorm.py`, `rope_cache.py`, `decode_attention.py`: the rest of the decode step
  (`qerl.engine_cuda`).

Nothing here is imported by the CPU path. A kernel asked for where it cannot run
raises `KernelUnavailable` (no silent fallback to the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, KernelUnavailable, require

__all__ = ["HAS_TRITON", "KernelUnavailable", "quant_matmul", "available"]


def available() -> bool:
    return HAS_TRITON and torch.cuda.is_available()


def quant_matmul(x: torch.Tensor, module) -> torch.Tensor:
    """x @ deq(W).T for a `QuantLinear` (no bias, no LoRA: the module adds those)."""
    fmt = module.format.name
    require(x, what=f"QuantLinear(backend='{module.backend}')")
    if fmt == "nvfp4":
        from . import nvfp4_matmul  # noqa: F401  (registers the op)

        return torch.ops.qerl.nvfp4_matmul(x, module.weight_packed, module.weight_scale, module.weight_global_scale)
    if fmt == "mxfp4":
        from . import mxfp4_matmul  # noqa: F401

        return torch.ops.qerl.mxfp4_matmul(x, module.weight_packed, module.weight_scale)
    if fmt == "bf16":
        return F.linear(x, module.weight.to(x.dtype))  # cuBLAS: nothing to dequantize
    raise KernelUnavailable(f"no GPU kernel for the '{fmt}' format; use backend='reference' for it")
