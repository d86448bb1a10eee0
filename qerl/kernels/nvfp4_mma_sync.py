"""NVFP4 decode linear on tensor cores fed from registers (Gluon, `mma.sync`): 1-32 rows of x.

The portable `tc` tile (`fp4_decode`) decodes a weight tile in registers and lets Triton stage it in
shared memory for the MMA (4x the bytes it read, a store, a barrier and a load per step): about 650 GB/s
at every row count. Here nothing goes through shared memory. The product is split by nibble plane:

    y[m, n] = sum_i sum_w W[n, 8w + i] x[m, 8w + i]        (i = 0..7: nibble i of int32 word w)

so plane i of a [BN, BKW] tile of words is itself an MMA operand over "k" = word index, against
x[:, 8w + i]. A dot product does not care about the order of k, so each plane is decoded straight into the
A-operand registers of `mma.sync` (Triton's k_width=4 layout: each thread holds 4 consecutive words of a
row, one 16-byte load) and multiplied with the matching B operand of x (each thread holds 32 consecutive
values of x, four 16-byte loads, split into the 8 planes in registers). The weights keep the
compressed-tensors packing: one copy, the same bytes every other path reads.

Decode (`PAIR_ASM`, the in-word decode): a register of the A operand holds a k pair, here nibbles j and
j + 4 of one word (the planes are pairs, each an MMA over 2 * BKW values of k, and x is paired to match):
both codes go into a bf16x2 as v * 2**-126 (e1 e0 m in exponent/mantissa bits 8..6, E=0 codes on bf16
subnormals; one mask, one integer multiply that places sign and magnitude at once, one mask) and are
multiplied by the block scale * 2**110 (bf16x2, exact: E4M3 has 3 mantissa bits): v * scale * 2**-16,
normal. The row's 2**16 and 1 / global scale are applied to the fp32 accumulator at the
end. Partial sums go to an fp32 workspace [split, M, N]; `linear_epilogue` adds bias, LoRA,
GLU and rounds, as for `fp4_decode`'s split-K. Given the LoRA A matrices, R extra programs per split write the
shrink's partials h[split, M, R] (one row of A each, CUDA cores), so the decode step needs no `lora_shrink`
launch.

Loads: each step's words and scales go straight into registers in the operand layout: the kernel is bound by
its instruction issue at 12 resident warps a multiprocessor, not by its loads (the alternatives measured are
dated in benchmarks/LOG.md).

Layouts are Gluon's explicit linear layouts: `_layouts` derives the scale and x layouts from the MMA
operand layouts, and every conversion to an operand layout is asserted trivial at compile time (no data
movement), so a layout mistake fails compilation instead of silently adding a shared-memory round trip.
Plain-PyTorch reference: `qerl.quant.nvfp4.nvfp4_dequantize` + matmul (tests/test_nvfp4_mma_sync.py).
"""

from __future__ import annotations

import functools

import torch

from .common import HAS_GLUON, bits, partials_args, shrink_layout

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from .common import pair_planes, shrink_row, split_range, store_partials, word_scales

MMA_MAX_M = 32  # rows of x: at 64 the x tile (32 words x 8 x 64 rows) spills registers


