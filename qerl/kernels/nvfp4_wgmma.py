"""NVFP4 decode linear on warpgroup MMA (wgmma) with the weights decoded into registers and x
in shared memory, for 9..128 rows (Gluon, Hopper).

`nvfp4_mma_sync` feeds `mma.sync` from registers on both sides: past 8 rows its x tile (loaded and
split into planes by every warp, every step) costs more than the weights' decode, and at 32 rows its tiles
shrink to fit the registers (575 GB/s at 32 rows on the H200). Here x goes to shared memory by TMA, NS steps
ahead (mbarrier-tracked ring), in the order the decoded weights need, and `wgmma` reads it there: the warps only
load and decode weights and issue `wgmma`s; the registers hold the weights' decode and the accumulators only.

Decode as `nvfp4_mma_sync`'s in-word decode (`common.PAIR_ASM`): nibbles j and j + 4 of a word are the k pair
of one bf16x2 register of the A operand (k_width = 2). The dot product does not care about the order of k,
so k is labelled to make the loads cheap: within a plane j (the 2 * BKW values of x[8 w + j + 4 h]) of a
32-word step,

    k = h + 2 * w2 + 4 * w3 + 8 * w0 + 16 * w1 + 32 * w4        (w = w4 w3 w2 w1 w0 in bits)

so each thread's words are 4 consecutive ones (16-byte loads; A's registers are a permutation of them,
asserted trivial). x must then be in that order too, the four planes of a step side by side ("plane order",
`common.plane_col`): its producers in the decode step write it so (`x_planes=True`), else one gather
(`common.to_planes`) reorders it first. With PF a step's words and scales are loaded a step ahead.
Partial sums go to the fp32 workspace [split, M, N]; `linear_epilogue` finishes, as for
`nvfp4_mma_sync`, whose LoRA shrink programs (`common.shrink_row`, reading x in plane order) this kernel runs too.
Plain-PyTorch reference: `qerl.quant.nvfp4.nvfp4_dequantize` + matmul (tests/test_nvfp4_wgmma.py).
"""

from __future__ import annotations

import functools

import torch

from .common import HAS_GLUON, bits, partials_args, shrink_layout, to_planes

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .common import pair_planes, shrink_row, split_range, store_partials, word_scales

    _BKW: gl.constexpr = gl.constexpr(32)

WG_MAX_M = 128  # rows this kernel takes (x [BM, 256] a step; BM, up to 128, is the wgmma N)
BKW = 32  # words a step: one plane is 64 values of k, one 128-byte swizzled row of x in shared memory (_BKW)


def wgmma_supported(device: torch.device, dtype: torch.dtype, fmt: str, k: int) -> bool:
    """NVFP4 weights, bf16 activations, K a multiple of 256, on an sm_90 GPU (wgmma) with Gluon."""
    return fmt == "nvfp4" and dtype == torch.bfloat16 and k % (8 * BKW) == 0 and _hopper(device)


