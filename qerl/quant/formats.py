"""One interface over the weight formats: a name -> `WeightFormat` registry.

Every format maps a [N, K] weight to a dict of named tensors (the names used in
checkpoints) and back. bf16 is the unquantized LoRA baseline: its dict holds the
weight itself.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .mxfp4 import mxfp4_dequantize, mxfp4_quantize
from .nf4 import nf4_dequantize, nf4_quantize
from .nvfp4 import nvfp4_dequantize, nvfp4_quantize


@dataclass(frozen=True)
class WeightFormat:
    name: str
    block_size: int  # K must be divisible by this (1 = any K)
    bits_per_weight: float  # storage, scales included (per-tensor scalars ignored)
    quantize: Callable[..., dict]
    dequantize: Callable[[dict, torch.dtype], torch.Tensor]
    fused_global_scale: bool = False  # True where fused q/k/v, gate/up share a tensor scale


def _bf16_quantize(weight: torch.Tensor) -> dict:
    return {"weight": weight.detach().to(torch.bfloat16)}


def _bf16_dequantize(d: dict, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return d["weight"].to(dtype)


FORMATS: dict[str, WeightFormat] = {
    "nvfp4": WeightFormat("nvfp4", 16, 4.5, nvfp4_quantize, nvfp4_dequantize, fused_global_scale=True),
    "mxfp4": WeightFormat("mxfp4", 32, 4.25, mxfp4_quantize, mxfp4_dequantize),
    "nf4": WeightFormat("nf4", 64, 4.5, nf4_quantize, nf4_dequantize),
    "bf16": WeightFormat("bf16", 1, 16.0, _bf16_quantize, _bf16_dequantize),
}


class FormatError(ValueError):
    pass


def get_format(name: str) -> WeightFormat:
    key = name.lower()
    if key not in FORMATS:
        raise FormatError(f"unknown weight format '{name}'; choose one of: {', '.join(FORMATS)}")
    return FORMATS[key]
