"""NF4 (QLoRA's 4-bit NormalFloat): 16-entry codebook, one absmax scale per 64 values.

Departs from bitsandbytes in two documented ways: the absmax scales are kept in
fp32 (no double quantization, so 4.5 instead of ~4.13 bits per weight), and codes
are packed like the FP4 formats (even column in the low nibble). Rounding is to
the nearest codebook entry (midpoint thresholds), as bitsandbytes does.
"""

import torch

from .e2m1 import decode_packed, pack_nibbles

BLOCK = 64
NF4_CODEBOOK = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_quantize(weight: torch.Tensor) -> dict:
    if weight.ndim != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"nf4 needs a 2-D weight with K % {BLOCK} == 0, got {tuple(weight.shape)}")
    n, k = weight.shape
    blocks = weight.detach().float().view(n, k // BLOCK, BLOCK)
    absmax = blocks.abs().amax(dim=-1)  # [N, K/64]
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (blocks / safe.unsqueeze(-1)).view(n, k)
    book = torch.tensor(NF4_CODEBOOK, device=weight.device)
    mids = (book[1:] + book[:-1]) / 2  # 15 thresholds
    codes = torch.bucketize(normed, mids)  # ties go to the lower entry
    return {"weight_packed": pack_nibbles(codes), "weight_scale": absmax}


def nf4_dequantize(d: dict, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    packed, absmax = d["weight_packed"], d["weight_scale"]
    n = packed.shape[0]
    book = torch.tensor(NF4_CODEBOOK, device=packed.device)
    values = decode_packed(packed, book).view(n, -1, BLOCK)
    return values.mul_(absmax.float().unsqueeze(-1)).view(n, -1).to(dtype)
