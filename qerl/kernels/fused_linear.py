"""Weight-only quantized linear for few rows (decode): y = x @ deq(W).T (+ bias) (+ LoRA), one pass over W.

One Triton kernel serves NVFP4, MXFP4 and dense (bf16) weights, so the qerl bf16
baseline runs the same engine. Each program owns BLOCK_N output rows and streams its
packed rows once along K; E2M1 codes are decoded with bit operations (a code's
magnitude bits shifted into an fp16 exponent/mantissa, the 2**-14 that this leaves
folded into the block step), the E4M3 block scale is decoded the same way from its
uint8 bits, and the step `float(scale) / global_scale` is formed in fp32 exactly as
the reference does, so the dequantized weight is bit-identical to
`qerl.quant.nvfp4.nvfp4_dequantize(...).to(x.dtype)` before it meets x.

- MMA_MIN_M..MMA_MAX_M rows (1..32; 1..8 while version 8 is on), NVFP4 with bf16 x on Hopper (version 7,
  `nvfp4_mma`, Gluon): nibbles j and j + 4 of each int32 word are decoded straight into one `mma.sync`
  operand register (words and scales loaded straight into registers); fp32 partials + the epilogue launch.
  Tiles: `mma_config`.
- WG_MIN_M..WG_MAX_M rows (9..128), NVFP4 with bf16 x on Hopper (version 8, `nvfp4_wgmma`, Gluon): the same
  decode into the registers of warpgroup MMAs whose x the program stages in shared memory once a step;
  fp32 partials + the epilogue launch. Tiles: `wgmma_config`.
- M < TC_MIN_M otherwise, NVFP4/MXFP4 (version 6, `_gemv_rows` in `_decode_kernel`): packed weights read as
  int32 words (8 codes) in 16-byte runs, decoded by one inline-asm block (two codes per shift/mask
  into an f16x2, then exact f16->f32), joined into natural K order and multiplied in fp32 with one
  contiguous vector of x per row; each scale block's products are summed and scaled once, the NVFP4
  global scale is applied once per row. Split-K for short grids, whose fp32 partials are summed by the
  epilogue launch (`linear_epilogue`). W is not rounded to the activation dtype first: bf16 results
  differ from the reference by that rounding. Tiles per shape class: `gemv_config`.
- TC_MIN_M..TC_MAX_M rows (5..64), NVFP4/MXFP4 otherwise (version 5, `_tc_rows`, same launch and
  epilogues): the weight tile is decoded in registers straight to bf16 and multiplied
  on tensor cores with x^T (swap AB, rows padded to 16; Triton stages the tile in shared memory).
  Tiles: `tc_config`.
- bf16 weights, and the rest: the older loop (`_fused_linear_kernel`, `tl.dot` on
  tiles of 16..64 rows, W dequantized bit-identically). The decode engine instead runs
  bf16 weights, and NVFP4/MXFP4 above 64 rows, through cuBLAS + `linear_epilogue`.

Epilogue, fused so the decode step has few launches:
- bias, then the LoRA update `scale * h @ B.T` where `h = x @ A.T` comes from
  `lora_shrink` as split-K partials [S, M, R_total] summed here. Rows may belong to
  up to 3 fused modules (q/k/v): row n uses segment `(n >= n1) + (n >= n2)`, i.e. its
  own R columns of h and its own global scale.
- GLU (gate/up fused): rows [0, N) are gate, rows [N, 2N) are up, out = silu(g) * u.
Roundings follow the reference module (`QuantLinear.forward` then `F.silu(g) * u`):
the matmul, the bias add and the LoRA add each round to the output dtype. The epilogue launch's LoRA dot
(16+ rows a program) runs in tf32 for bf16/fp16 outputs (finer than their rounding; 2.3x faster than the fp32
dot), in fp32 otherwise.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, KernelUnavailable, next_pow2, pdl_launch, pdl_wait, require
from .lora_shrink import lora_shrink, partials_view
from .nvfp4_mma import MMA_MAX_M, mma_config, mma_partials, mma_supported
from .nvfp4_wgmma import WG_MAX_M, WG_MIN_M, wgmma_config, wgmma_partials, wgmma_supported

FMT_CODES = {"nvfp4": 0, "mxfp4": 1, "bf16": 2}

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _e2m1_scaled(c):
        """E2M1 code (int32, 0..15) -> its value * 2**-14 in fp32 (exact)."""
        bits = ((c & 7) << 9) | ((c & 8) << 12)
        return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _e4m3_value(b):
        """float8_e4m3fn bits (int32, 0..255) -> value in fp32 (exact; NaN not handled)."""
        bits = ((b & 0x7F) << 7) | ((b & 0x80) << 8)
        return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0

    @triton.jit
    def _mac(acc, x, w, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr):
        # x [BM, BK], w [BN, BK] -> acc [BM, BN] += x @ w.T
        if USE_DOT:
            return tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
        else:
            return acc + tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)

    @triton.jit
    def _rows(
        x_ptr,
        w_ptr,
        s_ptr,
        gs_ptr,
        bias_ptr,
        h_ptr,
        lb_ptr,
        rm,
        m_mask,
        rn,
        n_mask,
        K,
        n1,
        n2,
        n_hsplit,
        lora_scale,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_hs,
        stride_hm,
        stride_lbn,
        FMT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_DOT: tl.constexpr,
        DOT_PREC: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        LORA_R: tl.constexpr,
        LORA_RP: tl.constexpr,
        NSEG: tl.constexpr,
        HS_P: tl.constexpr,
    ):
        """[BM, BN] fp32 outputs of weight rows rn, rounded like the reference module."""
        out_ty: tl.constexpr = x_ptr.dtype.element_ty
        seg = (rn >= n1).to(tl.int32) + (rn >= n2).to(tl.int32)  # [BN] fused-module index
        if FMT == 2:
            if USE_DOT:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            else:  # per-lane partial sums, reduced once after the loop
                acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_mask = rk < K
                w = tl.load(
                    w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0
                )
                x = tl.load(
                    x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0
                )
                if USE_DOT:
                    acc = tl.dot(x, tl.trans(w.to(out_ty)), acc, input_precision=DOT_PREC)
                else:
                    acc3 += x.to(tl.float32)[:, None, :] * w.to(out_ty).to(tl.float32)[None, :, :]
            if not USE_DOT:
                acc = tl.sum(acc3, axis=2)
        else:
            # Packed bytes are read as [BN, NB, G]: G bytes share one block scale (NVFP4: 8 bytes =
            # 16 values, MXFP4: 16 bytes = 32 values), so the scale broadcasts instead of being gathered.
            G: tl.constexpr = 8 if FMT == 0 else 16
            KH: tl.constexpr = BLOCK_K // 2
            NB: tl.constexpr = KH // G
            rb = tl.arange(0, NB)
            rj = tl.arange(0, G)
            if FMT == 0:
                gs = tl.load(gs_ptr + seg, mask=n_mask, other=1.0)  # [BN] global scale of each row's module
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if not USE_DOT:
                acc3 = tl.zeros((BLOCK_M, BLOCK_N, NB), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                blk = k0 // (2 * G) + rb  # [NB] scale column
                hb = blk[:, None] * G + rj[None, :]  # [NB, G] packed byte index: columns 2*hb (low nibble), 2*hb+1
                h_mask = hb < K // 2
                wm = n_mask[:, None, None] & h_mask[None, :, :]
                p = tl.load(w_ptr + rn[:, None, None] * stride_wn + hb[None, :, :], mask=wm, other=0).to(tl.int32)
                sm = n_mask[:, None] & (blk < K // (2 * G))[None, :]
                sb = tl.load(s_ptr + rn[:, None] * stride_sn + blk[None, :], mask=sm, other=0).to(tl.int32)
                if FMT == 0:
                    step = (_e4m3_value(sb) / gs[:, None]) * 16384.0
                else:  # E8M0; e = 0 reads as 0, not 2**-127
                    step = (sb << 23).to(tl.float32, bitcast=True) * 16384.0
                xm = m_mask[:, None, None] & h_mask[None, :, :]
                xp = x_ptr + rm[:, None, None] * stride_xm + 2 * hb[None, :, :]
                x_lo = tl.load(xp, mask=xm, other=0.0)  # [BM, NB, G]
                x_hi = tl.load(xp + 1, mask=xm, other=0.0)
                if USE_DOT:  # dequantize in full (rounded to the activation dtype, as the reference), tensor cores
                    w_lo = (_e2m1_scaled(p & 15) * step[:, :, None]).to(out_ty)  # [BN, NB, G]
                    w_hi = (_e2m1_scaled(p >> 4) * step[:, :, None]).to(out_ty)
                    acc = tl.dot(
                        tl.reshape(x_lo, (BLOCK_M, KH)),
                        tl.trans(tl.reshape(w_lo, (BLOCK_N, KH))),
                        acc,
                        input_precision=DOT_PREC,
                    )
                    acc = tl.dot(
                        tl.reshape(x_hi, (BLOCK_M, KH)),
                        tl.trans(tl.reshape(w_hi, (BLOCK_N, KH))),
                        acc,
                        input_precision=DOT_PREC,
                    )
                else:
                    # Few rows: x times the exact E2M1 values, summed over the block in registers, then
                    # one multiply by the block step: ~6 ALU ops per weight instead of ~20 (the decode
                    # loop is ALU-bound, not memory-bound). The weight is not rounded to the activation
                    # dtype first, so bf16 results differ from the reference by that rounding (~2**-9).
                    v_lo = _e2m1_scaled(p & 15)
                    v_hi = _e2m1_scaled(p >> 4)
                    part = tl.sum(
                        x_lo.to(tl.float32)[:, None, :, :] * v_lo[None, :, :, :]
                        + x_hi.to(tl.float32)[:, None, :, :] * v_hi[None, :, :, :],
                        axis=3,
                    )  # [BM, BN, NB]
                    acc3 += part * step[None, :, :]
            if not USE_DOT:
                acc = tl.sum(acc3, axis=2)
        return _epilogue(
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
            out_ty,
            BLOCK_M,
            USE_DOT,
            HAS_BIAS,
            LORA_R,
            LORA_RP,
            NSEG,
            HS_P,
            "ieee",
        )

    @triton.jit
    def _fused_linear_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        gs_ptr,
        bias_ptr,
        h_ptr,
        lb_ptr,
        y_ptr,
        M,
        N,
        K,
        n1,
        n2,
        n_hsplit,
        lora_scale,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_hs,
        stride_hm,
        stride_lbn,
        stride_ym,
        FMT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_DOT: tl.constexpr,
        DOT_PREC: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        LORA_R: tl.constexpr,
        LORA_RP: tl.constexpr,
        NSEG: tl.constexpr,
        HS_P: tl.constexpr,
        GLU: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = rm < M
        n_mask = rn < N
        y = _rows(
            x_ptr,
            w_ptr,
            s_ptr,
            gs_ptr,
            bias_ptr,
            h_ptr,
            lb_ptr,
            rm,
            m_mask,
            rn,
            n_mask,
            K,
            n1,
            n2,
            n_hsplit,
            lora_scale,
            stride_xm,
            stride_wn,
            stride_sn,
            stride_hs,
            stride_hm,
            stride_lbn,
            FMT,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            USE_DOT,
            DOT_PREC,
            HAS_BIAS,
            LORA_R,
            LORA_RP,
            NSEG,
            HS_P,
        )
        out_ty = y_ptr.dtype.element_ty
        if GLU:
            u = _rows(
                x_ptr,
                w_ptr,
                s_ptr,
                gs_ptr,
                bias_ptr,
                h_ptr,
                lb_ptr,
                rm,
                m_mask,
                rn + N,
                n_mask,
                K,
                n1,
                n2,
                n_hsplit,
                lora_scale,
                stride_xm,
                stride_wn,
                stride_sn,
                stride_hs,
                stride_hm,
                stride_lbn,
                FMT,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                USE_DOT,
                DOT_PREC,
                HAS_BIAS,
                LORA_R,
                LORA_RP,
                NSEG,
                HS_P,
            )
            g = y * tl.sigmoid(y)
            y = g.to(out_ty).to(tl.float32) * u
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(out_ty), mask=m_mask[:, None] & n_mask[None, :])

    # ---- int32 words of packed E2M1 codes (8 a word) ----------------------------------------------------
    # Word w of a row holds columns 8w..8w+7, nibble i (bits 4i..4i+3) = column 8w+i. One inline-asm
    # block turns a word into 8 fp32 values (E2M1 * 2**-14) with 4 shift/mask pairs that place two
    # codes at once into the sign/exponent/mantissa bits of an f16x2, then 8 exact f16->f32 converts.

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
                _e2m1_scaled(q & 15),
                _e2m1_scaled((q >> 4) & 15),
                _e2m1_scaled((q >> 8) & 15),
                _e2m1_scaled((q >> 12) & 15),
                _e2m1_scaled((q >> 16) & 15),
                _e2m1_scaled((q >> 20) & 15),
                _e2m1_scaled((q >> 24) & 15),
                _e2m1_scaled((q >> 28) & 15),
            )

    @triton.jit
    def _block_scale(sb, FMT: tl.constexpr):
        """Scale bytes (int32) -> fp32 block scale: E4M3 (NVFP4) or E8M0 (MXFP4; e = 0 reads as 0)."""
        if FMT == 0:
            return _e4m3_value(sb)
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

    # ---- version 6: up to 8 rows on CUDA cores, 16-byte weight loads, one contiguous vector of x per row ---
    # Version 4 (deleted) spent most of its loop on addressing (a word and eight scalar x loads per thread)
    # with 8 bytes of weights in flight per thread. Here a [BLOCK_N, BKW] tile of words is decoded
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
        USE_ASM: tl.constexpr,
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
            v0, v1, v2, v3, v4, v5, v6, v7 = _decode_word(q, USE_ASM)
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

    # ---- version 5: 1..64 rows on tensor cores (swap AB: weight rows fill the MMA's M dimension) --------
    # A [BN, 8*BKW] weight tile is decoded in registers to bf16 values v * scale * 2**-16 (exact: an E2M1
    # value times an E4M3 or power-of-two scale has at most 6 significant bits) and multiplied with
    # x^T [8*BKW, BM] (rows padded to 16) by tl.dot with fp32 accumulation; 2**16 (and the NVFP4 global
    # scale) is applied once per row at the end. The asm decode places the codes of nibbles i and i+4
    # of a word into a bf16x2 as v * 2**-126 (e1 e0 m in exponent/mantissa bits 8..6, the E=0 codes
    # landing on bf16 subnormals) and one mul.rn.bf16x2 by scale * 2**110 gives v * scale * 2**-16:
    # about 1.5 integer ops and half a multiply per weight. Non-bf16 activations use fp32 weights.

    @triton.jit
    def _decode_word_tc(q, c, cf, USE_ASM: tl.constexpr, W_BF16: tl.constexpr):
        """int32 words [..] -> 8 tensors (nibbles 0..7) of v * scale * 2**-16.
        c: int32 bf16x2 pair of scale * 2**110 (asm); cf: fp32 scale * 2**-2 (plain path)."""
        if USE_ASM and W_BF16:
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
        USE_ASM: tl.constexpr,
        W_BF16: tl.constexpr,
        SWAP_AB: tl.constexpr,
    ):
        """[BLOCK_M, BLOCK_N] fp32 partial sums over words [k_lo, k_lo + k_per_split) of rows rn (global scale applied)."""
        GW: tl.constexpr = 2 if FMT == 0 else 4  # words per scale block
        BK: tl.constexpr = BKW * 8
        rnc = tl.where(n_mask, rn, 0)
        wrow = w_ptr + rnc[:, None] * stride_ww
        srow = s_ptr + rnc[:, None] * stride_sn
        rw0 = tl.arange(0, BKW)
        rk0 = tl.arange(0, BK)
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # y
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
            v0, v1, v2, v3, v4, v5, v6, v7 = _decode_word_tc(q, cb | (cb << 16), sv * 0.25, USE_ASM, W_BF16)
            w = _natural_k(v0, v1, v2, v3, v4, v5, v6, v7, BLOCK_N, BK)
            if SWAP_AB:  # weights as the MMA's A operand (wgmma for 64-row tiles: the tile is staged in smem)
                xm = m_mask[None, :] & (rk < KW * 8)[:, None]
                xt = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None], mask=xm, other=0.0)  # x^T [BK, BM]
                if W_BF16:
                    acc = tl.dot(w, xt, acc)
                else:
                    acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
            else:  # weights as the B operand of mma.sync, from registers (no smem round trip of the tile); <= 16 rows
                xm = m_mask[:, None] & (rk < KW * 8)[None, :]
                xr = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=xm, other=0.0)  # x [BM, BK]
                if W_BF16:
                    acc = tl.dot(xr, tl.trans(w), acc)
                else:
                    acc = tl.dot(xr.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        f = _row_factor(gs_ptr, seg, n_mask, 65536.0, FMT, BLOCK_N)
        if SWAP_AB:
            y = tl.trans(acc * f[:, None])
        else:
            y = acc * f[None, :]
        return y

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
        USE_ASM: tl.constexpr,
        TC: tl.constexpr,
        W_BF16: tl.constexpr,
        SWAP_AB: tl.constexpr,
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
                USE_ASM,
                W_BF16,
                SWAP_AB,
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
                USE_ASM,
                PREFETCH,
            )

    @triton.jit
    def _epilogue(
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
                    lora = _mac(lora, hs, bs, USE_DOT and LORA_RP >= 16, LORA_PREC)
            y = (y + (lora * lora_scale).to(out_ty).to(tl.float32)).to(out_ty).to(tl.float32)
        return y

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
        USE_ASM: tl.constexpr,
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
        SWAP_AB: tl.constexpr,
        PREFETCH: tl.constexpr,
        SHRINK_R: tl.constexpr = 0,
        SHRINK_BK: tl.constexpr = 256,
        PDL: tl.constexpr = False,
    ):
        """All M rows in one tile (TC: tensor cores, else <= GEMV_MAX_M rows on CUDA cores). SPLIT > 1: fp32
        partials [SPLIT, M, N_rows] to ws (epilogue: _pre_kernel, a second launch; summing them in the last
        program of each tile instead was measured slower, benchmarks/RESULTS.md).
        SHRINK_R > 0 (with SPLIT > 1): the programs of split s also write the LoRA shrink's partials
        h[s] = x[:, chunk s] @ A[:, chunk s].T (A [SHRINK_R, K], one row of A per program) to h_ptr, which the
        epilogue launch sums: no separate `lora_shrink` launch."""
        pdl_wait(PDL)
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
            USE_ASM,
            TC,
            W_BF16,
            SWAP_AB,
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
                    USE_ASM,
                    TC,
                    W_BF16,
                    SWAP_AB,
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
            y = _epilogue(
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
                    USE_ASM,
                    TC,
                    W_BF16,
                    SWAP_AB,
                    PREFETCH,
                )
                u = _epilogue(
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

    @triton.jit
    def _pre_kernel(
        p_ptr,
        bias_ptr,
        h_ptr,
        lb_ptr,
        y_ptr,
        M,
        N,
        n1,
        n2,
        n_hsplit,
        lora_scale,
        stride_ps,
        stride_pm,
        stride_hs,
        stride_hm,
        stride_lbn,
        stride_ym,
        S: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_DOT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        LORA_R: tl.constexpr,
        LORA_RP: tl.constexpr,
        NSEG: tl.constexpr,
        HS_P: tl.constexpr,
        GLU: tl.constexpr,
        PDL: tl.constexpr = False,
        LORA_PREC: tl.constexpr = "ieee",
        SEG_SKIP: tl.constexpr = False,
    ):
        """Epilogue over a precomputed product: the sum of S partials p[s, M, N_rows] (a cuBLAS output when
        S = 1, rounded to its dtype like the reference matmul), + bias, + LoRA, (+ SiLU gate)."""
        pdl_wait(PDL)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = rm < M
        n_mask = rn < N
        msk = m_mask[:, None] & n_mask[None, :]
        out_ty: tl.constexpr = y_ptr.dtype.element_ty
        pp = p_ptr + rm[:, None] * stride_pm + rn[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(S):
            acc += tl.load(pp + s * stride_ps, mask=msk, other=0.0).to(tl.float32)
        seg = (rn >= n1).to(tl.int32) + (rn >= n2).to(tl.int32)
        y = _epilogue(
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
            out_ty,
            BLOCK_M,
            USE_DOT,
            HAS_BIAS,
            LORA_R,
            LORA_RP,
            NSEG,
            HS_P,
            LORA_PREC,
            SEG_SKIP,
        )
        if GLU:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(S):
                acc += tl.load(pp + N + s * stride_ps, mask=msk, other=0.0).to(tl.float32)
            segu = (rn + N >= n1).to(tl.int32) + (rn + N >= n2).to(tl.int32)
            u = _epilogue(
                acc,
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
                USE_DOT,
                HAS_BIAS,
                LORA_R,
                LORA_RP,
                NSEG,
                HS_P,
                LORA_PREC,
                SEG_SKIP,
            )
            g = y * tl.sigmoid(y)
            y = g.to(out_ty).to(tl.float32) * u
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(out_ty), mask=msk)


TC_MAX_M = 64  # rows the tensor-core decode kernel (version 5) takes in one tile
GEMV_MAX_M = 8  # rows version 6 (CUDA cores) takes
TC_MIN_M = 5  # from this many rows up, NVFP4/MXFP4 use version 5 (tensor cores); below it version 6 (H100 sweep)
MMA_MIN_M = 1  # version 7 (where supported) from this many rows up: faster than version 6 at 1, 2 and 4 rows (H200)


def pick_config(m: int, n: int, k: int, fmt: str, mma: bool = False, wgmma: bool = False) -> dict:
    """Tile sizes by shape (measured on an H100/H200; see benchmarks/RESULTS.md). mma: version 7
    (`nvfp4_mma`, Gluon) may serve NVFP4 from MMA_MIN_M to MMA_MAX_M rows (the caller checked `mma_supported`);
    wgmma: version 8 (`nvfp4_wgmma`) may serve NVFP4 from WG_MIN_M to WG_MAX_M rows (the caller checked
    `wgmma_supported`)."""
    if wgmma and fmt == "nvfp4" and WG_MIN_M <= m <= WG_MAX_M:
        return wgmma_config(m, n, k)
    if mma and fmt == "nvfp4" and MMA_MIN_M <= m <= MMA_MAX_M:
        return mma_config(m, n, k)
    if TC_MIN_M <= m <= TC_MAX_M and fmt in ("nvfp4", "mxfp4"):
        return tc_config(m, n, k)
    if m <= GEMV_MAX_M and fmt in ("nvfp4", "mxfp4"):
        return gemv_config(m, n, k)
    if m <= 8:
        bm = next_pow2(m)
        return dict(BLOCK_M=bm, BLOCK_N=8, BLOCK_K=128 if bm <= 2 else 64, USE_DOT=False, num_warps=4)
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    return dict(BLOCK_M=bm, BLOCK_N=64 if n >= 8192 else 32, BLOCK_K=256, USE_DOT=True, num_warps=8 if n >= 8192 else 4)


TARGET_PROGRAMS = 264  # version 5 splits K until the grid has about this many programs (2 per SM on H100/H200)


# version 6: (BLOCK_N, num_warps, PREFETCH, warps in the grid) by shape class and rows, from the H100 sweep
# (benchmarks/bench_kernels_gpu.py --v6-sweep, Qwen2.5-7B shapes); K is split until the grid holds about
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
    """Version 6 tiles for m <= GEMV_MAX_M rows of an [n, k] weight (tile fields given override the table)."""
    cls = "down" if k >= 8192 else ("narrow" if n <= 8192 else "wide")
    bn, nw, pf, warps = GEMV_TILES[cls][1 if m == 1 else (2 if m == 2 else 4)]
    bn, nw = block_n or bn, num_warps or nw
    pf = pf if prefetch is None else prefetch
    split = _fit_split(max(1, min(16, round(warps / (-(-n // bn) * nw)))), k, bkw)
    return dict(WORDS=True, BLOCK_N=bn, BKW=bkw, SPLIT=split, PREFETCH=pf, USE_ASM=True, num_warps=nw, num_stages=1)


def tc_config(m: int, n: int, k: int, block_n: int = 64, bkw: int = 8, num_warps: int = 4, num_stages: int = 3) -> dict:
    """Version 5: split K until the grid has about TARGET_PROGRAMS programs (at most 8 splits)."""
    split = _fit_split(max(1, min(8, TARGET_PROGRAMS // -(-n // block_n))), k, bkw)
    return dict(
        WORDS=True,
        TC=True,
        BLOCK_N=block_n,
        BKW=bkw,
        SPLIT=split,
        USE_ASM=True,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def fused_linear(
    x: torch.Tensor,
    fmt: str,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    lora_h: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    lora_rank: int = 0,
    lora_scale: float = 1.0,
    segments: tuple[int, int] | None = None,
    glu: bool = False,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    lora_A: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
    mma: bool = True,
    wgmma: bool = True,
) -> torch.Tensor:
    """x [M, K] -> y [M, N] (or [M, N/2] with glu) in x.dtype.

    weight: nvfp4/mxfp4 packed uint8 [N, K/2] (+ scale [N, K/16] e4m3 or [N, K/32] e8m0,
    + global_scale fp32 [n_segments] for nvfp4), or dense [N, K].
    lora_h: [S, M, R_total] fp32 partial sums of x @ A.T; lora_B: [N, r] fp32.
    lora_A: [R_total, K] instead of lora_h: h is computed here, by the decode kernel itself (version 7
    always, versions 5/6 where they split K: no `lora_shrink` launch), else by `lora_shrink`; h_out: fp32
    scratch for its partials (>= MAX_SPLITS * M * R_total values; allocated if None).
    segments: (n1, n2) row boundaries of fused modules (q | k | v); with glu, rows of up start at N/2.
    mma: let version 7 (register-fed tensor cores, `nvfp4_mma`) take the rows it supports when no config is given;
    wgmma: let version 8 (warpgroup MMA, `nvfp4_wgmma`) take the rows it serves when no config is given.
    """
    require(x, weight, what="the fused linear kernel")
    if fmt not in FMT_CODES:
        raise ValueError(f"no fused linear kernel for format '{fmt}'")
    if x.ndim != 2 or x.stride(1) != 1:
        raise ValueError("x must be a 2-D tensor with unit stride along K")
    m, k = x.shape
    n_rows = weight.shape[0]
    if weight.stride(1) != 1:
        raise ValueError("weight must be row-major")
    kw = weight.shape[1] * (2 if fmt != "bf16" else 1)
    if kw != k:
        raise ValueError(f"x has K={k} but the weight has K={kw}")
    n = n_rows // 2 if glu else n_rows
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = dict(
        config
        or pick_config(
            m,
            n,
            k,
            fmt,
            mma=mma and mma_supported(x, fmt, k),
            wgmma=wgmma and wgmma_supported(x.device, x.dtype, fmt, k),
        )
    )
    if cfg.pop("WORDS", False):
        return _decode_linear(
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
            lora_A,
            h_out,
        )
    if lora_A is not None and lora_h is None:
        lora_h = lora_shrink(x, lora_A, out=h_out)
    if x.dtype == torch.float32 and cfg["USE_DOT"]:
        cfg["DOT_PREC"] = "ieee"
    cfg.setdefault("DOT_PREC", "tf32")
    n1, n2, nseg = _segments(segments, n, n_rows, glu)
    lora, lora_rp = _lora_args(lora_h, lora_B, lora_rank)
    dummy = weight
    if scale is not None and scale.dtype != torch.uint8:
        scale = scale.view(torch.uint8)  # the kernel decodes E4M3 / E8M0 from the bits
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    num_warps = cfg.pop("num_warps", 4)
    _fused_linear_kernel[grid](
        x,
        weight,
        scale if scale is not None else dummy,
        global_scale if global_scale is not None else dummy,
        bias if bias is not None else dummy,
        lora_h if lora else dummy,
        lora_B if lora else dummy,
        out,
        m,
        n,
        k,
        n1,
        n2,
        lora_h.shape[0] if lora else 0,
        float(lora_scale),
        x.stride(0),
        weight.stride(0),
        scale.stride(0) if scale is not None else 0,
        lora_h.stride(0) if lora else 0,
        lora_h.stride(1) if lora else 0,
        lora_B.stride(0) if lora else 0,
        out.stride(0),
        FMT=FMT_CODES[fmt],
        HAS_BIAS=bias is not None,
        LORA_R=lora,
        LORA_RP=lora_rp,
        NSEG=nseg,
        HS_P=_hs_p(lora_h, lora),
        GLU=glu,
        num_warps=num_warps,
        **cfg,
    )
    return out


_WS: dict = {}


def _workspace(numel: int, device) -> torch.Tensor:
    """fp32 split-K partials, one buffer per device (a call's partials are consumed by its own epilogue
    launch right after, in stream order, so consecutive calls may share it)."""
    buf = _WS.get(device)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1 << 20), dtype=torch.float32, device=device)
        _WS[device] = buf
    return buf[:numel]


def _hs_p(lora_h, lora: int) -> int:
    """Tile height for the split-K partials of h (all loaded at once by the epilogue)."""
    return next_pow2(lora_h.shape[0]) if lora else 1


def _segments(segments, n: int, n_rows: int, glu: bool) -> tuple[int, int, int]:
    """Row boundaries (n1, n2) of the fused modules and their count (with glu, the up rows start at n)."""
    n1, n2 = segments if segments is not None else ((n, 1 << 30) if glu else (1 << 30, 1 << 30))
    return n1, n2, 1 + (n1 < n_rows) + (n2 < n_rows)


def _lora_args(lora_h, lora_B, lora_rank):
    lora = lora_rank if (lora_h is not None and lora_B is not None and lora_rank) else 0
    return lora, (max(next_pow2(lora), 1) if lora else 1)


def _decode_tiling(fmt: str, m: int, k: int, cfg: dict, w_bf16: bool) -> tuple[int, int, dict]:
    """(splits, words per split, the tile's `_decode_kernel` constexprs and launch options) for m rows and a
    words config (`gemv_config` / `tc_config`); benchmarks/sass_decode.py compiles with the same."""
    tc = bool(cfg.get("TC", False))
    kw, bkw = k // 8, cfg["BKW"]
    kps = -(-kw // cfg.get("SPLIT", 1))
    kps = -(-kps // bkw) * bkw  # each split a whole number of steps
    split = -(-kw // kps)
    bm = max(16, next_pow2(m)) if tc else next_pow2(m)
    # MR (rows unrolled by version 6) is unused by version 5: one compiled kernel per row tile, not per row count.
    # The in-kernel LoRA epilogue uses tl.dot from 32 rows (measured: slower than the FMA form at 16).
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
            SWAP_AB=bool(cfg.get("SWAP_AB", True)) or bm > 16,  # Triton 3.6 fails to compile the other above 16
            PREFETCH=bool(cfg.get("PREFETCH", False)),
            USE_ASM=bool(cfg.get("USE_ASM", True)),
            SPLIT=split,
            num_warps=cfg.get("num_warps", 4),
            num_stages=cfg.get("num_stages", 1),
        ),
    )


def shrink_block_k(block_m: int) -> int:
    """K columns per step of the fused LoRA shrink (about 32 fp32 registers a thread for its x tile)."""
    return min(256, max(32, 4096 // block_m))


def _decode_linear(
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
):
    """Versions 6 (<= GEMV_MAX_M rows, CUDA cores) and 5 (TC: <= 64 rows, tensor cores): packed weights read as
    int32 words; split-K partials + epilogue launch."""
    m, k = x.shape
    n_rows = weight.shape[0]
    if k % 8 or weight.stride(0) % 4 or weight.data_ptr() % 4:
        raise ValueError("the decode kernel needs K % 8 == 0 and 4-byte aligned weight rows")
    if cfg.get("MMA", False):
        return _mma_linear(
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
            lora_A,
            h_out,
        )
    max_m = TC_MAX_M if cfg.get("TC", False) else GEMV_MAX_M
    if m > max_m:
        raise ValueError(f"the decode kernel takes at most {max_m} rows")
    w32 = weight.view(torch.int32) if weight.dtype == torch.uint8 else weight
    kw = k // 8
    split, kps, tile = _decode_tiling(fmt, m, k, cfg, x.dtype == torch.bfloat16)
    n1, n2, nseg = _segments(segments, n, n_rows, glu)
    fuse_shrink = lora_A is not None and lora_h is None and split > 1
    if fuse_shrink:  # the decode programs of split s write h's partial s (one row of A each)
        if lora_A.shape[1] != k or lora_A.stride(1) != 1:
            raise ValueError("lora_A must be [R_total, K] and row-major")
        lora_h = partials_view(h_out, split, m, lora_A.shape[0], x.device)
    elif lora_A is not None and lora_h is None:
        lora_h = lora_shrink(x, lora_A, out=h_out)
    lora, lora_rp = _lora_args(lora_h, lora_B, lora_rank)
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
        HS_P=_hs_p(lora_h, lora),
        GLU=glu,
        **pdl_launch(),
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
    ws = _workspace(split * m * n_rows, x.device).view(split, m, n_rows)
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


def _mma_linear(
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
):
    """Versions 7 and 8 (cfg["WGMMA"]): fp32 partials from the register-fed tensor-core kernel, then the
    epilogue launch."""
    wg = cfg.get("WGMMA", False)
    if wg and not wgmma_supported(x.device, x.dtype, fmt, x.shape[1]):
        raise KernelUnavailable("version 8 needs NVFP4, bf16 x, K % 256 == 0, sm_90 and Gluon")
    if not wg and not mma_supported(x, fmt, x.shape[1], cfg["BKW"]):
        raise KernelUnavailable(f"version 7 needs NVFP4, bf16 x, K % {8 * cfg['BKW']} == 0, sm_90+ and Gluon")
    m = x.shape[0]
    n_rows = weight.shape[0]
    fuse_shrink = lora_A is not None and lora_h is None  # the kernel's extra programs write h's partials
    if fuse_shrink:
        lora_h = partials_view(h_out, cfg["SPLIT"], m, lora_A.shape[0], x.device)
    n1, n2, _ = _segments(segments, n, n_rows, glu)
    w32 = weight.view(torch.int32) if weight.dtype == torch.uint8 else weight
    ws = _workspace(cfg["SPLIT"] * m * n_rows, x.device).view(cfg["SPLIT"], m, n_rows)
    (wgmma_partials if wg else mma_partials)(
        x,
        w32,
        scale.view(torch.uint8),
        global_scale,
        n1,
        n2,
        cfg,
        ws,
        lora_A if fuse_shrink else None,
        lora_h if fuse_shrink else None,
    )
    return linear_epilogue(ws, bias, lora_h, lora_B, lora_rank, lora_scale, segments, glu, out)


def epilogue_tile(
    m: int, nseg: int, glu: bool, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None
) -> tuple[int, int, int]:
    """(rows, output columns, warps) a program of the epilogue launch for m rows of a product of nseg fused
    modules. Up to 4 rows: all rows, 64 columns, the LoRA update by FMAs. From 5 rows, 16-row blocks (rows past
    m masked) and the tf32 dot: 32 columns for fused modules (q|k|v, gate|up), 64 for one module (o, down),
    which past 16 rows takes 128 columns; gate|up past 64 rows 32 x 64. H200 (benchmarks/bench_epilogue_gpu.py
    --v8, Qwen2.5-7B, us at 16 / 64 / 128 rows, this tile vs the previous 32 x 32 default past 16 rows): o 2.6
    / 2.8 / 3.8 vs 2.6 / 4.2 / 5.4, down 2.7 / 2.8 / 5.4 vs 2.7 / 4.2 / 9.4, q|k|v 2.1 / 3.2 / 4.2 vs 2.4 / 3.3 /
    4.6, gate|up 4.5 / 7.4 / 15.6 vs 5.2 / 7.6 / 16.4; at 8 rows gate|up on a 16-row block, 64 columns, by the
    dot 3.5 us, on 8-row blocks by FMAs (the default before) 9.5 (benchmarks/probe_epilogue_gpu.py).
    Arguments given override."""
    if m <= 4:
        bm, bn = next_pow2(m), 64
    elif nseg > 1 or glu:
        bm, bn = (32, 64) if glu and m > 64 else (16, 32)
    else:
        bm, bn = 16, (64 if m <= 16 else 128)
    return block_m or bm, block_n or bn, num_warps or 4


def linear_epilogue(
    p: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_h: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    lora_rank: int = 0,
    lora_scale: float = 1.0,
    segments: tuple[int, int] | None = None,
    glu: bool = False,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
    lora_dot: bool | None = None,
    lora_prec: str | None = None,
    seg_skip: bool = True,
) -> torch.Tensor:
    """The fused epilogue over a precomputed product p: [M, N_rows] (a cuBLAS output in the activation
    dtype) or [S, M, N_rows] fp32 split-K partials (summed). Same arguments as `fused_linear`; block_m,
    block_n, num_warps: rows and output columns a program, and its warps (default: `epilogue_tile`);
    lora_dot: the LoRA update by tl.dot (default from 16 rows a program)
    in lora_prec ("ieee" fp32 or "tf32"; default: tf32 for a bf16/fp16 output, whose rounding (2**-9) is
    coarser than tf32's (2**-11)), else by FMAs. The gate|up epilogue on the H200
    (benchmarks/probe_epilogue_gpu.py): 8 rows 9.5 us by FMAs on 8-row blocks, 3.5 by the tf32 dot on a
    16-row block; 64 rows 26.7 with the fp32 dot, 11.5 with tf32. seg_skip: no LoRA product for a fused
    module none of a tile's rows belongs to (the same sums: it would only add zeros; gate|up 11.5 -> 7.7 us at
    64 rows)."""
    require(p, what="the linear epilogue kernel")
    p3 = p if p.ndim == 3 else p.unsqueeze(0)
    if p3.stride(2) != 1:
        raise ValueError("the product must have unit stride along N")
    s_, m, n_rows = p3.shape
    n = n_rows // 2 if glu else n_rows
    if out is None:
        out = torch.empty((m, n), dtype=p.dtype, device=p.device)
    n1, n2, nseg = _segments(segments, n, n_rows, glu)
    lora, lora_rp = _lora_args(lora_h, lora_B, lora_rank)
    bm, bn, num_warps = epilogue_tile(m, nseg, glu, block_m, block_n, num_warps)
    dummy = p3
    _pre_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        p3,
        bias if bias is not None else dummy,
        lora_h if lora else dummy,
        lora_B if lora else dummy,
        out,
        m,
        n,
        n1,
        n2,
        lora_h.shape[0] if lora else 0,
        float(lora_scale),
        p3.stride(0),
        p3.stride(1),
        lora_h.stride(0) if lora else 0,
        lora_h.stride(1) if lora else 0,
        lora_B.stride(0) if lora else 0,
        out.stride(0),
        S=s_,
        BLOCK_M=bm,
        BLOCK_N=bn,
        USE_DOT=bm >= 16 if lora_dot is None else lora_dot,
        HAS_BIAS=bias is not None,
        LORA_R=lora,
        LORA_RP=lora_rp,
        NSEG=nseg,
        HS_P=_hs_p(lora_h, lora),
        GLU=glu,
        LORA_PREC=lora_prec or ("ieee" if out.dtype == torch.float32 else "tf32"),
        SEG_SKIP=seg_skip,
        num_warps=num_warps,
        **pdl_launch(),
    )
    return out
