"""What the kernels share: whether they can run here (and the one error raised when they cannot), the host-side
helpers of the fused linear launches, and the Triton and Gluon device functions more than one kernel calls.

Asking for a kernel where it cannot run (no Triton, a CPU tensor) raises
`KernelUnavailable` instead of quietly falling back to the slow reference path, so a
benchmark or a rollout never reports reference-path numbers as kernel numbers.
`TRITON_INTERPRET=1` runs the kernels on CPU tensors (slowly) for debugging.
"""

from __future__ import annotations

import functools
import os

import torch

from qerl.errors import QerlError

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the reference path needs none of this
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class KernelUnavailable(QerlError):
    """A GPU kernel was requested where it cannot run."""


def require(*tensors: torch.Tensor, what: str = "qerl GPU kernels"):
    if not HAS_TRITON:
        raise KernelUnavailable(f"{what} need Triton (pip install triton); use backend='reference' on this machine")
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not INTERPRET:
            raise KernelUnavailable(
                f"{what} need CUDA tensors, got a tensor on {t.device}; use backend='reference' on this device"
            )


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


FMT_CODES = {"nvfp4": 0, "mxfp4": 1, "bf16": 2}  # the FMT constexpr of the Triton kernels


# ---- host side of the fused linear launches -----------------------------------------------------------------
_SHARED: dict[tuple, torch.Tensor] = {}  # (what, device, dtype) -> the one scratch buffer of that kind
_IN_GRAPHS: set[tuple] = set()  # keys whose current buffer a CUDA graph capture took
_RETIRED: list[torch.Tensor] = []  # outgrown buffers that captured graphs may still use: kept, never freed


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def shared_scratch(what: str, numel: int, dtype, device) -> torch.Tensor:
    """`numel` values of the one scratch buffer named `what` for (device, dtype), shared by every caller whose
    use of it ends in stream order before the next one's begins. It grows by replacement. A buffer that a CUDA
    graph capture took is kept when outgrown (in `_RETIRED`), not freed: the graph goes on using its address,
    which the allocator would otherwise hand to other tensors (the 7B NVFP4 step lost its AdamW state that
    way). The decode engine brings buffers of its own instead (sized for every bucket at once)."""
    key = (what, torch.device(device), dtype)
    buf = _SHARED.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None and key in _IN_GRAPHS:
            _RETIRED.append(buf)
        _IN_GRAPHS.discard(key)
        buf = torch.empty(max(numel, 1 << 20), dtype=dtype, device=device)
        _SHARED[key] = buf
    if _capturing():
        _IN_GRAPHS.add(key)
    return buf[:numel]


