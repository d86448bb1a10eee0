"""Rotary embedding of q and k for one decode token per row, and the KV-cache write, in one launch.

Reads the fused q|k|v projection [B, (Hq + 2 Hkv) * D] (or computes it from the projection's split partials:
its epilogue, `fused_linear.Epilogue`, applied per head, so the decode step needs no epilogue launch for
q|k|v), writes rotated q [B, Hq, D] and
stores rotated k and v at cache slot `slot[0]` (a device scalar, so the launch can be
captured in a CUDA graph and replayed at every position). Rotary positions are per
row (left padding). Roundings follow `qerl.modeling.apply_rope` in the activation
dtype: cos/sin rounded to the dtype, each product rounded, then the sum.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, pdl_launch, pdl_wait, require

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .fused_linear import epilogue_cols

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, pos_ptr, slot_ptr, inv_ptr, q_ptr, k_ptr, v_ptr,
                           HQ, HKV, stride_qkv, stride_qb, stride_qh, stride_kb, stride_kh, stride_ks,
                           bias_ptr, h_ptr, lb_ptr, n1, n2, n_hsplit, lora_scale, stride_ps, stride_hs, stride_hm,
                           stride_lbn, D: tl.constexpr, EPI: tl.constexpr = False, S: tl.constexpr = 1,
                           HAS_BIAS: tl.constexpr = False, LORA_R: tl.constexpr = 0, LORA_RP: tl.constexpr = 1,
                           NSEG: tl.constexpr = 1, HS_P: tl.constexpr = 1, PDL: tl.constexpr = False):
        """EPI: qkv_ptr holds the q|k|v projection's product (`Epilogue`: S partials, split stride stride_ps,
        row stride stride_qkv), whose epilogue (bias, LoRA, roundings) each program applies to its head's columns."""
        pdl_wait(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)  # 0..HQ-1: a q head; HQ..HQ+HKV-1: a kv head
        HALF: tl.constexpr = D // 2
        i = tl.arange(0, HALF)
        dt = q_ptr.dtype.element_ty
        pos = tl.load(pos_ptr + b).to(tl.float32)
        f = pos * tl.load(inv_ptr + i)
        c = tl.cos(f).to(dt).to(tl.float32)
        s = tl.sin(f).to(dt).to(tl.float32)
        x1 = _qkv_cols(qkv_ptr, bias_ptr, h_ptr, lb_ptr, b, h * D + i, n1, n2, n_hsplit, lora_scale, stride_ps,
                       stride_qkv, stride_hs, stride_hm, stride_lbn, dt, EPI, S, HAS_BIAS, LORA_R, LORA_RP, NSEG, HS_P)
        x2 = _qkv_cols(qkv_ptr, bias_ptr, h_ptr, lb_ptr, b, h * D + HALF + i, n1, n2, n_hsplit, lora_scale, stride_ps,
                       stride_qkv, stride_hs, stride_hm, stride_lbn, dt, EPI, S, HAS_BIAS, LORA_R, LORA_RP, NSEG, HS_P)
        o1 = ((x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
        if h < HQ:
            qdst = q_ptr + b * stride_qb + h * stride_qh
            tl.store(qdst + i, o1)
            tl.store(qdst + HALF + i, o2)
        else:
            j = h - HQ
            slot = tl.load(slot_ptr)
            off = b * stride_kb + j * stride_kh + slot * stride_ks
            tl.store(k_ptr + off + i, o1)
            tl.store(k_ptr + off + HALF + i, o2)
            vc = (HQ + HKV + j) * D + i
            v1 = _qkv_cols(qkv_ptr, bias_ptr, h_ptr, lb_ptr, b, vc, n1, n2, n_hsplit, lora_scale, stride_ps,
                           stride_qkv, stride_hs, stride_hm, stride_lbn, dt, EPI, S, HAS_BIAS, LORA_R, LORA_RP, NSEG,
                           HS_P)
            v2 = _qkv_cols(qkv_ptr, bias_ptr, h_ptr, lb_ptr, b, vc + HALF, n1, n2, n_hsplit, lora_scale, stride_ps,
                           stride_qkv, stride_hs, stride_hm, stride_lbn, dt, EPI, S, HAS_BIAS, LORA_R, LORA_RP, NSEG,
                           HS_P)
            tl.store(v_ptr + off + i, v1.to(dt))
            tl.store(v_ptr + off + HALF + i, v2.to(dt))

    @triton.jit
    def _qkv_cols(qkv_ptr, bias_ptr, h_ptr, lb_ptr, b, cols, n1, n2, n_hsplit, lora_scale, stride_ps, stride_qkv,
                  stride_hs, stride_hm, stride_lbn, dt: tl.constexpr, EPI: tl.constexpr, S: tl.constexpr,
                  HAS_BIAS: tl.constexpr, LORA_R: tl.constexpr, LORA_RP: tl.constexpr, NSEG: tl.constexpr,
                  HS_P: tl.constexpr):
        """Columns `cols` of row b of the q|k|v projection, fp32: read, or (EPI) its deferred epilogue's values."""
        if EPI:
            return epilogue_cols(qkv_ptr, bias_ptr, h_ptr, lb_ptr, b, cols, n1, n2, n_hsplit, lora_scale, stride_ps,
                                 stride_qkv, stride_hs, stride_hm, stride_lbn, dt, S, HAS_BIAS, LORA_R, LORA_RP, NSEG,
                                 HS_P)
        else:
            return tl.load(qkv_ptr + b * stride_qkv + cols).to(tl.float32)


def rope_cache(qkv, pos: torch.Tensor, slot: torch.Tensor, inv_freq: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
               q_out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [B, (Hq+2Hkv)*D], or the q|k|v projection's deferred epilogue (`fused_linear.Epilogue`: its output
    is then never written, each program computes its head's columns); k_cache/v_cache [B_cap, Hkv, S, D] (one
    layer); -> q [B, Hq, D]."""
    from .fused_linear import Epilogue

    epi = isinstance(qkv, Epilogue)
    if epi:
        args, const = qkv.kernel_args()
        p3 = args[0]
        b, dtype, row_stride = p3.shape[1], k_cache.dtype, p3.stride(1)  # the activation dtype
        if p3.stride(2) != 1:
            raise ValueError("rope_cache: the product must have unit stride along N")
        # p, bias, h, B, n1, n2, n_hsplit, lora_scale, stride_ps, stride_pm (= row stride), stride_hs, stride_hm, stride_lbn
        src, extra = p3, [args[1], args[2], args[3], args[4], args[5], args[6], args[7], args[8], args[10], args[11],
                          args[12]]
    else:
        require(qkv, what="the rope/cache kernel")
        if qkv.stride(1) != 1:
            raise ValueError("rope_cache: head_dim must be the contiguous dimension")
        b, dtype, row_stride = qkv.shape[0], qkv.dtype, qkv.stride(0)
        src, extra, const = qkv, [qkv, qkv, qkv, 0, 0, 0, 1.0, 0, 0, 0, 0], {}
    require(src, k_cache, what="the rope/cache kernel")
    if q_out is None:
        q_out = torch.empty((b, num_heads, head_dim), dtype=dtype, device=k_cache.device)
    if k_cache.stride(3) != 1:
        raise ValueError("rope_cache: head_dim must be the contiguous dimension")
    _rope_cache_kernel[(b, num_heads + num_kv_heads)](
        src, pos, slot, inv_freq, q_out, k_cache, v_cache, num_heads, num_kv_heads,
        row_stride, q_out.stride(0), q_out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *extra, D=head_dim, EPI=epi, num_warps=1, **const, **pdl_launch())
    return q_out
