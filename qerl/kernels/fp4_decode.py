"""The portable FP4 decode linear (Triton): NVFP4 / MXFP4 weights, 1-64 rows of x, one pass over the packed weight.

y = x @ deq(W).T, fp32 partial sums over splits of K (then `linear_epilogue`), or, unsplit, finished in the same
launch (bias, LoRA, SiLU gate: `common.finish_tile`). Two tiles of one kernel (`_decode_kernel`, TC constexpr):

- `gemv` (CUDA cores, up to 8 rows, served at 1-4): packed weights read as int32 words (8 codes) in 16-byte
  runs, decoded by one inline-asm block (two codes per shift/mask into an f16x2, then exact f16 -> f32), joined
  into natural K order and multiplied in fp32 with one contiguous vector of x per row; each scale block's
  products are summed and scaled once, the NVFP4 global scale once per row. The weight is not rounded to the
  activation dtype first: bf16 results differ from the reference by that rounding. Tiles: `gemv_config`.
- `tc` (tensor cores, up to 64 rows): the weight tile is decoded in registers straight to bf16 and multiplied
  with x^T by `tl.dot` (swap AB: weight rows fill the MMA's M dimension, rows of x padded to 16). Tiles:
  `tc_config`.

E2M1 codes are decoded with bit operations and the E4M3 block scale from its uint8 bits, with the step
`float(scale) / global_scale` formed in fp32 as `qerl.quant.nvfp4.nvfp4_dequantize` does. Split-K launches may
also compute the LoRA shrink h = x @ A.T (`lora_A`): no separate `lora_shrink` launch. On Hopper with bf16
activations the NVFP4 rows go to `nvfp4_mma_sync` and `nvfp4_wgmma` instead (`choice.choose_linear_kernel`).
Plain-PyTorch reference: `qerl.quant` dequantize + matmul (tests/test_kernels.py).
"""

from __future__ import annotations

import torch