def mma_supported(device: torch.device, dtype: torch.dtype, fmt: str, k: int) -> bool:
    """NVFP4 weights, bf16 activations, K a multiple of 256 (8 * the 32 words of a step), on sm_90+ (mul.rn.bf16x2)
    with Gluon."""
    return (
        HAS_GLUON
        and fmt == "nvfp4"
        and device.type == "cuda"
        and dtype == torch.bfloat16
        and k % 256 == 0
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


@functools.cache
def _layouts(nw: int, r: int, bkw: int, bm: int):
    """(mma, A, B, scale layout, x layout, the [BN, BKW/2, 2] scale-broadcast layout, the in-word decode's
    words) for a tile of BN = 16 * nw * r rows, bkw words, bm rows of x. A and B are the k_width=4 `mma.sync` operand layouts;
    their linear-layout bases (checked against Triton 3.6 by tests/test_nvfp4_mma_sync.py when Triton is installed):
      A [BN, BKW]:  regs (0,1) (0,2) (8,0) (0,16..) (16nw..,0); lanes (0,4) (0,8) (1,0) (2,0) (4,0); warps (16..,0)
      B [BKW, BM]:  regs (1,0) (2,0) (16..,0) (0,8..); lanes (4,0) (8,0) (0,1) (0,2) (0,4); warps (0,0)..
    """
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[nw, 1], instr_shape=[16, 8])
    a_op = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    b_op = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
    # A's bases over (row, word); the scale-broadcast layout splits word = 2 * j + b into (row, j, b)
    a_reg = [(0, 1), (0, 2), (8, 0)] + [(0, 16 * v) for v in bits(bkw // 16)] + [(16 * nw * v, 0) for v in bits(r)]
    a_lane = [(0, 4), (0, 8), (1, 0), (2, 0), (4, 0)]
    a_warp = [(16 * v, 0) for v in bits(nw)]

    def split_w(bs):
        return [[n, w // 2, w % 2] for n, w in bs]

    l3 = gl.DistributedLinearLayout(split_w(a_reg), split_w(a_lane), split_w(a_warp), [], [16 * nw * r, bkw // 2, 2])
    s_l = gl.SliceLayout(2, l3)  # [BN, BKW/2] scale bytes: each thread the 2 blocks of its 4 words
    # B's bases over (word, x row) with the 8 nibble planes of each word first in the registers: 32
    # consecutive values of x per thread (4 words x 8), loaded as 16-byte vectors
    b_reg = [(1, 0), (2, 0)] + [(16 * v, 0) for v in bits(bkw // 16)] + [(0, 8 * v) for v in bits(bm // 8)]
    b_lane = [(4, 0), (8, 0), (0, 1), (0, 2), (0, 4)]
    x_l = gl.DistributedLinearLayout(
        [[0, 0, 1], [0, 0, 2], [0, 0, 4]] + [[w, m, 0] for w, m in b_reg],
        [[w, m, 0] for w, m in b_lane],
        [[0, 0, 0] for _ in bits(nw)],
        [],
        [bkw, bm, 8],
    )
    # the words for the in-word decode: A's registers with word 2 after row 8, a register permutation of the 16-byte
    # loads (word 1, word 2, row 8) that becomes A's (k 1, k 2, row 8, k 16, ...) once each decoded word is the
    # k pair of one register (`_a_pairs`)
    w_l = gl.DistributedLinearLayout(
        [list(b) for b in [a_reg[0], a_reg[2], a_reg[1]] + a_reg[3:]],
        [list(b) for b in a_lane],
        [list(b) for b in a_warp],
        [],
        [16 * nw * r, bkw],
    )
    return mma, a_op, b_op, s_l, x_l, l3, w_l


if HAS_GLUON:

    @gluon.jit
    def _a_pairs(p, BN: gl.constexpr, BKW: gl.constexpr):
        """A plane [BN, BKW, 2] (row, word w, nibble pair h) -> [BN, 2 BKW] over k = (w bit 4.., w bit 1,
        w bit 3, w bit 2, w bit 0, h), in which order its registers are those of the A operand (the caller
        converts, asserted trivial: a jit function called twice returns its layout as a plain linear layout)."""
        return gl.reshape(
            gl.permute(gl.reshape(p, [BN, BKW // 16, 2, 2, 2, 2, 2]), [0, 1, 4, 2, 3, 5, 6]), [BN, 2 * BKW]
        )

    @gluon.jit
    def _b_pairs(t, BKW: gl.constexpr, BM: gl.constexpr):
        """x [BKW, BM, 2] (word w, row m, h: x[m, 8w + j + 4h]) -> [2 BKW, BM], k as in `_a_pairs`: B's registers."""
        return gl.reshape(
            gl.permute(gl.reshape(t, [BKW // 16, 2, 2, 2, 2, BM, 2]), [0, 3, 1, 2, 4, 6, 5]), [2 * BKW, BM]
        )

    @gluon.jit
    def _halves(t, shape: gl.constexpr):
        """[.., 2n] -> the even and the odd entries of the last axis, [.., n] each."""
        return gl.split(gl.reshape(t, shape))

    @gluon.jit
    def _mma_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        gs_ptr,
        ws_ptr,
        a_ptr,
        h_ptr,
        M,
        N,
        KW,
        k_per_split,
        n1,
        n2,
        R_SH,
        stride_xm,
        stride_ww,
        stride_sn,
        stride_wss,
        stride_wsm,
        stride_ar,
        stride_hs,
        stride_hm,
        BM: gl.constexpr,
        BN: gl.constexpr,
        BKW: gl.constexpr,
        C_L: gl.constexpr,
        A_L: gl.constexpr,
        B_L: gl.constexpr,
        S_L: gl.constexpr,
        X_L: gl.constexpr,
        L3: gl.constexpr,
        SH_L: gl.constexpr,
        W_L: gl.constexpr,
        SHRINK: gl.constexpr = False,
    ):
        """Partial sums over words [k_lo, k_lo + k_per_split) of BN weight rows: ws[split, m, n] (fp32).
        SHRINK: the first R_SH programs of each split instead write the LoRA shrink's partial
        h[split, m, r] = x[m, split's K] . A[r, split's K] (one row of A each), so no `lora_shrink` launch."""
        pid, k_lo, k_hi = split_range(KW, k_per_split)
        if SHRINK and pid < R_SH:  # (SHRINK False: no branch, every program a tile program)
            shrink_row(
                x_ptr,
                a_ptr,
                h_ptr,
                pid,
                M,
                k_lo * 8,
                k_hi * 8,
                stride_xm,
                stride_ar,
                gl.program_id(1) * stride_hs,
                stride_hm,
                BM,
                SH_L,
            )
        else:
            pid_n = pid - R_SH if SHRINK else pid
            acc = _mma_tile(
                x_ptr,
                w_ptr,
                s_ptr,
                pid_n,
                k_lo,
                k_hi,
                M,
                N,
                stride_xm,
                stride_ww,
                stride_sn,
                BM,
                BN,
                BKW,
                C_L,
                A_L,
                B_L,
                S_L,
                X_L,
                L3,
                W_L,
            )
            store_partials(acc, gs_ptr, ws_ptr, pid_n, M, N, n1, n2, stride_wss, stride_wsm, BM, BN, C_L)

    @gluon.jit
    def _x_offsets(M, stride_xm, BM: gl.constexpr, BKW: gl.constexpr, X_L: gl.constexpr):
        """Offsets and row mask of the x tile [BKW, BM, 8] of a step: x[m, 8 * (k + w) + i]."""
        xw = gl.arange(0, BKW, layout=gl.SliceLayout(1, gl.SliceLayout(2, X_L)))
        xm = gl.arange(0, BM, layout=gl.SliceLayout(0, gl.SliceLayout(2, X_L)))
        xi = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, X_L)))
        xoff = (
            gl.expand_dims(gl.expand_dims(xw * 8, 1), 2)
            + gl.expand_dims(gl.expand_dims(xm * stride_xm, 0), 2)
            + gl.expand_dims(gl.expand_dims(xi, 0), 1)
        )
        return xoff, gl.expand_dims(gl.expand_dims(xm < M, 0), 2)

    @gluon.jit
    def _mma_step(
        acc,
        q,
        sb,
        xv,
        BN: gl.constexpr,
        BKW: gl.constexpr,
        BM: gl.constexpr,
        A_L: gl.constexpr,
        B_L: gl.constexpr,
        L3: gl.constexpr,
        W_L: gl.constexpr,
    ):
        """acc += the words q [BN, BKW] (A layout) with their scale bytes sb [BN, BKW/2], times the x tile xv:
        4 planes of nibble pairs (j, j + 4) of a word, each an MMA over 2 BKW values of k."""
        s2 = gl.convert_layout(word_scales(sb, BN, BKW, L3), W_L, assert_trivial=True)
        q = gl.convert_layout(q, W_L, assert_trivial=True)
        p0, p1, p2, p3 = pair_planes(gl.join(q, q), gl.join(s2, s2))
        e, o = _halves(xv, [BKW, BM, 4, 2])  # x of planes j even | j odd, each [.., (h, j bit 1)]
        x0, x2 = _halves(e, [BKW, BM, 2, 2])
        x1, x3 = _halves(o, [BKW, BM, 2, 2])
        a0 = gl.convert_layout(_a_pairs(p0, BN, BKW), A_L, assert_trivial=True)
        a1 = gl.convert_layout(_a_pairs(p1, BN, BKW), A_L, assert_trivial=True)
        a2 = gl.convert_layout(_a_pairs(p2, BN, BKW), A_L, assert_trivial=True)
        a3 = gl.convert_layout(_a_pairs(p3, BN, BKW), A_L, assert_trivial=True)
        acc = mma_v2(a0, gl.convert_layout(_b_pairs(x0, BKW, BM), B_L, assert_trivial=True), acc)
        acc = mma_v2(a1, gl.convert_layout(_b_pairs(x1, BKW, BM), B_L, assert_trivial=True), acc)
        acc = mma_v2(a2, gl.convert_layout(_b_pairs(x2, BKW, BM), B_L, assert_trivial=True), acc)
        acc = mma_v2(a3, gl.convert_layout(_b_pairs(x3, BKW, BM), B_L, assert_trivial=True), acc)
        return acc

    @gluon.jit
    def _mma_tile(
        x_ptr,
        w_ptr,
        s_ptr,
        pid_n,
        k_lo,
        k_hi,
        M,
        N,
        stride_xm,
        stride_ww,
        stride_sn,
        BM: gl.constexpr,
        BN: gl.constexpr,
        BKW: gl.constexpr,
        C_L: gl.constexpr,
        A_L: gl.constexpr,
        B_L: gl.constexpr,
        S_L: gl.constexpr,
        X_L: gl.constexpr,
        L3: gl.constexpr,
        W_L: gl.constexpr,
    ):
        """One [BN weight rows, BM rows of x] tile over words [k_lo, k_hi), loaded straight into registers."""
        # weight words [BN, BKW] in the A layout (rows past N read row N-1; their sums are not stored)
        rn = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, A_L)), N - 1)
        rw = gl.arange(0, BKW, layout=gl.SliceLayout(0, A_L))
        wp = w_ptr + gl.expand_dims(rn.to(gl.int64) * stride_ww, 1) + gl.expand_dims(rw, 0)
        # scale bytes [BN, BKW/2]: block j of the tile covers words 2j, 2j+1
        rns = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, S_L)), N - 1)
        rj = gl.arange(0, BKW // 2, layout=gl.SliceLayout(0, S_L))
        sp = s_ptr + gl.expand_dims(rns.to(gl.int64) * stride_sn, 1) + gl.expand_dims(rj, 0)
        xoff, xmask = _x_offsets(M, stride_xm, BM, BKW, X_L)
        acc = gl.zeros([BN, BM], gl.float32, layout=C_L)
        for k in range(k_lo, k_hi, BKW):
            q = gl.load(wp + k)
            sb = gl.load(sp + k // 2)
            xv = gl.load(x_ptr + k * 8 + xoff, mask=xmask, other=0.0)
            acc = _mma_step(acc, q, sb, xv, BN, BKW, BM, A_L, B_L, L3, W_L)
        return acc


# (num_warps, 16-row tiles a warp, programs in the grid) by shape class and rows (<= 4, <= 8, <= 16, <= 32): the
# fastest tiles on Qwen2.5-7B shapes (H200; benchmarks/LOG.md); K is split until the grid holds
# about that many programs, so other model sizes keep the same parallelism.
MMA_TILES = {
    "down": {4: (2, 1, 896), 8: (4, 1, 448), 16: (4, 2, 252), 32: (2, 1, 448)},  # long K
    "narrow": {4: (4, 2, 300), 8: (4, 2, 300), 16: (2, 2, 448), 32: (2, 1, 448)},  # q|k|v, o_proj
    "wide": {4: (2, 2, 1184), 8: (4, 2, 592), 16: (2, 2, 1184), 32: (2, 1, 448)},  # gate|up (n: output columns)
}


def mma_config(
    m: int,
    n: int,
    k: int,
    num_warps: int | None = None,
    rows_per_warp: int | None = None,
    bkw: int = 32,
    programs: int | None = None,
) -> dict:
    """The tile for m rows of an [n, k] weight: BN = 16 * num_warps * rows_per_warp weight rows, bkw
    words a step; K split until the grid has about `programs` programs (at most 16 splits, each at least
    two steps). Fields given override the `MMA_TILES` entry."""
    cls = "down" if k >= 8192 else ("narrow" if n <= 8192 else "wide")
    nw, r, target = MMA_TILES[cls][next(b for b in (4, 8, 16, 32) if m <= b or b == 32)]
    nw, r, target = num_warps or nw, rows_per_warp or r, programs or target
    bn = 16 * nw * r
    split = max(1, min(16, round(target / -(-n // bn)), (k // 8) // bkw // 2))
    return dict(MMA=True, BLOCK_N=bn, BKW=bkw, RPW=r, SPLIT=split, num_warps=nw)


def mma_partials(
    x: torch.Tensor,
    w32: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor,
    n1: int,
    n2: int,
    cfg: dict,
    ws: torch.Tensor,
    lora_A: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 partial products ws[s, m, n] = sum over split s of x[m] . W[n] (global scales applied).
    x [M, K] bf16, w32 [N, K/8] int32 words of packed E2M1, scale [N, K/16] uint8 E4M3 bytes,
    global_scale fp32 per segment; ws [SPLIT, M, N] fp32, rows of unit stride.
    lora_A [R, K] (row-major): also write the LoRA shrink's partials h[s, m, r] = x[m] . A[r] over split s
    into h [SPLIT, M, R] (fp32, contiguous), computed by R extra programs a split."""
    r_sh, args = partials_args(
        x, w32, scale, global_scale, n1, n2, ws, lora_A, h, MMA_MAX_M, cfg["BKW"], "nvfp4_mma_sync"
    )
    const = mma_constexprs(x.shape[0], cfg, shrink=r_sh > 0)
    _mma_kernel[(-(-w32.shape[0] // const["BN"]) + r_sh, ws.shape[0])](
        *args,
        num_warps=cfg["num_warps"],
        **const,
    )
    return ws


def mma_constexprs(m: int, cfg: dict, shrink: bool) -> dict:
    """`_mma_kernel`'s constexprs for m rows of x and an `mma_config` tile (the launcher and dev/sass.py)."""
    nw, r, bkw = cfg["num_warps"], cfg["RPW"], cfg["BKW"]
    bm = max(8, 1 << (m - 1).bit_length())
    mma, a_l, b_l, s_l, x_l, l3, w_l = _layouts(nw, r, bkw, bm)
    return dict(
        BM=bm,
        BN=16 * nw * r,
        BKW=bkw,
        C_L=mma,
        A_L=a_l,
        B_L=b_l,
        S_L=s_l,
        X_L=x_l,
        L3=l3,
        W_L=w_l,
        SH_L=shrink_layout(nw),
        SHRINK=shrink,
    )
