"""Weight-only quantized linear for few rows (decode): y = x @ deq(W).T (+ bias) (+ LoRA), one pass over W.

One Triton kernel serves NVFP4, MXFP4 and dense (bf16) weights, so the qerl bf16
baseline runs the same engine. Each program owns BLOCK_N output rows and streams its
packed rows once along K; E2M1 codes are decoded with bit operations (a code's
magnitude bits shifted into an fp16 exponent/mantissa, the 2**-14 that this leaves
folded into the block step), the E4M3 block scale is decoded the same way from its
uint8 bits, and the step `float(scale) / global_scale` is formed in fp32 exactly as
the reference does, so the dequantized weight is bit-identical to
`qerl.quant.nvfp4.nvfp4_dequantize(...).to(x.dtype)` before it meets x.

- M <= 8: CUDA-core multiply-add: x times the exact E2M1 values, summed over each
  scale block in registers, then one multiply by the block step (the decode is
  ALU-bound, so ops per weight decide the speed). Here W is not rounded to the
  activation dtype first: bf16 results differ from the reference by that rounding.
- M > 8: `tl.dot` on tiles of 16..64 rows of x, with W dequantized to the activation
  dtype (bit-identical to the reference weight).

Epilogue, fused so the decode step has few launches:
- bias, then the LoRA update `scale * h @ B.T` where `h = x @ A.T` comes from
  `lora_shrink` as split-K partials [S, M, R_total] summed here. Rows may belong to
  up to 3 fused modules (q/k/v): row n uses segment `(n >= n1) + (n >= n2)`, i.e. its
  own R columns of h and its own global scale.
- GLU (gate/up fused): rows [0, N) are gate, rows [N, 2N) are up, out = silu(g) * u.
Roundings follow the reference module (`QuantLinear.forward` then `F.silu(g) * u`):
the matmul, the bias add and the LoRA add each round to the output dtype.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_pow2, require

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
    def _rows(x_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, h_ptr, lb_ptr,
              rm, m_mask, rn, n_mask, K, n1, n2, n_hsplit, lora_scale,
              stride_xm, stride_wn, stride_sn, stride_hs, stride_hm, stride_lbn,
              FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, HAS_BIAS: tl.constexpr,
              LORA_R: tl.constexpr, LORA_RP: tl.constexpr, NSEG: tl.constexpr):
        """[BM, BN] fp32 outputs of weight rows rn, rounded like the reference module."""
        out_ty = x_ptr.dtype.element_ty
        seg = (rn >= n1).to(tl.int32) + (rn >= n2).to(tl.int32)  # [BN] fused-module index
        if FMT == 2:
            if USE_DOT:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            else:  # per-lane partial sums, reduced once after the loop
                acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_mask = rk < K
                w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
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
                    acc = tl.dot(tl.reshape(x_lo, (BLOCK_M, KH)), tl.trans(tl.reshape(w_lo, (BLOCK_N, KH))), acc,
                                 input_precision=DOT_PREC)
                    acc = tl.dot(tl.reshape(x_hi, (BLOCK_M, KH)), tl.trans(tl.reshape(w_hi, (BLOCK_N, KH))), acc,
                                 input_precision=DOT_PREC)
                else:
                    # Few rows: x times the exact E2M1 values, summed over the block in registers, then
                    # one multiply by the block step: ~6 ALU ops per weight instead of ~20 (the decode
                    # loop is ALU-bound, not memory-bound). The weight is not rounded to the activation
                    # dtype first, so bf16 results differ from the reference by that rounding (~2**-9).
                    v_lo = _e2m1_scaled(p & 15)
                    v_hi = _e2m1_scaled(p >> 4)
                    part = tl.sum(x_lo.to(tl.float32)[:, None, :, :] * v_lo[None, :, :, :]
                                  + x_hi.to(tl.float32)[:, None, :, :] * v_hi[None, :, :, :], axis=3)  # [BM, BN, NB]
                    acc3 += part * step[None, :, :]
            if not USE_DOT:
                acc = tl.sum(acc3, axis=2)
        y = acc.to(out_ty).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
            y = (y + b[None, :]).to(out_ty).to(tl.float32)
        if LORA_R > 0:
            rr = tl.arange(0, LORA_RP)
            r_mask = rr < LORA_R
            bl = tl.load(lb_ptr + rn[:, None] * stride_lbn + rr[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(NSEG):
                hs = tl.zeros((BLOCK_M, LORA_RP), dtype=tl.float32)
                for sp in range(0, n_hsplit):
                    hs += tl.load(h_ptr + sp * stride_hs + rm[:, None] * stride_hm + (s * LORA_R + rr)[None, :],
                                  mask=m_mask[:, None] & r_mask[None, :], other=0.0)
                bs = tl.where((seg == s)[:, None], bl, 0.0)
                lora = _mac(lora, hs, bs, USE_DOT and LORA_RP >= 16, "ieee")
            y = (y + (lora * lora_scale).to(out_ty).to(tl.float32)).to(out_ty).to(tl.float32)
        return y

    @triton.jit
    def _fused_linear_kernel(x_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, h_ptr, lb_ptr, y_ptr,
                             M, N, K, n1, n2, n_hsplit, lora_scale,
                             stride_xm, stride_wn, stride_sn, stride_hs, stride_hm, stride_lbn, stride_ym,
                             FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, HAS_BIAS: tl.constexpr,
                             LORA_R: tl.constexpr, LORA_RP: tl.constexpr, NSEG: tl.constexpr, GLU: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = rm < M
        n_mask = rn < N
        y = _rows(x_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, h_ptr, lb_ptr, rm, m_mask, rn, n_mask,
                  K, n1, n2, n_hsplit, lora_scale, stride_xm, stride_wn, stride_sn, stride_hs, stride_hm, stride_lbn,
                  FMT, BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, DOT_PREC, HAS_BIAS, LORA_R, LORA_RP, NSEG)
        out_ty = y_ptr.dtype.element_ty
        if GLU:
            u = _rows(x_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, h_ptr, lb_ptr, rm, m_mask, rn + N, n_mask,
                      K, n1, n2, n_hsplit, lora_scale, stride_xm, stride_wn, stride_sn, stride_hs, stride_hm, stride_lbn,
                      FMT, BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, DOT_PREC, HAS_BIAS, LORA_R, LORA_RP, NSEG)
            g = y * tl.sigmoid(y)
            y = g.to(out_ty).to(tl.float32) * u
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(out_ty), mask=m_mask[:, None] & n_mask[None, :])


def pick_config(m: int, n: int, k: int, fmt: str) -> dict:
    """Tile sizes by shape (tuned on an H100; see benchmarks/RESULTS.md)."""
    if m <= 8:
        bm = next_pow2(m)
        if fmt == "bf16":
            return dict(BLOCK_M=bm, BLOCK_N=8, BLOCK_K=128 if bm <= 2 else 64, USE_DOT=False, num_warps=4)
        return dict(BLOCK_M=bm, BLOCK_N=8 if bm <= 2 else 16, BLOCK_K=512 if bm <= 2 else 128, USE_DOT=False, num_warps=4)
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    return dict(BLOCK_M=bm, BLOCK_N=64 if n >= 8192 else 32, BLOCK_K=256, USE_DOT=True,
                num_warps=8 if n >= 8192 else 4)


def fused_linear(x: torch.Tensor, fmt: str, weight: torch.Tensor, scale: torch.Tensor | None = None,
                 global_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 lora_h: torch.Tensor | None = None, lora_B: torch.Tensor | None = None, lora_rank: int = 0,
                 lora_scale: float = 1.0, segments: tuple[int, int] | None = None, glu: bool = False,
                 out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K] -> y [M, N] (or [M, N/2] with glu) in x.dtype.

    weight: nvfp4/mxfp4 packed uint8 [N, K/2] (+ scale [N, K/16] e4m3 or [N, K/32] e8m0,
    + global_scale fp32 [n_segments] for nvfp4), or dense [N, K].
    lora_h: [S, M, R_total] fp32 partial sums of x @ A.T; lora_B: [N, r] fp32.
    segments: (n1, n2) row boundaries of fused modules (q | k | v); with glu, rows of up start at N/2.
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
    cfg = dict(config or pick_config(m, n, k, fmt))
    if x.dtype == torch.float32 and cfg["USE_DOT"]:
        cfg["DOT_PREC"] = "ieee"
    cfg.setdefault("DOT_PREC", "tf32")
    n1, n2 = segments if segments is not None else ((n, 1 << 30) if glu else (1 << 30, 1 << 30))
    nseg = 1 + (n1 < n_rows) + (n2 < n_rows)
    lora = lora_rank if (lora_h is not None and lora_B is not None and lora_rank) else 0
    dummy = weight
    if scale is not None and scale.dtype != torch.uint8:
        scale = scale.view(torch.uint8)  # the kernel decodes E4M3 / E8M0 from the bits
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    num_warps = cfg.pop("num_warps", 4)
    _fused_linear_kernel[grid](
        x, weight, scale if scale is not None else dummy, global_scale if global_scale is not None else dummy,
        bias if bias is not None else dummy, lora_h if lora else dummy, lora_B if lora else dummy, out,
        m, n, k, n1, n2, lora_h.shape[0] if lora else 0, float(lora_scale),
        x.stride(0), weight.stride(0), scale.stride(0) if scale is not None else 0,
        lora_h.stride(0) if lora else 0, lora_h.stride(1) if lora else 0, lora_B.stride(0) if lora else 0, out.stride(0),
        FMT=FMT_CODES[fmt], HAS_BIAS=bias is not None, LORA_R=lora, LORA_RP=max(next_pow2(lora), 1) if lora else 1,
        NSEG=nseg, GLU=glu, num_warps=num_warps, **cfg)
    return out
