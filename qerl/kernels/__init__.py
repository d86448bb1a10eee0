"""GPU kernels (Triton and Gluon) beside the plain-PyTorch references they must match (`qerl.quant`).

One op per file; which one runs is chosen in one place (`choice.choose_linear_kernel`):
- `fused_linear.py`: the linear's front door (decode step: bias, LoRA and SiLU gate fused; `fp4_matmul` for
  prefill and training), dispatching to
  - `nvfp4_mma_sync.py` (NVFP4, Hopper, register-fed `mma.sync`, 1-8 rows),
  - `nvfp4_wgmma.py` (NVFP4, Hopper, warpgroup MMA, 9-128 rows),
  - `fp4_decode.py` (NVFP4/MXFP4 elsewhere: `gemv` CUDA-core and `tc` tensor-core tiles, 1-64 rows),
  - `dequant.py` + cuBLAS (bf16 weights and more rows), then `linear_epilogue.py` (bias, LoRA, gate).
- `lora_shrink.py`: x @ A.T as split-K partials for the LoRA epilogue.
- `rmsnorm.py`, `rope_cache.py`, `decode_attention.py`: the rest of the decode step (`qerl.rollout.cuda`);
  `token_draw.py`: the token drawn between steps (reference: `qerl.rollout.sampling.sample_tokens`).
- `nvfp4_matmul.py`, `mxfp4_matmul.py`: the custom ops `QuantLinear(backend="triton")` calls.
- `common.py`: what several kernels share (availability, launch helpers, device functions).

Nothing here is imported by the CPU path. A kernel asked for where it cannot run raises
`KernelUnavailable` (no silent fallback to the reference). Developer tooling (machine code, offline sm_90
compiles) is in `dev/sass.py`, outside the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import HAS_TRITON, KernelUnavailable, require

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
