"""FP4 E2M1 elements: rounding, codes and nibble packing (plain PyTorch reference).

Shared by NVFP4 and MXFP4. Code layout: bit 3 is the sign, bits 0-2 index the
magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Code 8 is -0 (a negative value that
rounds to zero keeps its sign, as compressed-tensors does).

The rounding thresholds are round-to-nearest-even on the E2M1 grid, written out
as compressed-tensors writes them; do not "simplify" them into an argmin, which
breaks the ties (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
"""

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0


def e2m1_lut(device=None, dtype=torch.float32) -> torch.Tensor:
    """The 16 values a code decodes to, indexed by code (sign in bit 3)."""
    mags = torch.tensor(E2M1_VALUES, dtype=dtype, device=device)
    return torch.cat([mags, -mags])


# Magnitude thresholds: code = number of thresholds passed. `a > t` for ties that round
# down to the even neighbour, `a >= t` for ties that round up; values above 5 saturate at 6.
E2M1_THRESHOLDS = ((0.25, ">"), (0.75, ">="), (1.25, ">"), (1.75, ">="), (2.5, ">"), (3.5, ">="), (5.0, ">"))


def _boundaries(device) -> torch.Tensor:
    # bucketize counts boundaries strictly below a value (`a > b`); `a >= t` is the same
    # as `a > nextafter(t, 0)` in fp32, so one sorted list encodes both kinds of tie.
    t = torch.tensor([v for v, _ in E2M1_THRESHOLDS], dtype=torch.float32, device=device)
    ge = torch.tensor([op == ">=" for _, op in E2M1_THRESHOLDS], device=device)
    return torch.where(ge, torch.nextafter(t, torch.zeros_like(t)), t)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already divided by their scale) to E2M1 codes, uint8."""
    x = x.float()
    mag = torch.bucketize(x.abs(), _boundaries(x.device), right=False).to(torch.uint8)
    return mag | ((x < 0).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return e2m1_lut(codes.device, dtype)[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes -> [N, K/2] uint8; even column in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] codes."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def decode_packed(packed: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """[..., K/2] packed codes -> [..., K] values `lut[code]` (lut: the 16 values by code).

    One gather per byte from a 256-entry table of (low nibble, high nibble) value pairs: the same
    values as `lut[unpack_nibbles(packed)]`, ~2.5x faster on CPU (no unpacking, no int64 indices).
    """
    pairs = torch.stack([lut.repeat(16), lut.repeat_interleave(16)], dim=-1)  # [256, 2]: byte -> (lo, hi)
    values = torch.index_select(pairs, 0, packed.reshape(-1).int())
    return values.view(*packed.shape[:-1], packed.shape[-1] * 2)
