"""Version 7 of the NVFP4 decode linear: tensor cores fed from registers (Gluon, mma.sync), 1-32 rows.

Version 5 (`fused_linear._tc_rows`) decodes a weight tile in registers and lets Triton stage it in
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
normal. (A decode of nibble i of a word pair (w, w + 1), one `prmt` a byte, took more instructions and was
measured slower: taken out.) The row's 2**16 and 1 / global scale are applied to the fp32 accumulator at the
end. Partial sums go to an fp32 workspace [split, M, N]; `fused_linear.linear_epilogue` adds bias, LoRA,
GLU and rounds, as for version 5's split-K. Given the LoRA A matrices, R extra programs per split write the
shrink's partials h[split, M, R] (one row of A each, CUDA cores), so the decode step needs no `lora_shrink`
launch. (Stream-K, the tiles' steps spread evenly over the programs that fit the GPU at once instead of whole
splits, measured no faster: taken out.)

Loads: each step's words and scales go straight into registers in the operand layout. Tried and taken out
again (measured slower on the H200, benchmarks/RESULTS.md, sixth to eighth rounds): the words and scales streamed
by TMA through a ring of shared-memory stages, each split's x staged in shared memory, one step of register
prefetch, an L2 prefetch: the kernel is bound by its instruction issue at 12 resident warps a multiprocessor,
not by its loads.

Layouts are Gluon's explicit linear layouts: `_layouts` derives the scale and x layouts from the MMA
operand layouts, and every conversion to an operand layout is asserted trivial at compile time (no data
movement), so a layout mistake fails compilation instead of silently adding a shared-memory round trip.
Plain-PyTorch reference: `qerl.quant.nvfp4.nvfp4_dequantize` + matmul (tests/test_nvfp4_mma.py).
"""

from __future__ import annotations

import functools

import torch

from ._triton import pdl_launch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    HAS_GLUON = True
except Exception:  # Triton without Gluon (< 3.4) or no Triton at all: version 5 serves these rows
    HAS_GLUON = False

MMA_MAX_M = 32  # rows of x: at 64 the x tile (32 words x 8 x 64 rows) spills registers