def partials_workspace(numel: int, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 split-K partials: `out` (the caller's own buffer) when given, else `shared_scratch` (a call's
    partials are consumed by its own epilogue launch right after)."""
    if out is None:
        return shared_scratch("split-K partials (partials_out=)", numel, torch.float32, device)
    if out.numel() < numel or out.dtype != torch.float32:
        raise ValueError(f"partials_out holds {out.numel()} {out.dtype} values; this call needs {numel} fp32")
    return out[:numel]


def h_splits_tile(lora_h, lora: int) -> int:
    """Tile height for the split-K partials of h (all loaded at once by the epilogue)."""
    return next_pow2(lora_h.shape[0]) if lora else 1


def segment_bounds(segments, n: int, n_rows: int, glu: bool) -> tuple[int, int, int]:
    """Row boundaries (n1, n2) of the fused modules and their count (with glu, the up rows start at n)."""
    n1, n2 = segments if segments is not None else ((n, 1 << 30) if glu else (1 << 30, 1 << 30))
    return n1, n2, 1 + (n1 < n_rows) + (n2 < n_rows)


# ---- the plane order of x (the `nvfp4_wgmma` kernel's operand order) -----------------------------------------
# Within each block of 256 columns, natural column c = 8 w + j + 4 h (j = 0..3, h = 0..1, w = w4..w0 in bits) sits at
# column 64 j + (h + 2 w2 + 4 w3 + 8 w0 + 16 w1 + 32 w4): the four FP4 planes of a 32-word step of the weights side by
# side, each plane's k in the order its decoded registers hold it (`nvfp4_wgmma`). Producers of x for that kernel
# (RMSNorm, the attention merge, the gate|up epilogue) write it there; its TMA loads then need no reordering.
PLANE_BLOCK = 256


def plane_col(c):
    """Plane-order column of natural column c (ints or integer tensors); `natural_col` inverts it."""
    r = c % 256
    j, h, w = r & 3, (r >> 2) & 1, r >> 3
    k = h | ((w >> 2) & 1) << 1 | ((w >> 3) & 1) << 2 | (w & 1) << 3 | ((w >> 1) & 1) << 4 | ((w >> 4) & 1) << 5
    return c - r + 64 * j + k


def natural_col(d):
    """Natural column of plane-order column d."""
    r = d % 256
    j, k = r >> 6, r & 63
    w = (k >> 3) & 1 | ((k >> 4) & 1) << 1 | ((k >> 1) & 1) << 2 | ((k >> 2) & 1) << 3 | ((k >> 5) & 1) << 4
    return d - r + 8 * w + j + 4 * (k & 1)


@functools.cache
def _to_planes_index(device) -> torch.Tensor:
    return natural_col(torch.arange(PLANE_BLOCK)).to(device)


def to_planes(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (K a multiple of 256) in plane order: one gather (the kernels' producers write it directly)."""
    m, k = x.shape
    return x.reshape(m, k // PLANE_BLOCK, PLANE_BLOCK)[:, :, _to_planes_index(x.device)].reshape(m, k)


def lora_args(lora_h, lora_B, lora_rank):
    lora = lora_rank if (lora_h is not None and lora_B is not None and lora_rank) else 0
    return lora, (max(next_pow2(lora), 1) if lora else 1)


# ---- Triton device functions (E2M1 / E4M3 decode, the fused epilogue of a tile) -----------------------------
if HAS_TRITON:

    @triton.jit
    def planes_tile(y, BM: tl.constexpr, BN: tl.constexpr):
        """A [BM, BN] tile of natural columns (BN a multiple of 256, starting on a 256 boundary) reordered in
        registers into plane order (`plane_col`), to be stored contiguously."""
        t = tl.reshape(y, [BM, BN // 256, 2, 2, 2, 2, 2, 2, 2, 2])  # (m, block, w4, w3, w2, w1, w0, h, j1, j0)
        return tl.reshape(tl.permute(t, [0, 1, 8, 9, 2, 5, 6, 3, 4, 7]), [BM, BN])

    @triton.jit
    def plane_col_tl(c):
        """`plane_col` in Triton: where a producer stores natural column c when it writes x in plane order."""
        r = c % 256
        j = r & 3
        h = (r >> 2) & 1
        w = r >> 3
        k = h | ((w >> 2) & 1) << 1 | ((w >> 3) & 1) << 2 | (w & 1) << 3 | ((w >> 1) & 1) << 4 | ((w >> 4) & 1) << 5
        return c - r + 64 * j + k

    @triton.jit
    def e2m1_scaled(c):
        """E2M1 code (int32, 0..15) -> its value * 2**-14 in fp32 (exact)."""
        bits = ((c & 7) << 9) | ((c & 8) << 12)
        return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def e4m3_value(b):
        """float8_e4m3fn bits (int32, 0..255) -> value in fp32 (exact; NaN not handled)."""
        bits = ((b & 0x7F) << 7) | ((b & 0x80) << 8)
        return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0

    @triton.jit
    def mac(acc, x, w, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr):
        # x [BM, BK], w [BN, BK] -> acc [BM, BN] += x @ w.T
        if USE_DOT:
            return tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
        else:
            return acc + tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)

    @triton.jit
    def finish_tile(
        acc,
        h_ptr,
        lb_ptr,
        bias_ptr,
        rm,
        m_mask,
        rn,
        n_mask,
        seg,
        n_hsplit,
        lora_scale,
        stride_hs,
        stride_hm,
        stride_lbn,
        out_ty: tl.constexpr,
        BLOCK_M: tl.constexpr,
        USE_DOT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        LORA_R: tl.constexpr,
        LORA_RP: tl.constexpr,
        NSEG: tl.constexpr,
        HS_P: tl.constexpr,
        LORA_PREC: tl.constexpr,
        SEG_SKIP: tl.constexpr = False,
    ):
        """Round like the reference module: matmul, + bias, + LoRA, each rounded to the output dtype; the LoRA
        update's tl.dot (USE_DOT) in LORA_PREC; SEG_SKIP: no LoRA product for a fused module none of the tile's
        rows belongs to (the same sums: that product only adds zeros)."""
        y = acc.to(out_ty).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
            y = (y + b[None, :]).to(out_ty).to(tl.float32)
        if LORA_R > 0:
            rr = tl.arange(0, LORA_RP)
            r_mask = rr < LORA_R
            bl = tl.load(
                lb_ptr + rn[:, None] * stride_lbn + rr[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0
            )
            lora = tl.zeros(acc.shape, dtype=tl.float32)
            rsp = tl.arange(0, HS_P)  # all split-K partials of h in one load, summed in registers
            hmask = (rsp < n_hsplit)[:, None, None] & m_mask[None, :, None] & r_mask[None, None, :]
            for s in tl.static_range(NSEG):
                if not SEG_SKIP or tl.max(((seg == s) & n_mask).to(tl.int32), axis=0) > 0:
                    hs = tl.sum(
                        tl.load(
                            h_ptr
                            + rsp[:, None, None] * stride_hs
                            + rm[None, :, None] * stride_hm
                            + (s * LORA_R + rr)[None, None, :],
                            mask=hmask,
                            other=0.0,
                        ),
                        axis=0,
                    )
                    bs = tl.where((seg == s)[:, None], bl, 0.0)
                    lora = mac(lora, hs, bs, USE_DOT and LORA_RP >= 16, LORA_PREC)
            y = (y + (lora * lora_scale).to(out_ty).to(tl.float32)).to(out_ty).to(tl.float32)
        return y


# ---- Gluon (NVFP4 on tensor cores): the pieces `nvfp4_mma_sync` and `nvfp4_wgmma` share -------------------
try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    HAS_GLUON = True
except Exception:  # Triton without Gluon (< 3.4) or no Triton at all: the Triton kernels serve these rows
    HAS_GLUON = False


def bits(n: int) -> list[int]:
    return [1 << i for i in range(max(n, 1).bit_length() - 1)]


@functools.cache
def shrink_layout(nw: int):
    """[rows of x, 128 columns]: 4 consecutive columns a thread, a warp across 128 columns, warps over rows."""
    return gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32], warps_per_cta=[nw, 1], order=[1, 0])


# The decode, as PTX text (plain Python, so tests/test_nvfp4_mma_sync.py executes it on the CPU against the
# reference): one word w, its nibbles j and j + 4 (j = 0..3) as one bf16x2 (low, high half),
# the k pair of one A register. Both halves of w move alike: the nibble pair is isolated with one mask, one
# integer multiply by 2**a + 2**b adds the copy shifted by a (sign to bit 15) to the copy shifted by b (e1 e0 m
# to bits 8..6; the copies do not overlap, so nothing carries), and one mask keeps those bits. Nibbles 2, 3
# (6, 7) take the word shifted right by 8 first. 13 instructions a word besides the 4 bf16 multiplies (4 of
# them integer multiplies, on the FMA pipe) instead of 16 (all on the integer pipe), and no prmt.
_PAIR = (
    "and.b32 t, {src}, 0x{mask:08X}; mul.lo.u32 t, t, 0x{mul:X}; and.b32 t, t, 0x81C081C0; mul.rn.bf16x2 ${o}, t, $6;\n"
)
PAIR_ASM = (
    "{\n.reg .b32 w, t;\n"
    + _PAIR.format(src="$4", mask=0x000F000F, mul=0x1040, o=0)
    + _PAIR.format(src="$4", mask=0x00F000F0, mul=0x104, o=1)
    + "shr.b32 w, $4, 8;\n"
    + _PAIR.format(src="w", mask=0x000F000F, mul=0x1040, o=2)
    + _PAIR.format(src="w", mask=0x00F000F0, mul=0x104, o=3)
    + "}"
)


def partials_args(
    x, w32, scale, global_scale, n1: int, n2: int, ws, lora_A, h, max_m: int, bkw: int, name: str
) -> tuple[int, list]:
    """Checks and runtime arguments shared by `nvfp4_mma_sync` and `nvfp4_wgmma`:
    (LoRA shrink programs a split, the arguments in the kernels' order)."""
    m, k = x.shape
    if not 1 <= m <= max_m or k % (8 * bkw):
        raise ValueError(f"{name} takes at most {max_m} rows and K a multiple of {8 * bkw}")
    kw, split = k // 8, ws.shape[0]
    kps = -(-(kw // bkw) // split) * bkw
    r_sh = 0
    if lora_A is not None:
        r_sh = lora_A.shape[0]
        if lora_A.shape[1] != k or lora_A.stride(1) != 1 or h is None or h.shape != (split, m, r_sh):
            raise ValueError("lora_A must be [R, K] row-major and h [SPLIT, M, R]")
    return r_sh, [
        x,
        w32,
        scale,
        global_scale,
        ws,
        lora_A if r_sh else ws,
        h if r_sh else ws,
        m,
        w32.shape[0],
        kw,
        kps,
        n1,
        n2,
        r_sh,
        x.stride(0),
        w32.stride(0),
        scale.stride(0),
        ws.stride(0),
        ws.stride(1),
        lora_A.stride(0) if r_sh else 0,
        h.stride(0) if r_sh else 0,
        h.stride(1) if r_sh else 0,
    ]


if HAS_GLUON:
    _PAIR_ASM: gl.constexpr = gl.constexpr(PAIR_ASM)

    @gluon.jit
    def split_range(KW, k_per_split):
        """(program, first word, end word) of this program's split of K (grid axis 1)."""
        k_lo = gl.program_id(1) * k_per_split
        return gl.program_id(0), k_lo, gl.minimum(k_lo + k_per_split, KW)

    @gluon.jit
    def pair_planes(qq, ss):
        """Words [.., 2] (each twice) and their block scale pairs (likewise) -> 4 bf16 tensors [.., 2], plane j
        holding nibbles j (index 0) and j + 4 (index 1) of each word as v * scale * 2**-16."""
        return gl.inline_asm_elementwise(
            _PAIR_ASM, "=r,=r,=r,=r,r,r,r,r", [qq, ss], dtype=(gl.bfloat16,) * 4, is_pure=True, pack=2
        )

    @gluon.jit
    def shrink_row(
        x_ptr,
        a_ptr,
        h_ptr,
        r,
        M,
        k_lo,
        k_hi,
        stride_xm,
        stride_ar,
        h_off,
        stride_hm,
        BM: gl.constexpr,
        SH_L: gl.constexpr,
        PLANES: gl.constexpr = False,
    ):
        """h[m, r] over columns [k_lo, k_hi) of x (a multiple of 128 long): CUDA-core dot of BM rows of x with row r of A.
        PLANES: x is in plane order (`plane_col`), A is read at the natural columns of x's."""
        rm = gl.arange(0, BM, layout=gl.SliceLayout(1, SH_L))
        rk = gl.arange(0, 128, layout=gl.SliceLayout(0, SH_L))
        xp = x_ptr + gl.expand_dims(rm * stride_xm, 1) + gl.expand_dims(rk, 0)
        xmask = gl.expand_dims(rm < M, 1)
        arow = a_ptr + r.to(gl.int64) * stride_ar
        ap = arow + rk
        h = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, SH_L))
        for k in range(k_lo, k_hi, 128):
            xv = gl.load(xp + k, mask=xmask, other=0.0).to(gl.float32)
            if PLANES:
                av = gl.load(arow + natural_col_gl(rk + k)).to(gl.float32)
            else:
                av = gl.load(ap + k).to(gl.float32)
            h += gl.sum(xv * gl.expand_dims(av, 0), axis=1)
        gl.store(h_ptr + h_off + rm * stride_hm + r, h, mask=rm < M)

    @gluon.jit
    def natural_col_gl(d):
        """`natural_col` in Gluon."""
        r = d % 256
        k = r & 63
        w = (k >> 3) & 1 | ((k >> 4) & 1) << 1 | ((k >> 1) & 1) << 2 | ((k >> 2) & 1) << 3 | ((k >> 5) & 1) << 4
        return d - r + 8 * w + (r >> 6) + 4 * (k & 1)

    @gluon.jit
    def word_scales(sb, BN: gl.constexpr, BKW: gl.constexpr, L3: gl.constexpr):
        """Scale bytes [BN, BKW/2] (E4M3; block j covers words 2j, 2j+1) -> [BN, BKW] int32: each word's block
        scale * 2**110 as a bf16 pair, the decode's multiplier, in the words' load layout (through L3; the
        caller converts it to its words' layout)."""
        sv = (sb.to(gl.float8e4nv, bitcast=True).to(gl.float32) * 1.2980742146337069e33).to(gl.bfloat16)  # 2**110
        c = sv.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        c3 = gl.expand_dims(c | (c << 16), 2) + gl.zeros([BN, BKW // 2, 2], gl.int32, layout=L3)  # both words'
        return gl.reshape(c3, [BN, BKW])

    @gluon.jit
    def store_partials(
        acc,
        gs_ptr,
        ws_ptr,
        pid_n,
        M,
        N,
        n1,
        n2,
        stride_wss,
        stride_wsm,
        BM: gl.constexpr,
        BN: gl.constexpr,
        C_L: gl.constexpr,
    ):
        """ws[split, m, n] = acc * 2**16 / the row's global scale (fused q|k|v and gate|up rows carry their module's)."""
        rno = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, C_L))
        seg = (rno >= n1).to(gl.int32) + (rno >= n2).to(gl.int32)
        f = 65536.0 / gl.load(gs_ptr + seg, mask=rno < N, other=1.0)
        acc = acc * gl.expand_dims(f, 1)
        rmo = gl.arange(0, BM, layout=gl.SliceLayout(0, C_L))
        yp = (
            ws_ptr
            + gl.program_id(1).to(gl.int64) * stride_wss
            + gl.expand_dims(rmo * stride_wsm, 0)
            + gl.expand_dims(rno, 1)
        )
        gl.store(yp, acc, mask=gl.expand_dims(rno < N, 1) & gl.expand_dims(rmo < M, 0))
