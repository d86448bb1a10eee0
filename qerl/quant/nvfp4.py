"""NVFP4: E2M1 elements, one FP8 E4M3 scale per 16 values along K, one FP32 scale per tensor.

Follows the compressed-tensors convention (what vLLM loads) bit for bit; see
`docs/formats.md` section 1. All arithmetic is fp32 and in this order, because the order
decides the last bit of the FP8 scales:

    global_scale = 448 * 6 / amax(|W|)
    block_scale  = e4m3(global_scale * (amax_block / 6))     (0 -> 0.125, FP8's eps)
    code         = rne_e2m1(W / (float(block_scale) / global_scale))
    W'           = e2m1(code) * (float(block_scale) / global_scale)
"""

import torch

from .e2m1 import E2M1_MAX, decode_packed, e2m1_encode, e2m1_lut, pack_nibbles

BLOCK = 16
FP8_MAX = 448.0
# compressed-tensors replaces a zero FP8 scale by the dtype's eps (0.125); the block's
# codes are all zero, so the value only has to be positive and finite.
ZERO_BLOCK_SCALE = 0.125


def nvfp4_global_scale(weight: torch.Tensor) -> torch.Tensor:
    """FP32 [1] tensor scale 448*6/amax; an all-zero tensor gets 1.0."""
    amax = weight.detach().abs().amax().float().clamp(min=torch.finfo(torch.float32).tiny)
    gs = (FP8_MAX * E2M1_MAX) / amax
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def nvfp4_quantize(weight: torch.Tensor, global_scale: torch.Tensor | None = None) -> dict:
    """Quantize a [N, K] weight (K % 16 == 0) to compressed-tensors NVFP4 tensors.

    ``global_scale`` overrides the tensor scale: fused q/k/v and gate/up groups pass
    the minimum of their members' scales, as llm-compressor does for vLLM.
    """
    if weight.ndim != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"nvfp4 needs a 2-D weight with K % {BLOCK} == 0, got {tuple(weight.shape)}")
    n, k = weight.shape
    w = weight.detach().float()
    gs = nvfp4_global_scale(w) if global_scale is None else global_scale.detach().float().reshape(1).to(w.device)
    blocks = w.view(n, k // BLOCK, BLOCK)
    amax_block = blocks.abs().amax(dim=-1)  # [N, K/16]
    scale = (gs * (amax_block / E2M1_MAX)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    scale = torch.where(scale.float() == 0, torch.full_like(amax_block, ZERO_BLOCK_SCALE), scale.float())
    scale = scale.to(torch.float8_e4m3fn)
    step = scale.float() / gs  # [N, K/16] fp32 dequant step per block
    codes = e2m1_encode(blocks / step.unsqueeze(-1)).view(n, k)
    return {"weight_packed": pack_nibbles(codes), "weight_scale": scale, "weight_global_scale": gs}


def nvfp4_dequantize(d: dict, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    packed, scale, gs = d["weight_packed"], d["weight_scale"], d["weight_global_scale"]
    n = packed.shape[0]
    values = decode_packed(packed, e2m1_lut(packed.device)).view(n, -1, BLOCK)  # [N, K/16, 16]
    step = scale.float() / gs.float()
    return values.mul_(step.unsqueeze(-1)).view(n, -1).to(dtype)