def mma_supported(x: torch.Tensor, fmt: str, k: int, bkw: int = 32) -> bool:
    """Version 7 takes NVFP4 weights, bf16 activations, K a multiple of 8 * bkw, on sm_90+ (mul.rn.bf16x2)
    with Gluon."""
    return (
        HAS_GLUON
        and fmt == "nvfp4"
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and k % (8 * bkw) == 0
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


def _bits(n: int) -> list[int]:
    return [1 << i for i in range(max(n, 1).bit_length() - 1)]


@functools.cache
def _layouts(nw: int, r: int, bkw: int, bm: int):
    """(mma, A, B, scale layout, x layout, the [BN, BKW/2, 2] scale-broadcast layout, the in-word decode's
    words) for a tile of BN = 16 * nw * r rows, bkw words, bm rows of x. A and B are the k_width=4 `mma.sync` operand layouts;
    their linear-layout bases (checked against Triton 3.6 by tests/test_nvfp4_mma.py when Triton is installed):
      A [BN, BKW]:  regs (0,1) (0,2) (8,0) (0,16..) (16nw..,0); lanes (0,4) (0,8) (1,0) (2,0) (4,0); warps (16..,0)
      B [BKW, BM]:  regs (1,0) (2,0) (16..,0) (0,8..); lanes (4,0) (8,0) (0,1) (0,2) (0,4); warps (0,0)..
    """
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[nw, 1], instr_shape=[16, 8])
    a_op = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    b_op = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
    # A's bases over (row, word); the scale-broadcast layout splits word = 2 * j + b into (row, j, b)
    a_reg = [(0, 1), (0, 2), (8, 0)] + [(0, 16 * v) for v in _bits(bkw // 16)] + [(16 * nw * v, 0) for v in _bits(r)]
    a_lane = [(0, 4), (0, 8), (1, 0), (2, 0), (4, 0)]
    a_warp = [(16 * v, 0) for v in _bits(nw)]

    def split_w(bs):
        return [[n, w // 2, w % 2] for n, w in bs]

    l3 = gl.DistributedLinearLayout(split_w(a_reg), split_w(a_lane), split_w(a_warp), [], [16 * nw * r, bkw // 2, 2])
    s_l = gl.SliceLayout(2, l3)  # [BN, BKW/2] scale bytes: each thread the 2 blocks of its 4 words
    # B's bases over (word, x row) with the 8 nibble planes of each word first in the registers: 32
    # consecutive values of x per thread (4 words x 8), loaded as 16-byte vectors
    b_reg = [(1, 0), (2, 0)] + [(16 * v, 0) for v in _bits(bkw // 16)] + [(0, 8 * v) for v in _bits(bm // 8)]
    b_lane = [(4, 0), (8, 0), (0, 1), (0, 2), (0, 4)]
    x_l = gl.DistributedLinearLayout(
        [[0, 0, 1], [0, 0, 2], [0, 0, 4]] + [[w, m, 0] for w, m in b_reg],
        [[w, m, 0] for w, m in b_lane],
        [[0, 0, 0] for _ in _bits(nw)],
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


@functools.cache
def _shrink_layout(nw: int):
    """[rows of x, 128 columns]: 4 consecutive columns a thread, a warp across 128 columns, warps over rows."""
    return gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32], warps_per_cta=[nw, 1], order=[1, 0])


# The decode, as PTX text (plain Python, so tests/test_nvfp4_mma.py executes it on the CPU against the
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


if HAS_GLUON:
    _PAIR_ASM: gl.constexpr = gl.constexpr(PAIR_ASM)

    @gluon.jit
    def _dependent_start(PDL: gl.constexpr):
        """Programmatic dependent launch (`_triton.programmatic_launch`): wait until the previous kernel is
        complete (its writes visible), then let the next one be scheduled."""
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
            gl.inline_asm_elementwise(
                "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
            )

    @gluon.jit
    def _split_range(KW, k_per_split, PDL: gl.constexpr):
        """The start versions 7 and 8 share: (PDL) wait for the previous kernel, then (program, first word, end
        word) of this program's split of K (grid axis 1)."""
        _dependent_start(PDL)
        k_lo = gl.program_id(1) * k_per_split
        return gl.program_id(0), k_lo, gl.minimum(k_lo + k_per_split, KW)

    @gluon.jit
    def _pair_planes(qq, ss):
        """Words [.., 2] (each twice) and their block scale pairs (likewise) -> 4 bf16 tensors [.., 2], plane j
        holding nibbles j (index 0) and j + 4 (index 1) of each word as v * scale * 2**-16."""
        return gl.inline_asm_elementwise(
            _PAIR_ASM, "=r,=r,=r,=r,r,r,r,r", [qq, ss], dtype=(gl.bfloat16,) * 4, is_pure=True, pack=2
        )

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
        PDL: gl.constexpr = False,
    ):
        """Partial sums over words [k_lo, k_lo + k_per_split) of BN weight rows: ws[split, m, n] (fp32).
        SHRINK: the first R_SH programs of each split instead write the LoRA shrink's partial
        h[split, m, r] = x[m, split's K] . A[r, split's K] (one row of A each), so no `lora_shrink` launch.
        PDL: launched as a programmatic dependent of the previous kernel."""
        pid, k_lo, k_hi = _split_range(KW, k_per_split, PDL)
        if SHRINK and pid < R_SH:  # (SHRINK False: no branch, every program a tile program)
            _shrink_row(
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
            _store_partials(acc, gs_ptr, ws_ptr, pid_n, M, N, n1, n2, stride_wss, stride_wsm, BM, BN, C_L)

    @gluon.jit
    def _shrink_row(
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
    ):
        """h[m, r] over columns [k_lo, k_hi) of x (a multiple of 128 long): CUDA-core dot of BM rows of x with row r of A."""
        rm = gl.arange(0, BM, layout=gl.SliceLayout(1, SH_L))
        rk = gl.arange(0, 128, layout=gl.SliceLayout(0, SH_L))
        xp = x_ptr + gl.expand_dims(rm * stride_xm, 1) + gl.expand_dims(rk, 0)
        xmask = gl.expand_dims(rm < M, 1)
        ap = a_ptr + r.to(gl.int64) * stride_ar + rk
        h = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, SH_L))
        for k in range(k_lo, k_hi, 128):
            xv = gl.load(xp + k, mask=xmask, other=0.0).to(gl.float32)
            av = gl.load(ap + k).to(gl.float32)
            h += gl.sum(xv * gl.expand_dims(av, 0), axis=1)
        gl.store(h_ptr + h_off + rm * stride_hm + r, h, mask=rm < M)

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
    def _word_scales(sb, BN: gl.constexpr, BKW: gl.constexpr, L3: gl.constexpr):
        """Scale bytes [BN, BKW/2] (E4M3; block j covers words 2j, 2j+1) -> [BN, BKW] int32: each word's block
        scale * 2**110 as a bf16 pair, the decode's multiplier, in the words' load layout (through L3; the
        caller converts it to its words' layout)."""
        sv = (sb.to(gl.float8e4nv, bitcast=True).to(gl.float32) * 1.2980742146337069e33).to(gl.bfloat16)  # 2**110
        c = sv.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        c3 = gl.expand_dims(c | (c << 16), 2) + gl.zeros([BN, BKW // 2, 2], gl.int32, layout=L3)  # both words'
        return gl.reshape(c3, [BN, BKW])

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
        s2 = gl.convert_layout(_word_scales(sb, BN, BKW, L3), W_L, assert_trivial=True)
        q = gl.convert_layout(q, W_L, assert_trivial=True)
        p0, p1, p2, p3 = _pair_planes(gl.join(q, q), gl.join(s2, s2))
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

    @gluon.jit
    def _store_partials(
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


# (num_warps, 16-row tiles a warp, programs in the grid) by shape class and rows (<= 4, <= 8, <= 16, <= 32): the
# best tiles of the H200 sweeps (benchmarks/bench_mma_gpu.py, Qwen2.5-7B shapes); K is split until the grid holds
# about that many programs, so other model sizes keep the same parallelism. Optional tile field: MAXNREG (a
# register cap; measured, off).
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
    """Version 7 tile for m rows of an [n, k] weight: BN = 16 * num_warps * rows_per_warp weight rows, bkw
    words a step; K split until the grid has about `programs` programs (at most 16 splits, each at least
    two steps). Fields given override the `MMA_TILES` entry."""
    cls = "down" if k >= 8192 else ("narrow" if n <= 8192 else "wide")
    nw, r, target = MMA_TILES[cls][next(b for b in (4, 8, 16, 32) if m <= b or b == 32)]
    nw, r, target = num_warps or nw, rows_per_warp or r, programs or target
    bn = 16 * nw * r
    split = max(1, min(16, round(target / -(-n // bn)), (k // 8) // bkw // 2))
    return dict(WORDS=True, MMA=True, BLOCK_N=bn, BKW=bkw, RPW=r, SPLIT=split, num_warps=nw)


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
    r_sh, args = partials_args(x, w32, scale, global_scale, n1, n2, ws, lora_A, h, MMA_MAX_M, cfg["BKW"], 7)
    pdl = pdl_launch()["PDL"]
    const = mma_constexprs(x.shape[0], cfg, shrink=r_sh > 0, pdl=pdl)
    _mma_kernel[(-(-w32.shape[0] // const["BN"]) + r_sh, ws.shape[0])](
        *args,
        num_warps=cfg["num_warps"],
        **({"maxnreg": cfg["MAXNREG"]} if cfg.get("MAXNREG") else {}),
        launch_pdl=pdl,
        **const,
    )
    return ws


def partials_args(
    x, w32, scale, global_scale, n1: int, n2: int, ws, lora_A, h, max_m: int, bkw: int, version: int
) -> tuple[int, list]:
    """Checks and runtime arguments shared by versions 7 and 8 (`_mma_kernel`, `nvfp4_wgmma._wg_kernel`):
    (LoRA shrink programs a split, the arguments in the kernels' order)."""
    m, k = x.shape
    if not 1 <= m <= max_m or k % (8 * bkw):
        raise ValueError(f"version {version} takes at most {max_m} rows and K a multiple of {8 * bkw}")
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


def mma_constexprs(m: int, cfg: dict, shrink: bool, pdl: bool = False) -> dict:
    """`_mma_kernel`'s constexprs for m rows of x and an `mma_config` tile (launcher and offline compile);
    pdl: launched as a programmatic dependent."""
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
        SH_L=_shrink_layout(nw),
        SHRINK=shrink,
        PDL=pdl,
    )


def compile_sm90(m: int, cfg: dict, shrink: bool = True):
    """Compile `_mma_kernel` for sm_90 without a GPU (Triton only), specialized as the launcher is for 16-byte
    aligned pointers and strides: for offline checks of the machine code (tests, benchmarks/sass_decode.py)."""
    return compile_partials_kernel(_mma_kernel, mma_constexprs(m, cfg, shrink), cfg["num_warps"])


def compile_partials_kernel(fn, const: dict, num_warps: int):
    """`triton.compile` of a partials kernel (`_mma_kernel`, `nvfp4_wgmma._wg_kernel`: same runtime arguments)
    for sm_90, specialized as the launcher is (16-byte aligned pointers, strides and word counts)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    types = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*u8", gs_ptr="*fp32", ws_ptr="*fp32", a_ptr="*fp32", h_ptr="*fp32")
    aligned = ("KW", "k_per_split", "stride_xm", "stride_ww", "stride_sn", "stride_wss")
    sig = {a: "constexpr" if a in const else types.get(a, "i32") for a in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*") or a in aligned
    }
    return triton.compile(
        GluonASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps)
    )
