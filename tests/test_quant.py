"""Weight formats, bit for bit.

qerl's vectorized quantizers (threshold bucketing, fp32 bit tricks) are checked against two
independent references:
  1. plain per-element loops written here from the rules in `docs/formats.md` sections 1-2
     (nearest grid value by distance with explicit tie-to-even, FP8 by nearest table entry);
  2. the compressed-tensors package's own functions (the convention vLLM loads).
Codes and scales must agree exactly; reconstructions are bounded by measured relative errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from qerl.quant import (
    FormatError,
    get_format,
    mxfp4_dequantize,
    mxfp4_quantize,
    nf4_dequantize,
    nf4_quantize,
    nvfp4_dequantize,
    nvfp4_global_scale,
    nvfp4_quantize,
)
from qerl.quant.e2m1 import e2m1_decode, e2m1_encode, pack_nibbles, unpack_nibbles
from qerl.quant.nf4 import NF4_CODEBOOK

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# --- independent plain references ------------------------------------------------------------
def ref_e2m1_code(a: float) -> int:
    """Round-to-nearest-even onto the E2M1 grid by distance; saturate at 6; sign in bit 3.

    'Even' = the neighbour whose mantissa bit is 0, i.e. the even code index
    (0 -> 0, 1.0 -> 2, 2.0 -> 4, 4.0 -> 6). A negative value that rounds to 0 keeps its sign (code 8).
    """
    mag = abs(a)
    if mag >= 6.0:
        idx = 7
    else:
        dists = [abs(mag - v) for v in E2M1]  # exact in float64 for fp32 inputs
        best = min(dists)
        ties = [i for i, d in enumerate(dists) if d == best]
        idx = ties[0] if len(ties) == 1 else next(i for i in ties if i % 2 == 0)
    return idx | (8 if a < 0 else 0)


def _e4m3_table() -> list[tuple[float, int]]:
    """(value, code) of every finite non-negative float8_e4m3fn, from the bit layout (no torch cast)."""
    out = []
    for code in range(0x7F):  # 0x7F is NaN
        e, m = code >> 3, code & 7
        v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        out.append((v, code))
    return out


E4M3 = _e4m3_table()


def ref_e4m3(x: float) -> float:
    """Round a non-negative value to FP8 E4M3, nearest, ties to even code, saturating at 448."""
    if x >= 448.0:
        return 448.0
    best = min(abs(x - v) for v, _ in E4M3)
    ties = [(v, c) for v, c in E4M3 if abs(x - v) == best]
    return ties[0][0] if len(ties) == 1 else next(v for v, c in ties if c % 2 == 0)


def f32(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def ref_nvfp4(w: torch.Tensor, global_scale: float | None = None):
    """-> (codes [N, K] int, block scales [N, K/16] float, global scale float), compressed-tensors rules.

    Arithmetic in fp32 and in the spec's order: gs = 2688 / amax; s = e4m3(gs * (amax_b / 6));
    code = rne(x / (s / gs)); a zero scale becomes 0.125. compressed-tensors writes gs as
    `448 * 6 / amax` with a Python float over a tensor, which torch evaluates as
    `reciprocal(amax) * 2688`: one ulp away from a true division for about a quarter of all amax
    values (see test_nvfp4_global_scale_is_reciprocal_times_2688), so the reference does the same.
    """
    w = w.float()
    n, k = w.shape
    gs = (f32(1.0) / w.abs().max()) * f32(448.0 * 6.0) if global_scale is None else f32(global_scale)
    codes = [[0] * k for _ in range(n)]
    scales = [[0.0] * (k // 16) for _ in range(n)]
    for r in range(n):
        for b in range(k // 16):
            blk = w[r, 16 * b : 16 * (b + 1)]
            s = ref_e4m3(float(gs * (blk.abs().max() / f32(6.0))))
            s = 0.125 if s == 0 else s
            scales[r][b] = s
            step = f32(s) / gs
            for j, x in enumerate((blk / step).tolist()):
                codes[r][16 * b + j] = ref_e2m1_code(x)
    return torch.tensor(codes), torch.tensor(scales), float(gs)


def ref_mxfp4(w: torch.Tensor):
    """-> (codes, biased E8M0 exponents or None for all-zero blocks).

    Power of two of the block amax rounded at mantissa 1.75 (amax = M * 2^E, M in [1, 2): E+1 when
    M >= 1.75), minus floor(log2 6) = 2 so the block max lands in E2M1's range.
    """
    w = w.float()
    n, k = w.shape
    codes = [[0] * k for _ in range(n)]
    exps = [[None] * (k // 32) for _ in range(n)]
    for r in range(n):
        for b in range(k // 32):
            blk = w[r, 32 * b : 32 * (b + 1)].tolist()
            amax = max(abs(x) for x in blk)
            if amax == 0:
                continue
            frac, e = math.frexp(amax)  # amax = frac * 2**e, frac in [0.5, 1)
            mant, exp = 2 * frac, e - 1
            if mant >= 1.75:
                exp += 1
            exps[r][b] = exp - 2 + 127
            for j, x in enumerate(blk):
                codes[r][32 * b + j] = ref_e2m1_code(x / 2.0 ** (exp - 2))  # power-of-two division: exact
    return torch.tensor(codes), exps


# bitsandbytes csrc/kernels.cu dQuantizeNF4: a decision tree of `x > t` on these fp32 literals
# (midpoints of adjacent codebook entries), so a value exactly on a threshold takes the lower code.
BNB_NF4_THRESHOLDS = (
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
)
BNB_T32 = torch.tensor(BNB_NF4_THRESHOLDS, dtype=torch.float32).tolist()


def ref_nf4_codes(w: torch.Tensor):
    """bitsandbytes' rule: code = number of fp32 thresholds strictly below x / absmax (fp32 division)."""
    w = w.float()
    n, k = w.shape
    codes = [[0] * k for _ in range(n)]
    absmax = w.view(n, k // 64, 64).abs().amax(-1)
    for r in range(n):
        for b in range(k // 64):
            a = absmax[r, b]
            normed = (w[r, 64 * b : 64 * (b + 1)] / (a if a > 0 else f32(1.0))).tolist()
            for j, x in enumerate(normed):
                codes[r][64 * b + j] = sum(x > t for t in BNB_T32)
    return torch.tensor(codes), absmax


# --- crafted inputs ----------------------------------------------------------------------------
def crafted_nvfp4_weight() -> torch.Tensor:
    """[8, 64]: amax 2688 makes gs exactly 1, so a block with amax 6 has scale 1 and step 1.

    row 0 block 0: every E2M1 tie (x.25/.75/.5 midpoints), both signs, the subnormal 0.5
    row 0 block 1: all zeros (scale underflows -> 0.125)
    row 0 block 2: amax 6.375 -> e4m3(1.0625) ties down to 1.0 -> 6.375 saturates at 6
    row 0 block 3: scale in the FP8 subnormal range (amax 0.06 -> e4m3(0.01) = 5 * 2^-9)
    row 1: the huge outlier 2688; rows 2-7: random normal (their scales are tiny vs the outlier)
    """
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g) * 0.5
    w[0, :16] = torch.tensor([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 0.5])
    w[0, 16:32] = 0
    w[0, 32:48] = torch.tensor([6.375, -6.375, 0.2, 0.3] + [1.0] * 12)
    w[0, 48:64] = torch.linspace(-0.06, 0.06, 16)
    w[1, 7] = 2688.0
    return w


def test_e2m1_grid_and_ties_hand_values():
    x = torch.tensor(
        [0.0, 0.25, 0.2500001, 0.5, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.0001, 6.0, 100.0, -0.1, -0.75, -5.0, -7.0]
    )
    expected = [0, 0, 1, 1, 2, 2, 4, 4, 6, 6, 7, 7, 7, 8, 10, 14, 15]
    assert e2m1_encode(x).tolist() == expected
    assert [ref_e2m1_code(v) for v in x.tolist()] == expected
    assert e2m1_decode(torch.arange(16)).tolist() == list(E2M1) + [-v for v in E2M1]


def test_nvfp4_crafted_hand_values():
    w = crafted_nvfp4_weight()
    d = nvfp4_quantize(w)
    assert d["weight_global_scale"].dtype == torch.float32 and d["weight_global_scale"].tolist() == [1.0]
    codes = unpack_nibbles(d["weight_packed"])
    assert codes[0, :16].tolist() == [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 1]
    scale = d["weight_scale"].float()
    assert scale[0, 0] == 1.0
    assert scale[0, 1] == 0.125 and codes[0, 16:32].tolist() == [0] * 16  # zero block: tiny positive scale
    assert scale[0, 2] == 1.0 and codes[0, 32:36].tolist() == [7, 15, 0, 1]  # saturation at +-6
    assert scale[0, 3] == 5 * 2.0**-9  # FP8 subnormal
    assert scale[1, 0] == 448.0  # the outlier's block uses the whole FP8 range


def _nvfp4_cases():
    g = torch.Generator().manual_seed(1)
    big = torch.randn(32, 128, generator=g)
    big[3, 17] = 1e4  # outlier: most block scales underflow into FP8 subnormals or to 0 -> 0.125
    big[5] = 0.0
    tiny = torch.randn(16, 64, generator=g) * 1e-3
    return {
        "crafted": crafted_nvfp4_weight(),
        "outlier": big,
        "small": tiny,
        "bf16": torch.randn(16, 64, generator=g).to(torch.bfloat16),
    }


@pytest.mark.parametrize("case", ["crafted", "outlier", "small", "bf16"])
def test_nvfp4_matches_plain_reference(case):
    w = _nvfp4_cases()[case]
    d = nvfp4_quantize(w)
    codes, scales, gs = ref_nvfp4(w)
    assert d["weight_packed"].dtype == torch.uint8 and d["weight_packed"].shape == (w.shape[0], w.shape[1] // 2)
    assert d["weight_scale"].dtype == torch.float8_e4m3fn and d["weight_scale"].shape == (w.shape[0], w.shape[1] // 16)
    assert d["weight_global_scale"].shape == (1,) and d["weight_global_scale"].item() == gs
    assert torch.equal(d["weight_scale"].float(), scales)
    assert torch.equal(unpack_nibbles(d["weight_packed"]).long(), codes)
    # dequant: e2m1(code) * (scale / gs), in fp32
    expected = torch.tensor([[E2M1[c & 7] * (-1 if c & 8 else 1) for c in row] for row in codes.tolist()])
    expected = expected * (scales / torch.tensor(gs)).repeat_interleave(16, dim=1)
    assert torch.equal(nvfp4_dequantize(d, torch.float32), expected)


def test_nvfp4_global_scale_is_reciprocal_times_2688(ct):
    # amax = 7/64: the true quotient 2688 / 0.109375 is exactly 24576, but compressed-tensors'
    # `448 * 6 / amax` (torch: reciprocal, then multiply) gives 24576.001953125. Checkpoints written
    # by llm-compressor carry the latter; qerl must write the same bits.
    w = torch.zeros(2, 16)
    w[1, 3] = -0.109375
    assert ct["gparam"](w.min(), w.max()).tolist() == [24576.001953125]
    assert nvfp4_global_scale(w).tolist() == [24576.001953125]
    assert nvfp4_quantize(w)["weight_global_scale"].tolist() == [24576.001953125]
    assert ref_nvfp4(w)[2] == 24576.001953125


def test_nvfp4_scale_arithmetic_order(ct):
    # With a fused group's shared global scale, gs * (amax / 6) and (gs * amax) / 6 can land on
    # opposite sides of an FP8 rounding midpoint. Spec order (compressed-tensors): divide first.
    w = torch.zeros(1, 16)
    w[0, 0] = 5.068450450897217
    gs = torch.tensor([0.019652826711535454])
    assert float(((gs * w.abs().max()) / 6).to(torch.float8_e4m3fn).float()) == 0.015625  # the other order
    assert nvfp4_quantize(w, global_scale=gs)["weight_scale"].float().tolist() == [[0.017578125]]
    assert ref_nvfp4(w, float(gs))[1].tolist() == [[0.017578125]]
    args = ct["QuantizationArgs"](
        num_bits=4,
        type="float",
        strategy="tensor_group",
        group_size=16,
        symmetric=True,
        dynamic=False,
        scale_dtype=torch.float8_e4m3fn,
    )
    scale, _ = ct["qparams"](w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), args, global_scale=gs)
    assert scale.float().tolist() == [[0.017578125]]


def test_nvfp4_override_global_scale_matches_reference():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    own = nvfp4_global_scale(w).item()
    shared = own / 3.7  # a fused group member whose amax is 3.7x smaller than the group's largest
    d = nvfp4_quantize(w, global_scale=torch.tensor([shared]))
    codes, scales, gs = ref_nvfp4(w, shared)
    assert d["weight_global_scale"].item() == gs == pytest.approx(shared)
    assert torch.equal(d["weight_scale"].float(), scales)
    assert torch.equal(unpack_nibbles(d["weight_packed"]).long(), codes)
    assert not torch.equal(d["weight_scale"], nvfp4_quantize(w)["weight_scale"])


# --- second reference: the compressed-tensors package itself --------------------------------
@pytest.fixture(scope="module")
def ct():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    return dict(
        pack=pack_fp4_to_uint8,
        quantize=quantize,
        dequantize=dequantize,
        qparams=calculate_qparams,
        gparam=generate_gparam,
        QuantizationArgs=QuantizationArgs,
    )


@pytest.mark.parametrize("case", ["crafted", "outlier", "small", "bf16"])
def test_nvfp4_matches_compressed_tensors(ct, case):
    w = _nvfp4_cases()[case].float()
    n, k = w.shape
    args = ct["QuantizationArgs"](
        num_bits=4,
        type="float",
        strategy="tensor_group",
        group_size=16,
        symmetric=True,
        dynamic=False,
        scale_dtype=torch.float8_e4m3fn,
    )
    gs = ct["gparam"](w.min(), w.max())
    blocks = w.view(n, k // 16, 16)
    scale, zp = ct["qparams"](blocks.amin(-1), blocks.amax(-1), args, global_scale=gs)
    packed = ct["pack"](ct["quantize"](w, scale, zp, args, global_scale=gs))
    d = nvfp4_quantize(w)
    assert torch.equal(d["weight_global_scale"], gs)
    assert torch.equal(d["weight_scale"].float(), scale.float())
    assert torch.equal(d["weight_packed"], packed)
    ref = ct["dequantize"](
        ct["quantize"](w, scale, zp, args, global_scale=gs), scale, zp, args, dtype=torch.float32, global_scale=gs
    )
    torch.testing.assert_close(nvfp4_dequantize(d, torch.float32), ref, rtol=1e-6, atol=0)


def test_mxfp4_matches_compressed_tensors(ct):
    w = _mxfp4_weight()
    n, k = w.shape
    args = ct["QuantizationArgs"](
        num_bits=4, type="float", strategy="group", group_size=32, symmetric=True, scale_dtype=torch.uint8
    )
    blocks = w.view(n, k // 32, 32)
    scale, zp = ct["qparams"](blocks.amin(-1), blocks.amax(-1), args)  # float powers of two
    packed = ct["pack"](ct["quantize"](w, scale, zp, args))
    d = mxfp4_quantize(w)
    nonzero = blocks.abs().amax(-1) > 0
    assert torch.equal(torch.exp2(d["weight_scale"].float() - 127)[nonzero], scale[nonzero])
    assert torch.equal(d["weight_packed"], packed)


# --- packing -------------------------------------------------------------------------------------
def test_packing_low_nibble_is_even_column():
    codes = torch.tensor([[1, 7, 0, 15, 8, 2]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x71, 0xF0, 0x28]]
    assert torch.equal(unpack_nibbles(packed), codes)
    # through the quantizer: with gs = 1 and a block amax of 6, 0.5 -> code 1 (even col), 6 -> code 7 (odd col)
    w = torch.zeros(1, 16)
    w[0, :2] = torch.tensor([0.5, 6.0])
    d = nvfp4_quantize(w, global_scale=torch.tensor([1.0]))
    assert d["weight_packed"][0, 0].item() == 0x71


def test_unpack_matches_compressed_tensors(ct):
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    packed = torch.randint(0, 256, (4, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ours = e2m1_decode(unpack_nibbles(packed))
    theirs = unpack_fp4_from_uint8(packed, 4, 16, dtype=torch.float32)
    assert torch.equal(ours, theirs)


# --- MXFP4 ---------------------------------------------------------------------------------------
def _mxfp4_weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 128, generator=g)
    w[0, :32] = 0  # all-zero block
    w[1, :32] = torch.tensor(
        [4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 0.5] + [0.0] * 16
    )  # amax 4 -> scale 2^0: exact ties
    w[2, :32] = 0.1
    w[2, 0] = 6.96  # mantissa 1.74 < 1.75: scale 2^0, 6.96 saturates at 6
    w[3, :32] = 0.1
    w[3, 0] = 7.0  # mantissa 1.75 rounds up: scale 2^1
    w[4, 40] = 3e4  # outlier: other blocks of the row are unaffected (no tensor scale)
    return w


def test_mxfp4_matches_plain_reference():
    w = _mxfp4_weight()
    d = mxfp4_quantize(w)
    codes, exps = ref_mxfp4(w)
    assert d["weight_scale"].dtype == torch.uint8 and d["weight_scale"].shape == (16, 4)
    assert torch.equal(unpack_nibbles(d["weight_packed"]).long(), codes)
    for r in range(16):
        for b in range(4):
            if exps[r][b] is not None:
                assert d["weight_scale"][r, b].item() == exps[r][b], (r, b)
    # hand values
    assert d["weight_scale"][1, 0].item() == 127 and codes[1, :16].tolist() == [
        6,
        0,
        2,
        2,
        4,
        4,
        6,
        6,
        8,
        10,
        10,
        12,
        12,
        14,
        14,
        1,
    ]
    assert d["weight_scale"][2, 0].item() == 127 and codes[2, 0].item() == 7
    assert d["weight_scale"][3, 0].item() == 128 and codes[3, 0].item() == 6  # 7.0 / 2 = 3.5 -> 4 (tie to even)
    assert codes[0, :32].tolist() == [0] * 32
    deq = mxfp4_dequantize(d, torch.float32)
    assert deq[0, :32].tolist() == [0.0] * 32 and deq[2, 0].item() == 6.0 and deq[3, 0].item() == 8.0


# --- NF4 -----------------------------------------------------------------------------------------
def test_nf4_codebook_is_qlora_normal_map():
    # QLoRA's create_normal_map(offset=0.9677083): normal quantiles, 8 positive, 7 negative, exact 0,
    # normalized to [-1, 1]. Derived here from the inverse normal CDF, not copied.
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    v = v / v.abs().max()
    torch.testing.assert_close(torch.tensor(NF4_CODEBOOK, dtype=torch.float64), v, atol=2e-7, rtol=0)


def test_nf4_matches_plain_reference():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 256, generator=g)
    w[0, :64] = 0
    w[1, 64] = 500.0
    book = torch.tensor(NF4_CODEBOOK)
    # values exactly on bitsandbytes' thresholds (absmax 1 -> normed = x) take the lower code,
    # the next fp32 value up the higher one
    t = torch.tensor(BNB_T32)
    w[2, :64] = 0
    w[2, 0] = 1.0
    w[2, 1:16] = t
    w[2, 16:31] = torch.nextafter(t, torch.full_like(t, 2.0))
    d = nf4_quantize(w)
    codes, absmax = ref_nf4_codes(w)
    assert torch.equal(d["weight_scale"], absmax)
    assert torch.equal(unpack_nibbles(d["weight_packed"]).long(), codes)
    assert codes[2, 1:16].tolist() == list(range(15))  # threshold i..i+1 -> lower entry i
    assert codes[2, 16:31].tolist() == list(range(1, 16))
    assert codes[0, :64].tolist() == [7] * 64  # zero block -> the exact 0 entry
    deq = nf4_dequantize(d, torch.float32)
    expected = book[codes].view(8, 4, 64) * absmax.unsqueeze(-1)
    assert torch.equal(deq, expected.view(8, 256))


# --- round trip and the common interface -------------------------------------------------------
# Relative Frobenius error ||W - deq(q(W))|| / ||W|| on N(0, 1) [256, 1024], measured over seeds 0-2:
#   nvfp4 0.0949-0.0953: E2M1 has 1 mantissa bit (relative grid steps of 1/3 to 1/2 within [1, 6]),
#       and the per-16 FP8 scale maps each block max onto 6, so the error is ~10% of RMS;
#   mxfp4 0.1116-0.1119: same elements, but the power-of-two scale leaves the block max anywhere in
#       [4, 8) (values above 6 saturate), losing up to one binade of resolution, and blocks are 32 wide;
#   nf4   0.0918-0.0921: 16 levels placed at normal quantiles, the best fit for Gaussian weights;
#   bf16  0.0017: 8 significant bits; round-to-nearest leaves ~0.2% RMS relative error.
# The bands are +-5%: tight enough that a wrong scale or a lost bit of rounding fails.
ROUND_TRIP = {"nvfp4": (0.090, 0.100), "mxfp4": (0.106, 0.117), "nf4": (0.087, 0.097), "bf16": (0.0010, 0.0025)}


@pytest.mark.parametrize("fmt", sorted(ROUND_TRIP))
def test_round_trip_error_on_normal_weights(fmt):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(7))
    f = get_format(fmt)
    deq = f.dequantize(f.quantize(w), torch.float32)
    err = float((deq - w).norm() / w.norm())
    lo, hi = ROUND_TRIP[fmt]
    assert lo < err < hi, err


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "nf4", "bf16"])
def test_format_interface_and_storage_cost(fmt):
    f = get_format(fmt.upper())  # names are case-insensitive
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(8))
    d = f.quantize(w)
    out = f.dequantize(d, torch.bfloat16)
    assert out.shape == w.shape and out.dtype == torch.bfloat16
    per_tensor = {"weight_global_scale"}  # scalars per tensor are not counted in bits_per_weight
    bits = sum(t.numel() * t.element_size() * 8 for n, t in d.items() if n not in per_tensor) / w.numel()
    assert bits == f.bits_per_weight
    if fmt != "bf16":
        assert "weight" not in d  # no full-precision copy
        assert w.shape[1] % f.block_size == 0
        with pytest.raises(ValueError, match="K %"):
            f.quantize(torch.randn(4, f.block_size + 8))


def test_unknown_format_is_one_line_error():
    with pytest.raises(FormatError) as e:
        get_format("fp3")
    msg = str(e.value)
    assert "\n" not in msg and "'fp3'" in msg and "nvfp4" in msg and "nf4" in msg
