"""MXFP4 (OCP microscaling): E2M1 elements, one E8M0 power-of-two scale per 32 values, no tensor scale.

Follows compressed-tensors (`mxfp4-pack-quantized`): the block amax is rounded to a
power of two by adding half of the element mantissa's last step to the fp32 bits
and masking the mantissa off (so mantissas >= 1.75 round up), then the exponent is
offset by floor(log2(6)) = 2 so the block's largest values land in E2M1's range.
Values that still exceed 6 after scaling saturate, which is part of the format.
Scales are stored biased by 127 in uint8: scale = 2 ** (e - 127).
"""

import torch

from .e2m1 import decode_packed, e2m1_encode, e2m1_lut, pack_nibbles

BLOCK = 32
_ELEM_OFFSET = 2  # floor(log2(E2M1 max = 6))


def _round_pow2(x: torch.Tensor) -> torch.Tensor:
    """Nearest power of two in the E2M1 sense (fp32 bit trick of compressed-tensors)."""
    bits = x.float().contiguous().view(torch.int32)
    add = 1 << (23 - 1 - 1)  # fp32 mantissa 23 bits, element mantissa 1 bit
    mask = ((1 << 9) - 1) << 23  # sign + exponent
    return ((bits + add) & mask).view(torch.float32)


def mxfp4_quantize(weight: torch.Tensor) -> dict:
    if weight.ndim != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"mxfp4 needs a 2-D weight with K % {BLOCK} == 0, got {tuple(weight.shape)}")
    n, k = weight.shape
    blocks = weight.detach().float().view(n, k // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=-1)
    p2 = _round_pow2(amax)
    # An all-zero block has p2 = 0; give it the smallest scale (its codes are 0 anyway).
    exp = torch.where(p2 > 0, torch.log2(p2.clamp(min=2.0**-126)).floor() + 127 - _ELEM_OFFSET, torch.zeros_like(p2))
    exp = exp.clamp(0, 254)
    step = torch.exp2(exp - 127)
    codes = e2m1_encode(blocks / step.unsqueeze(-1)).view(n, k)
    return {"weight_packed": pack_nibbles(codes), "weight_scale": exp.to(torch.uint8)}


def mxfp4_dequantize(d: dict, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    packed, scale = d["weight_packed"], d["weight_scale"]
    n = packed.shape[0]
    values = decode_packed(packed, e2m1_lut(packed.device)).view(n, -1, BLOCK)
    step = torch.exp2(scale.float() - 127)
    return values.mul_(step.unsqueeze(-1)).view(n, -1).to(dtype)