def _hopper(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.x (wgmma exists there only) and Triton with Gluon."""
    return HAS_GLUON and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


@functools.cache
def _layouts(nw: int, bm: int):
    """(accumulator, A operand, words as loaded, words as A's registers, the [BN, BKW/2, 2] scale-broadcast
    layout, scale bytes, one [bm, 64] plane of x in shared memory) for BN = 16 * nw weight rows and bm rows of x.
    A (k_width 2, [BN, 64]): regs (0,1) (8,0) (0,8) (0,16) (0,32); lanes (0,2) (0,4) (1,0) (2,0) (4,0);
    warps (16,0) (32,0) ... (checked at compile time: every conversion to it is asserted trivial)."""
    acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1], instr_shape=[16, bm, 16])
    a_op = gl.DotOperandLayout(operand_index=0, parent=acc, k_width=2)
    lanes = [(0, 4), (0, 8), (1, 0), (2, 0), (4, 0)]
    warps = [(16 * v, 0) for v in bits(nw)]
    # words [BN, BKW]: 4 consecutive a thread (16-byte loads), then row + 8; as A's registers after the nibble
    # pair h: row + 8 (A's (8,0)), w0 (k 8), w1 (k 16), w4 (k 32)
    ld_reg = [(0, 1), (0, 2), (8, 0), (0, 16)]
    w_reg = [(8, 0), (0, 1), (0, 2), (0, 16)]

    def lin(regs, shape):
        return gl.DistributedLinearLayout(
            [list(b) for b in regs],
            [list(b) for b in lanes],
            [list(b) for b in warps],
            [],
            shape,
        )

    ld_l, w_l = lin(ld_reg, [16 * nw, BKW]), lin(w_reg, [16 * nw, BKW])

    def split_w(bs):
        return [[n, w // 2, w % 2] for n, w in bs]

    l3 = gl.DistributedLinearLayout(split_w(ld_reg), split_w(lanes), split_w(warps), [], [16 * nw, BKW // 2, 2])
    s_l = gl.SliceLayout(2, l3)
    xs_l = gl.NVMMASharedLayout.get_default_for([bm, 64], gl.bfloat16)  # one plane: 128-byte swizzled rows
    return acc, a_op, ld_l, w_l, l3, s_l, xs_l


if HAS_GLUON:

    @gluon.jit
    def _a_plane(p, BN: gl.constexpr):
        """Plane [BN, _BKW, 2] (row, word, h) -> [BN, 64] over k = h + 2 w2 + 4 w3 + 8 w0 + 16 w1 + 32 w4, whose
        registers are A's (the caller converts, asserted trivial)."""
        t = gl.reshape(p, [BN, 2, 2, 2, 2, 2, 2])  # (n, w4, w3, w2, w1, w0, h)
        return gl.reshape(gl.permute(t, [0, 1, 4, 5, 2, 3, 6]), [BN, 64])

    @gluon.jit
    def _wg_kernel(
        x_ptr,
        x_desc,
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
        C_L: gl.constexpr,
        A_L: gl.constexpr,
        LD_L: gl.constexpr,
        W_L: gl.constexpr,
        L3: gl.constexpr,
        S_L: gl.constexpr,
        XS_L: gl.constexpr,
        SH_L: gl.constexpr,
        SHRINK: gl.constexpr = False,
        PF: gl.constexpr = False,
        NS: gl.constexpr = 1,
    ):
        """Partial sums over words [k_lo, k_lo + k_per_split) of BN weight rows: ws[split, m, n] (fp32); with
        SHRINK the first R_SH programs of each split write the LoRA shrink's partials instead."""
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
                True,
            )
        else:
            _wg_tile(
                x_desc,
                w_ptr,
                s_ptr,
                gs_ptr,
                ws_ptr,
                pid - R_SH if SHRINK else pid,
                k_lo,
                k_hi,
                M,
                N,
                n1,
                n2,
                stride_ww,
                stride_sn,
                stride_wss,
                stride_wsm,
                BM,
                BN,
                C_L,
                A_L,
                LD_L,
                W_L,
                L3,
                S_L,
                XS_L,
                PF,
                NS,
            )

    @gluon.jit
    def _wg_tile(
        x_desc,
        w_ptr,
        s_ptr,
        gs_ptr,
        ws_ptr,
        pid_n,
        k_lo,
        k_hi,
        M,
        N,
        n1,
        n2,
        stride_ww,
        stride_sn,
        stride_wss,
        stride_wsm,
        BM: gl.constexpr,
        BN: gl.constexpr,
        C_L: gl.constexpr,
        A_L: gl.constexpr,
        LD_L: gl.constexpr,
        W_L: gl.constexpr,
        L3: gl.constexpr,
        S_L: gl.constexpr,
        XS_L: gl.constexpr,
        PF: gl.constexpr,
        NS: gl.constexpr,
    ):
        """One [BN weight rows, BM rows of x] tile: x's four [BM, 64] planes of a step arrive by TMA NS steps ahead
        (rows past M are TMA's zero fill), the words are decoded into A's registers, 4 wgmmas (one a plane) read
        x there; after every warp's wgmmas of a step are done, its buffer is refilled for step + NS."""
        rn = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, LD_L)), N - 1)
        rw = gl.arange(0, _BKW, layout=gl.SliceLayout(0, LD_L))
        wp = w_ptr + gl.expand_dims(rn.to(gl.int64) * stride_ww, 1) + gl.expand_dims(rw, 0)
        rns = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, S_L)), N - 1)
        rj = gl.arange(0, _BKW // 2, layout=gl.SliceLayout(0, S_L))
        sp = s_ptr + gl.expand_dims(rns.to(gl.int64) * stride_sn, 1) + gl.expand_dims(rj, 0)
        xb = gl.allocate_shared_memory(gl.bfloat16, [4 * NS, BM, 64], XS_L)  # NS steps x 4 planes
        bars = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NS):
            mbarrier.init(bars.index(s), count=1)
        fence_async_shared()
        nsteps = (k_hi - k_lo) // _BKW
        for s in gl.static_range(NS):
            _x_step(x_desc, bars.index(s), xb, s, k_lo + s * _BKW, s < nsteps, BM)
        if PF:  # the first step's words and scales; each step then loads the next one's (the last its own again)
            qn = gl.load(wp + k_lo)
            sn = gl.load(sp + k_lo // 2)
        acc = gl.zeros([BN, BM], gl.float32, layout=C_L)
        for i in range(nsteps):
            k = k_lo + i * _BKW
            if PF:
                qc = qn
                sb = sn
                kn = gl.minimum(k + _BKW, k_hi - _BKW)
                qn = gl.load(wp + kn)
                sn = gl.load(sp + kn // 2)
            else:
                qc = gl.load(wp + k)
                sb = gl.load(sp + k // 2)
            q = gl.convert_layout(qc, W_L, assert_trivial=True)
            s2 = gl.convert_layout(word_scales(sb, BN, _BKW, L3), W_L, assert_trivial=True)
            p0, p1, p2, p3 = pair_planes(gl.join(q, q), gl.join(s2, s2))
            a0 = gl.convert_layout(_a_plane(p0, BN), A_L, assert_trivial=True)
            a1 = gl.convert_layout(_a_plane(p1, BN), A_L, assert_trivial=True)
            a2 = gl.convert_layout(_a_plane(p2, BN), A_L, assert_trivial=True)
            a3 = gl.convert_layout(_a_plane(p3, BN), A_L, assert_trivial=True)
            slot = i % NS
            mbarrier.wait(bars.index(slot), (i // NS) & 1)
            acc = warpgroup_mma(a0, xb.index(4 * slot + 0).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(a1, xb.index(4 * slot + 1).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(a2, xb.index(4 * slot + 2).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(a3, xb.index(4 * slot + 3).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
            gl.thread_barrier()  # every warp's wgmmas have read this buffer before TMA refills it
            _x_step(x_desc, bars.index(slot), xb, slot, k + NS * _BKW, i + NS < nsteps, BM)
        for s in gl.static_range(NS):
            mbarrier.invalidate(bars.index(s))
        store_partials(acc, gs_ptr, ws_ptr, pid_n, M, N, n1, n2, stride_wss, stride_wsm, BM, BN, C_L)

    @gluon.jit
    def _x_step(x_desc, bar, xb, slot, k, pred, BM: gl.constexpr):
        """TMA of the step at word k: x's columns [8 k, 8 k + 256) (plane order), four [BM, 64] planes, into
        buffers 4 slot .. 4 slot + 3, signalling bar (skipped when pred is false)."""
        mbarrier.expect(bar, 4 * BM * 64 * 2, pred=pred)
        for j in gl.static_range(4):
            tma.async_copy_global_to_shared(x_desc, [0, k * 8 + 64 * j], bar, xb.index(4 * slot + j), pred=pred)


# (num_warps, programs in the grid, PF) by shape class and rows (<= 16, <= 32, <= 64, <= 128). 64 and 128 rows:
# the best of the H100 sweep with x by TMA (`benchmarks/sweep_decode_gpu.py`, Qwen2.5-7B shapes as the engine
# calls them, LoRA live; benchmarks/LOG.md, 2026-12-07); 16 and 32 rows: the H200 sweeps from when x still went
# through registers. K is split until the grid holds about that many programs (gate|up counts its glu output
# rows), so other model sizes keep the same parallelism. PF (the next step's words loaded a step ahead) pays
# only where a program's loop is long; at 128 rows the accumulators leave it no registers.
WG_TILES = {
    "down": {16: (8, 264, True), 32: (8, 264, True), 64: (4, 264, False), 128: (4, 528, False)},  # long K
    "narrow": {16: (4, 264, True), 32: (4, 264, True), 64: (4, 264, False), 128: (4, 264, False)},  # q|k|v, o
    "wide": {16: (4, 1056, True), 32: (4, 1056, True), 64: (4, 264, True), 128: (4, 264, False)},  # gate|up
}


def wg_tile_key(m: int, n: int, k: int) -> tuple[str, int]:
    """The `WG_TILES` entry for m rows of an [n, k] product: (shape class, rows bucket)."""
    cls = "down" if k >= 8192 else ("narrow" if n <= 8192 else "wide")
    return cls, next(b for b in (16, 32, 64, 128) if m <= b or b == 128)


def wgmma_config(m: int, n: int, k: int, num_warps: int | None = None, programs: int | None = None) -> dict:
    """The tile for m rows of an [n, k] weight: BN = 16 * num_warps weight rows, 32 words a step, K split
    until the grid has about `programs` programs (at most 16 splits, each at least two steps), x one step ahead
    (NS 1), the words a step ahead where the table says (PF: 151 registers at 64 rows, 127 without); fields
    given override the `WG_TILES` entry."""
    cls, rows = wg_tile_key(m, n, k)
    nw, target, pf = WG_TILES[cls][rows]
    nw, target = num_warps or nw, programs or target
    bn = 16 * nw
    split = max(1, min(16, round(target / -(-n // bn)), (k // 8) // BKW // 2))
    return dict(MMA=True, WGMMA=True, BLOCK_N=bn, BKW=BKW, SPLIT=split, num_warps=nw, NS=1, PF=pf and m <= 64)


def wgmma_constexprs(m: int, cfg: dict, shrink: bool) -> dict:
    """`_wg_kernel`'s constexprs for m rows of x and a `wgmma_config` tile (the launcher and dev/sass.py)."""
    nw = cfg["num_warps"]
    bm = max(16, 1 << (m - 1).bit_length())
    acc, a_op, ld_l, w_l, l3, s_l, xs_l = _layouts(nw, bm)
    return dict(
        BM=bm,
        BN=16 * nw,
        C_L=acc,
        A_L=a_op,
        LD_L=ld_l,
        W_L=w_l,
        L3=l3,
        S_L=s_l,
        XS_L=xs_l,
        SH_L=shrink_layout(nw),
        SHRINK=shrink,
        PF=bool(cfg.get("PF", False)),
        NS=int(cfg.get("NS", 1)),
    )


def wgmma_partials(
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
    x_planes: bool = False,
) -> torch.Tensor:
    """As `nvfp4_mma_sync.mma_partials` (same arguments and outputs), by warpgroup MMA: up to WG_MAX_M rows.
    x_planes: x is in plane order already (`common.plane_col`), else it is reordered first (one gather)."""
    xp = x if x_planes else to_planes(x)
    r_sh, args = partials_args(xp, w32, scale, global_scale, n1, n2, ws, lora_A, h, WG_MAX_M, BKW, "nvfp4_wgmma")
    const = wgmma_constexprs(x.shape[0], cfg, shrink=r_sh > 0)
    args.insert(1, TensorDescriptor.from_tensor(xp, [const["BM"], 64], const["XS_L"]))
    _wg_kernel[(-(-w32.shape[0] // const["BN"]) + r_sh, ws.shape[0])](*args, num_warps=cfg["num_warps"], **const)
    return ws