from .common import (
    FMT_CODES,
    HAS_TRITON,
    h_splits_tile,
    lora_args,
    next_pow2,
    partials_workspace,
    segment_bounds,
)
from .linear_epilogue import linear_epilogue
from .lora_shrink import lora_shrink, partials_view

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .common import e2m1_scaled, e4m3_value, finish_tile

    @triton.jit
    def _decode_word(q, USE_ASM: tl.constexpr):
        """int32 words [..] -> 8 fp32 tensors: E2M1 value * 2**-14 of nibbles 0..7 (exact)."""
        if USE_ASM:
            return tl.inline_asm_elementwise(
                """
    {
    .reg .b32 t, s, p;
    .reg .b16 l, h;
    shl.b32 t, $8, 9;  shl.b32 s, $8, 12; and.b32 t, t, 0x0E000E00; and.b32 s, s, 0x80008000; or.b32 p, t, s;
    mov.b32 {l, h}, p; cvt.f32.f16 $0, l; cvt.f32.f16 $4, h;
    shl.b32 t, $8, 5;  shl.b32 s, $8, 8;  and.b32 t, t, 0x0E000E00; and.b32 s, s, 0x80008000; or.b32 p, t, s;
    mov.b32 {l, h}, p; cvt.f32.f16 $1, l; cvt.f32.f16 $5, h;
    shl.b32 t, $8, 1;  shl.b32 s, $8, 4;  and.b32 t, t, 0x0E000E00; and.b32 s, s, 0x80008000; or.b32 p, t, s;
    mov.b32 {l, h}, p; cvt.f32.f16 $2, l; cvt.f32.f16 $6, h;
    shr.b32 t, $8, 3;  and.b32 t, t, 0x0E000E00; and.b32 s, $8, 0x80008000; or.b32 p, t, s;
    mov.b32 {l, h}, p; cvt.f32.f16 $3, l; cvt.f32.f16 $7, h;
    }
    """,
                "=r,=r,=r,=r,=r,=r,=r,=r,r",
                [q],
                dtype=(tl.float32,) * 8,
                is_pure=True,
                pack=1,
            )
        else:
            return (
                e2m1_scaled(q & 15),
                e2m1_scaled((q >> 4) & 15),
                e2m1_scaled((q >> 8) & 15),
                e2m1_scaled((q >> 12) & 15),
                e2m1_scaled((q >> 16) & 15),
                e2m1_scaled((q >> 20) & 15),
                e2m1_scaled((q >> 24) & 15),
                e2m1_scaled((q >> 28) & 15),
            )

    @triton.jit
    def _block_scale(sb, FMT: tl.constexpr):
        """Scale bytes (int32) -> fp32 block scale: E4M3 (NVFP4) or E8M0 (MXFP4; e = 0 reads as 0)."""
        if FMT == 0:
            return e4m3_value(sb)
        else:
            return (sb << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _row_factor(gs_ptr, seg, n_mask, c, FMT: tl.constexpr, BLOCK_N: tl.constexpr):
        """Per output row: c / the row's NVFP4 global scale (c for MXFP4)."""
        if FMT == 0:
            return c / tl.load(gs_ptr + seg, mask=n_mask, other=1.0)
        else:
            return tl.full((BLOCK_N,), c, tl.float32)

    @triton.jit
    def _natural_k(v0, v1, v2, v3, v4, v5, v6, v7, BLOCK_N: tl.constexpr, BK: tl.constexpr):
        """The 8 nibble planes [BN, BKW] of a word tile -> [BN, 8 * BKW] columns in K order. tl.join adds a
        new minor axis, so the outermost join picks bit 0 of the nibble index and the innermost bit 2:
        [BN, BKW, 2, 2, 2] flattens to column 8 * word + nibble."""
        w = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
        return tl.reshape(w, (BLOCK_N, BK))

    @triton.jit
    def _stack_rows(a0, a1, a2, a3, a4, a5, a6, a7, f, MR: tl.constexpr, BLOCK_M: tl.constexpr):
        """Per-row partial tiles a_m [BN, *] -> [BLOCK_M, BN]: row m = sum(a_m, axis=1) * f."""
        ri = tl.arange(0, BLOCK_M)[:, None]
        acc = tl.where(ri == 0, (tl.sum(a0, axis=1) * f)[None, :], 0.0)
        if MR > 1:
            acc = tl.where(ri == 1, (tl.sum(a1, axis=1) * f)[None, :], acc)
        if MR > 2:
            acc = tl.where(ri == 2, (tl.sum(a2, axis=1) * f)[None, :], acc)
        if MR > 3:
            acc = tl.where(ri == 3, (tl.sum(a3, axis=1) * f)[None, :], acc)
        if MR > 4:
            acc = tl.where(ri == 4, (tl.sum(a4, axis=1) * f)[None, :], acc)
        if MR > 5:
            acc = tl.where(ri == 5, (tl.sum(a5, axis=1) * f)[None, :], acc)
        if MR > 6:
            acc = tl.where(ri == 6, (tl.sum(a6, axis=1) * f)[None, :], acc)
        if MR > 7:
            acc = tl.where(ri == 7, (tl.sum(a7, axis=1) * f)[None, :], acc)
        return acc

    # ---- gemv: up to 8 rows on CUDA cores, 16-byte weight loads, one contiguous vector of x per row ---
    # A [BLOCK_N, BKW] tile of words is decoded
    # (`_decode_word`) and joined into [BLOCK_N, 8 * BKW] columns in natural K order, so each thread holds whole
    # 16-byte runs of a row (several rows per thread) and multiplies them with one contiguous vector of x
    # (loaded once per step for all rows); each scale block's 16 (or 32) products are summed in registers
    # and scaled once, rows are reduced across threads after the loop.

    @triton.jit
    def _gemv_row(w, xp, rk, k_ok, sv, NBS: tl.constexpr, G: tl.constexpr, EVEN_K: tl.constexpr):
        """One row of x against the decoded tile w [BN, BK]: per scale block sum(x * v) * scale, [BN, NBS]."""
        if EVEN_K:
            x = tl.load(xp + rk).to(tl.float32)
        else:
            x = tl.load(xp + rk, mask=k_ok, other=0.0).to(tl.float32)
        return tl.sum(tl.reshape(w * x[None, :], (w.shape[0], NBS, G)), axis=2) * sv

    @triton.jit
    def _gemv_rows(
        x_ptr,
        w_ptr,
        s_ptr,
        gs_ptr,
        rn,
        n_mask,
        seg,
        k_lo,
        k_per_split,
        KW,
        stride_xm,
        stride_ww,
        stride_sn,
        FMT: tl.constexpr,
        MR: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BKW: tl.constexpr,
        EVEN_K: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):
        """[BLOCK_M, BLOCK_N] fp32 partial sums over words [k_lo, k_lo + k_per_split) of rows rn (global scale applied)."""
        GW: tl.constexpr = 2 if FMT == 0 else 4  # words per scale block
        NBS: tl.constexpr = BKW // GW  # scale blocks per step
        BK: tl.constexpr = BKW * 8
        rnc = tl.where(n_mask, rn, 0)
        wrow = w_ptr + rnc[:, None] * stride_ww
        srow = s_ptr + rnc[:, None] * stride_sn
        xs = stride_xm
        rw0 = tl.arange(0, BKW)
        rb0 = tl.arange(0, NBS)
        rk0 = tl.arange(0, BK)
        a0 = tl.zeros((BLOCK_N, NBS), dtype=tl.float32)
        a1 = tl.zeros((BLOCK_N, NBS), dtype=tl.float32)
        a2 = tl.zeros((BLOCK_N, NBS), dtype=tl.float32)
        a3 = tl.zeros((BLOCK_N, NBS), dtype=tl.float32)
        a4 = tl.zeros((BLOCK_N, NBS), dtype=tl.float32)
        a5 = tl.zeros((BLOCK_N, NBS), dtype=tl.float32)
        a6 = tl.zeros((BLOCK_N, NBS), dtype=tl.float32)
        a7 = tl.zeros((BLOCK_N, NBS), dtype=tl.float32)
        if PREFETCH:
            qn = tl.load(wrow + (k_lo + rw0)[None, :], mask=(k_lo + rw0 < KW)[None, :], other=0)
        for kk in range(0, k_per_split, BKW):
            w0 = k_lo + kk
            rw = w0 + rw0
            rb = w0 // GW + rb0
            rk = w0 * 8 + rk0
            k_ok = rk < KW * 8
            if PREFETCH:  # this step's words were loaded one step ahead
                q = qn
                qn = tl.load(
                    wrow + (rw + BKW)[None, :], mask=((rw + BKW < KW) & (kk + BKW < k_per_split))[None, :], other=0
                )
            elif EVEN_K:
                q = tl.load(wrow + rw[None, :])
            else:
                q = tl.load(wrow + rw[None, :], mask=(rw < KW)[None, :], other=0)
            if EVEN_K:
                sb = tl.load(srow + rb[None, :]).to(tl.int32)
            else:
                sb = tl.load(srow + rb[None, :], mask=(rb < KW // GW)[None, :], other=0).to(tl.int32)
            sv = _block_scale(sb, FMT)
            v0, v1, v2, v3, v4, v5, v6, v7 = _decode_word(q, True)
            w = _natural_k(v0, v1, v2, v3, v4, v5, v6, v7, BLOCK_N, BK)
            a0 += _gemv_row(w, x_ptr, rk, k_ok, sv, NBS, GW * 8, EVEN_K)
            if MR > 1:
                a1 += _gemv_row(w, x_ptr + xs, rk, k_ok, sv, NBS, GW * 8, EVEN_K)
            if MR > 2:
                a2 += _gemv_row(w, x_ptr + 2 * xs, rk, k_ok, sv, NBS, GW * 8, EVEN_K)
            if MR > 3:
                a3 += _gemv_row(w, x_ptr + 3 * xs, rk, k_ok, sv, NBS, GW * 8, EVEN_K)
            if MR > 4:
                a4 += _gemv_row(w, x_ptr + 4 * xs, rk, k_ok, sv, NBS, GW * 8, EVEN_K)
            if MR > 5:
                a5 += _gemv_row(w, x_ptr + 5 * xs, rk, k_ok, sv, NBS, GW * 8, EVEN_K)
            if MR > 6:
                a6 += _gemv_row(w, x_ptr + 6 * xs, rk, k_ok, sv, NBS, GW * 8, EVEN_K)
            if MR > 7:
                a7 += _gemv_row(w, x_ptr + 7 * xs, rk, k_ok, sv, NBS, GW * 8, EVEN_K)
        f = _row_factor(gs_ptr, seg, n_mask, 16384.0, FMT, BLOCK_N)
        return _stack_rows(a0, a1, a2, a3, a4, a5, a6, a7, f, MR, BLOCK_M)

    # ---- tc: 1..64 rows on tensor cores (swap AB: weight rows fill the MMA's M dimension) --------
    # A [BN, 8*BKW] weight tile is decoded in registers to bf16 values v * scale * 2**-16 (exact: an E2M1
    # value times an E4M3 or power-of-two scale has at most 6 significant bits) and multiplied with
    # x^T [8*BKW, BM] (rows padded to 16) by tl.dot with fp32 accumulation; 2**16 (and the NVFP4 global
    # scale) is applied once per row at the end. The asm decode places the codes of nibbles i and i+4
    # of a word into a bf16x2 as v * 2**-126 (e1 e0 m in exponent/mantissa bits 8..6, the E=0 codes
    # landing on bf16 subnormals) and one mul.rn.bf16x2 by scale * 2**110 gives v * scale * 2**-16:
    # about 1.5 integer ops and half a multiply per weight. Non-bf16 activations use fp32 weights.

    @triton.jit
    def _decode_word_tc(q, c, cf, W_BF16: tl.constexpr):
        """int32 words [..] -> 8 tensors (nibbles 0..7) of v * scale * 2**-16.
        c: int32 bf16x2 pair of scale * 2**110 (asm); cf: fp32 scale * 2**-2 (plain path)."""
        if W_BF16:
            return tl.inline_asm_elementwise(
                """
    {
    .reg .b32 t, s, p;
    shl.b32 t, $8, 6;  shl.b32 s, $8, 12; and.b32 t, t, 0x01C001C0; and.b32 s, s, 0x80008000; or.b32 p, t, s;
    mul.rn.bf16x2 p, p, $9; mov.b32 {$0, $4}, p;
    shl.b32 t, $8, 2;  shl.b32 s, $8, 8;  and.b32 t, t, 0x01C001C0; and.b32 s, s, 0x80008000; or.b32 p, t, s;
    mul.rn.bf16x2 p, p, $9; mov.b32 {$1, $5}, p;
    shr.b32 t, $8, 2;  shl.b32 s, $8, 4;  and.b32 t, t, 0x01C001C0; and.b32 s, s, 0x80008000; or.b32 p, t, s;
    mul.rn.bf16x2 p, p, $9; mov.b32 {$2, $6}, p;
    shr.b32 t, $8, 6;  and.b32 t, t, 0x01C001C0; and.b32 s, $8, 0x80008000; or.b32 p, t, s;
    mul.rn.bf16x2 p, p, $9; mov.b32 {$3, $7}, p;
    }
    """,
                "=h,=h,=h,=h,=h,=h,=h,=h,r,r",
                [q, c],
                dtype=(tl.bfloat16,) * 8,
                is_pure=True,
                pack=1,
            )
        else:  # the plain decode (v * 2**-14 in fp32) times scale * 2**-2
            wt: tl.constexpr = tl.bfloat16 if W_BF16 else tl.float32
            v0, v1, v2, v3, v4, v5, v6, v7 = _decode_word(q, False)
            return (
                (v0 * cf).to(wt),
                (v1 * cf).to(wt),
                (v2 * cf).to(wt),
                (v3 * cf).to(wt),
                (v4 * cf).to(wt),
                (v5 * cf).to(wt),
                (v6 * cf).to(wt),
                (v7 * cf).to(wt),
            )

    @triton.jit
    def _tc_rows(
        x_ptr,
        w_ptr,
        s_ptr,
        gs_ptr,
        rm,
        m_mask,
        rn,
        n_mask,
        seg,
        k_lo,
        k_per_split,
        KW,
        stride_xm,
        stride_ww,
        stride_sn,
        FMT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BKW: tl.constexpr,
        EVEN_K: tl.constexpr,
        W_BF16: tl.constexpr,
    ):
        """[BLOCK_M, BLOCK_N] fp32 partial sums over words [k_lo, k_lo + k_per_split) of rows rn (global scale applied)."""
        GW: tl.constexpr = 2 if FMT == 0 else 4  # words per scale block
        BK: tl.constexpr = BKW * 8
        rnc = tl.where(n_mask, rn, 0)
        wrow = w_ptr + rnc[:, None] * stride_ww
        srow = s_ptr + rnc[:, None] * stride_sn
        rw0 = tl.arange(0, BKW)
        rk0 = tl.arange(0, BK)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T
        for kk in range(0, k_per_split, BKW):
            rw = k_lo + kk + rw0
            rk = (k_lo + kk) * 8 + rk0
            if EVEN_K:
                q = tl.load(wrow + rw[None, :])
                sb = tl.load(srow + (rw // GW)[None, :]).to(tl.int32)
            else:
                km = rw < KW
                q = tl.load(wrow + rw[None, :], mask=km[None, :], other=0)
                sb = tl.load(srow + (rw // GW)[None, :], mask=km[None, :], other=0).to(tl.int32)
            sv = _block_scale(sb, FMT)
            cb = (sv * 1.2980742146337069e33).to(tl.bfloat16).to(tl.int16, bitcast=True).to(
                tl.int32
            ) & 0xFFFF  # * 2**110
            v0, v1, v2, v3, v4, v5, v6, v7 = _decode_word_tc(q, cb | (cb << 16), sv * 0.25, W_BF16)
            w = _natural_k(v0, v1, v2, v3, v4, v5, v6, v7, BLOCK_N, BK)
            # weights as the MMA's A operand (wgmma for 64-row tiles: the tile is staged in smem)
            xm = m_mask[None, :] & (rk < KW * 8)[:, None]
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None], mask=xm, other=0.0)  # x^T [BK, BM]
            if W_BF16:
                acc = tl.dot(w, xt, acc)
            else:
                acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
        f = _row_factor(gs_ptr, seg, n_mask, 65536.0, FMT, BLOCK_N)
        return tl.trans(acc * f[:, None])

    @triton.jit
    def _part(
        x_ptr,
        w_ptr,
        s_ptr,
        gs_ptr,
        rm,
        m_mask,
        rn,
        n_mask,
        seg,
        k_lo,
        k_per_split,
        KW,
        stride_xm,
        stride_ww,
        stride_sn,
        FMT: tl.constexpr,
        MR: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BKW: tl.constexpr,
        EVEN_K: tl.constexpr,
        TC: tl.constexpr,
        W_BF16: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):
        if TC:
            return _tc_rows(
                x_ptr,
                w_ptr,
                s_ptr,
                gs_ptr,
                rm,
                m_mask,
                rn,
                n_mask,
                seg,
                k_lo,
                k_per_split,
                KW,
                stride_xm,
                stride_ww,
                stride_sn,
                FMT,
                BLOCK_M,
                BLOCK_N,
                BKW,
                EVEN_K,
                W_BF16,
            )
        else:
            return _gemv_rows(
                x_ptr,
                w_ptr,
                s_ptr,
                gs_ptr,
                rn,
                n_mask,
                seg,
                k_lo,
                k_per_split,
                KW,
                stride_xm,
                stride_ww,
                stride_sn,
                FMT,
                MR,
                BLOCK_M,
                BLOCK_N,
                BKW,
                EVEN_K,
                PREFETCH,
            )

    @triton.jit
    def _shrink_part(
        x_ptr,
        a_ptr,
        h_ptr,
        rm,
        m_mask,
        r0,
        s,
        k_lo,
        k_hi,
        stride_xm,
        stride_ar,
        stride_hs,
        stride_hm,
        R: tl.constexpr,
        BK: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """The LoRA shrink's split-K partial h[s, :, r] = x[:, k_lo:k_hi] @ A[r, k_lo:k_hi] for rows
        r = r0, r0 + grid width, ... < R: what `lora_shrink` writes, from the programs of split s."""
        for r in range(r0, R, tl.num_programs(0)):
            acc = tl.zeros((BLOCK_M, BK), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BK):
                rk = k0 + tl.arange(0, BK)
                km = rk < k_hi
                a = tl.load(a_ptr + r * stride_ar + rk, mask=km, other=0.0).to(tl.float32)
                xv = tl.load(
                    x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & km[None, :], other=0.0
                ).to(tl.float32)
                acc += xv * a[None, :]
            tl.store(h_ptr + s * stride_hs + rm * stride_hm + r, tl.sum(acc, axis=1), mask=m_mask)

    @triton.jit
    def _decode_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        gs_ptr,
        bias_ptr,
        h_ptr,
        lb_ptr,
        y_ptr,
        ws_ptr,
        a_ptr,
        M,
        N,
        KW,
        k_per_split,
        n1,
        n2,
        n_hsplit,
        lora_scale,
        stride_xm,
        stride_ww,
        stride_sn,
        stride_hs,
        stride_hm,
        stride_lbn,
        stride_ym,
        stride_wss,
        stride_ar,
        FMT: tl.constexpr,
        MR: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BKW: tl.constexpr,
        EVEN_K: tl.constexpr,
        SPLIT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        LORA_R: tl.constexpr,
        LORA_RP: tl.constexpr,
        NSEG: tl.constexpr,
        HS_P: tl.constexpr,
        GLU: tl.constexpr,
        TC: tl.constexpr,
        W_BF16: tl.constexpr,
        EPI_DOT: tl.constexpr,
        PREFETCH: tl.constexpr,
        SHRINK_R: tl.constexpr = 0,
        SHRINK_BK: tl.constexpr = 256,
    ):
        """All M rows in one tile (TC: tensor cores, else <= GEMV_MAX_ROWS rows on CUDA cores). SPLIT > 1: fp32
        partials [SPLIT, M, N_rows] to ws (epilogue: _epilogue_kernel, a second launch; summing them in the last
        program of each tile instead costs more).
        SHRINK_R > 0 (with SPLIT > 1): the programs of split s also write the LoRA shrink's partials
        h[s] = x[:, chunk s] @ A[:, chunk s].T (A [SHRINK_R, K], one row of A per program) to h_ptr, which the
        epilogue launch sums: no separate `lora_shrink` launch."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        m_mask = rm < M
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        k_lo = pid_s * k_per_split
        seg = (rn >= n1).to(tl.int32) + (rn >= n2).to(tl.int32)
        y = _part(
            x_ptr,
            w_ptr,
            s_ptr,
            gs_ptr,
            rm,
            m_mask,
            rn,
            n_mask,
            seg,
            k_lo,
            k_per_split,
            KW,
            stride_xm,
            stride_ww,
            stride_sn,
            FMT,
            MR,
            BLOCK_M,
            BLOCK_N,
            BKW,
            EVEN_K,
            TC,
            W_BF16,
            PREFETCH,
        )
        if SPLIT > 1:
            wsp = ws_ptr + pid_s * stride_wss + rm[:, None] * stride_ym + rn[None, :]
            tl.store(wsp, y, mask=m_mask[:, None] & n_mask[None, :])
            if GLU:
                segu = (rn + N >= n1).to(tl.int32) + (rn + N >= n2).to(tl.int32)
                u = _part(
                    x_ptr,
                    w_ptr,
                    s_ptr,
                    gs_ptr,
                    rm,
                    m_mask,
                    rn + N,
                    n_mask,
                    segu,
                    k_lo,
                    k_per_split,
                    KW,
                    stride_xm,
                    stride_ww,
                    stride_sn,
                    FMT,
                    MR,
                    BLOCK_M,
                    BLOCK_N,
                    BKW,
                    EVEN_K,
                    TC,
                    W_BF16,
                    PREFETCH,
                )
                tl.store(wsp + N, u, mask=m_mask[:, None] & n_mask[None, :])
            if SHRINK_R > 0:
                _shrink_part(
                    x_ptr,
                    a_ptr,
                    h_ptr,
                    rm,
                    m_mask,
                    pid_n,
                    pid_s,
                    k_lo * 8,
                    tl.minimum(k_lo + k_per_split, KW) * 8,
                    stride_xm,
                    stride_ar,
                    stride_hs,
                    stride_hm,
                    SHRINK_R,
                    SHRINK_BK,
                    BLOCK_M,
                )
        else:
            out_ty: tl.constexpr = y_ptr.dtype.element_ty
            y = finish_tile(
                y,
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
                out_ty,
                BLOCK_M,
                EPI_DOT,
                HAS_BIAS,
                LORA_R,
                LORA_RP,
                NSEG,
                HS_P,
                "ieee",
            )
            if GLU:
                segu = (rn + N >= n1).to(tl.int32) + (rn + N >= n2).to(tl.int32)
                u = _part(
                    x_ptr,
                    w_ptr,
                    s_ptr,
                    gs_ptr,
                    rm,
                    m_mask,
                    rn + N,
                    n_mask,
                    segu,
                    k_lo,
                    k_per_split,
                    KW,
                    stride_xm,
                    stride_ww,
                    stride_sn,
                    FMT,
                    MR,
                    BLOCK_M,
                    BLOCK_N,
                    BKW,
                    EVEN_K,
                    TC,
                    W_BF16,
                    PREFETCH,
                )
                u = finish_tile(
                    u,
                    h_ptr,
                    lb_ptr,
                    bias_ptr,
                    rm,
                    m_mask,
                    rn + N,
                    n_mask,
                    segu,
                    n_hsplit,
                    lora_scale,
                    stride_hs,
                    stride_hm,
                    stride_lbn,
                    out_ty,
                    BLOCK_M,
                    EPI_DOT,
                    HAS_BIAS,
                    LORA_R,
                    LORA_RP,
                    NSEG,
                    HS_P,
                    "ieee",
                )
                g = y * tl.sigmoid(y)
                y = g.to(out_ty).to(tl.float32) * u
            tl.store(
                y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(out_ty), mask=m_mask[:, None] & n_mask[None, :]
            )


GEMV_MAX_ROWS = 8  # rows the gemv tile unrolls
TC_MAX_ROWS = 64  # rows of x in one tc tile
TARGET_PROGRAMS = 264  # `tc` splits K until the grid has about this many programs (2 per SM on H100/H200)


# gemv: (BLOCK_N, num_warps, PREFETCH, warps in the grid) by shape class and rows, the fastest tiles on Qwen2.5-7B
# shapes (benchmarks/LOG.md); K is split until the grid holds about
# that many warps, so other model sizes keep the same number of loads in flight.
GEMV_TILES = {
    "down": {1: (32, 4, True, 3584), 2: (32, 4, True, 3584), 4: (16, 1, True, 1792)},  # long K
    "narrow": {1: (64, 4, False, 1792), 2: (32, 4, False, 1792), 4: (16, 1, True, 1792)},  # q|k|v, o_proj
    "wide": {1: (16, 1, False, 2368), 2: (32, 4, True, 4736), 4: (16, 1, False, 2368)},  # gate|up
}


def _fit_split(split: int, k: int, bkw: int) -> int:
    """Fewer splits until each keeps at least two steps of bkw words."""
    while split > 1 and (k // 8) // split < 2 * bkw:
        split -= 1
    return split


def gemv_config(
    m: int,
    n: int,
    k: int,
    block_n: int | None = None,
    bkw: int = 32,
    num_warps: int | None = None,
    prefetch: bool | None = None,
) -> dict:
    """`gemv` tiles for m <= 8 rows of an [n, k] weight (tile fields given override the table)."""
    cls = "down" if k >= 8192 else ("narrow" if n <= 8192 else "wide")
    bn, nw, pf, warps = GEMV_TILES[cls][1 if m == 1 else (2 if m == 2 else 4)]
    bn, nw = block_n or bn, num_warps or nw
    pf = pf if prefetch is None else prefetch
    split = _fit_split(max(1, min(16, round(warps / (-(-n // bn) * nw)))), k, bkw)
    return dict(BLOCK_N=bn, BKW=bkw, SPLIT=split, PREFETCH=pf, num_warps=nw, num_stages=1)


def tc_config(m: int, n: int, k: int, block_n: int = 64, bkw: int = 8, num_warps: int = 4, num_stages: int = 3) -> dict:
    """`tc` tiles: split K until the grid has about TARGET_PROGRAMS programs (at most 8 splits)."""
    split = _fit_split(max(1, min(8, TARGET_PROGRAMS // -(-n // block_n))), k, bkw)
    return dict(
        TC=True,
        BLOCK_N=block_n,
        BKW=bkw,
        SPLIT=split,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def decode_tiling(fmt: str, m: int, k: int, cfg: dict, w_bf16: bool) -> tuple[int, int, dict]:
    """(splits, words per split, the tile's `_decode_kernel` constexprs and launch options) for m rows and a
    words config (`gemv_config` / `tc_config`); benchmarks/sass_decode.py compiles with the same."""
    tc = bool(cfg.get("TC", False))
    kw, bkw = k // 8, cfg["BKW"]
    kps = -(-kw // cfg.get("SPLIT", 1))
    kps = -(-kps // bkw) * bkw  # each split a whole number of steps
    split = -(-kw // kps)
    bm = max(16, next_pow2(m)) if tc else next_pow2(m)
    # MR (rows unrolled by `gemv`) is unused by `tc`: one compiled kernel per row tile, not per row count.
    # The in-kernel LoRA epilogue uses tl.dot from 32 rows (the FMA form is faster at 16).
    return (
        split,
        kps,
        dict(
            FMT=FMT_CODES[fmt],
            MR=0 if tc else m,
            BLOCK_M=bm,
            BLOCK_N=cfg["BLOCK_N"],
            EPI_DOT=tc and bm >= 32,
            BKW=bkw,
            EVEN_K=kw % bkw == 0 and split * kps == kw,
            TC=tc,
            W_BF16=w_bf16,
            PREFETCH=bool(cfg.get("PREFETCH", False)),
            SPLIT=split,
            num_warps=cfg.get("num_warps", 4),
            num_stages=cfg.get("num_stages", 1),
        ),
    )


def shrink_block_k(block_m: int) -> int:
    """K columns per step of the fused LoRA shrink (about 32 fp32 registers a thread for its x tile)."""
    return min(256, max(32, 4096 // block_m))


def fp4_decode_linear(
    x,
    fmt,
    weight,
    scale,
    global_scale,
    bias,
    lora_h,
    lora_B,
    lora_rank,
    lora_scale,
    segments,
    glu,
    out,
    n,
    cfg,
    lora_A=None,
    h_out=None,
    partials_out=None,
):
    """x [M, K] against packed NVFP4/MXFP4 rows with the tile `cfg` (`gemv_config`, or `tc_config` with TC):
    finished in this launch when K is not split, else split-K partials + the `linear_epilogue` launch.
    Arguments as `fused_linear.fused_linear`; n: output columns."""
    m, k = x.shape
    n_rows = weight.shape[0]
    if k % 8 or weight.stride(0) % 4 or weight.data_ptr() % 4:
        raise ValueError("the decode kernel needs K % 8 == 0 and 4-byte aligned weight rows")
    max_m = TC_MAX_ROWS if cfg.get("TC", False) else GEMV_MAX_ROWS
    if m > max_m:
        raise ValueError(f"the {'tc' if cfg.get('TC') else 'gemv'} decode tile takes at most {max_m} rows")
    w32 = weight.view(torch.int32) if weight.dtype == torch.uint8 else weight
    kw = k // 8
    split, kps, tile = decode_tiling(fmt, m, k, cfg, x.dtype == torch.bfloat16)
    n1, n2, nseg = segment_bounds(segments, n, n_rows, glu)
    fuse_shrink = lora_A is not None and lora_h is None and split > 1
    if fuse_shrink:  # the decode programs of split s write h's partial s (one row of A each)
        if lora_A.shape[1] != k or lora_A.stride(1) != 1:
            raise ValueError("lora_A must be [R_total, K] and row-major")
        lora_h = partials_view(h_out, split, m, lora_A.shape[0], x.device)
    elif lora_A is not None and lora_h is None:
        lora_h = lora_shrink(x, lora_A, out=h_out)
    lora, lora_rp = lora_args(lora_h, lora_B, lora_rank)
    if scale is not None and scale.dtype != torch.uint8:
        scale = scale.view(torch.uint8)
    dummy = weight
    gs = global_scale if global_scale is not None else dummy
    grid = (triton.cdiv(n, tile["BLOCK_N"]), split)
    common = dict(
        tile,
        HAS_BIAS=bias is not None,
        LORA_R=lora,
        LORA_RP=lora_rp,
        NSEG=nseg,
        HS_P=h_splits_tile(lora_h, lora),
        GLU=glu,
    )
    hargs = (lora_h.stride(0) if lora else 0, lora_h.stride(1) if lora else 0, lora_B.stride(0) if lora else 0)
    if split == 1:
        _decode_kernel[grid](
            x,
            w32,
            scale,
            gs,
            bias if bias is not None else dummy,
            lora_h if lora else dummy,
            lora_B if lora else dummy,
            out,
            dummy,
            dummy,
            m,
            n,
            kw,
            kps,
            n1,
            n2,
            lora_h.shape[0] if lora else 0,
            float(lora_scale),
            x.stride(0),
            w32.stride(0),
            scale.stride(0),
            *hargs,
            out.stride(0),
            0,
            0,
            **common,
        )
        return out
    ws = partials_workspace(split * m * n_rows, x.device, partials_out).view(split, m, n_rows)
    if fuse_shrink:  # h_ptr is the shrink's output here (no epilogue in this launch)
        shrink = dict(SHRINK_R=lora_A.shape[0], SHRINK_BK=shrink_block_k(tile["BLOCK_M"]))
        h_arg, a_arg, shs, shm, sar = lora_h, lora_A, lora_h.stride(0), lora_h.stride(1), lora_A.stride(0)
    else:
        shrink, (h_arg, a_arg, shs, shm, sar) = {}, (dummy, dummy, 0, 0, 0)
    _decode_kernel[grid](
        x,
        w32,
        scale,
        gs,
        dummy,
        h_arg,
        dummy,
        ws,
        ws,
        a_arg,
        m,
        n,
        kw,
        kps,
        n1,
        n2,
        0,
        1.0,
        x.stride(0),
        w32.stride(0),
        scale.stride(0),
        shs,
        shm,
        0,
        ws.stride(1),
        ws.stride(0),
        sar,
        **common,
        **shrink,
    )
    return linear_epilogue(ws, bias, lora_h, lora_B, lora_rank, lora_scale, segments, glu, out)
