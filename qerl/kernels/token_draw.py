"""Drawing one token per row from softmax(logits / T) on the GPU: the reference's inverse-CDF draw in two launches.

The reference (`rollout.sampling.sample_tokens`) makes an fp32 copy of the logits, divides, takes the
log-softmax, exponentiates, sums cumulatively over the whole vocabulary and binary-searches one uniform per row:
seven passes over [B, V] fp32 and a slow scan. Here the first launch reads each chunk of a row's logits once
(its max and sum of exponentials); the second, one program a row, scales the chunks' sums to the row's max,
finds the chunk where u x total falls, and sums that chunk's probabilities cumulatively to find the token. The
uniform comes from Philox keyed by a seed the caller draws from its generator on the device (no host sync, safe
in a CUDA graph). The log-prob returned is log softmax(logits / T) at the token, in fp32.
Byte model: B x V x element-size bytes read once, plus one chunk a row again (B x 4096 entries).
Temperature > 0 only, no top-k / top-p (the reference serves those).

`draw_tokens_reference` is the same draw in float64 PyTorch given the uniforms; `row_uniforms` writes the
uniforms the kernel uses for a seed (the tests compare the two).
"""

from __future__ import annotations

import torch

from .common import HAS_TRITON, next_pow2, require

BLOCK_V = 4096  # vocabulary entries per program of the first launch (and the chunk the second one scans)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _chunk_kernel(logits_ptr, part_ptr, V, stride_l, inv_t, C, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        v = c * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * stride_l + v, mask=v < V, other=float("-inf")).to(tl.float32) * inv_t
        m = tl.max(x, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # a chunk of masked (-inf) logits has no mass, not NaN
        tl.store(part_ptr + (row * C + c) * 2, m)
        tl.store(part_ptr + (row * C + c) * 2 + 1, tl.sum(tl.exp(x - m_safe), axis=0))

    @triton.jit
    def _pick_kernel(
        logits_ptr, part_ptr, seed_ptr, tok_ptr, lp_ptr, V, stride_l, inv_t, C, CP: tl.constexpr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0)
        c = tl.arange(0, CP)
        m = tl.load(part_ptr + (row * C + c) * 2, mask=c < C, other=float("-inf"))
        s = tl.load(part_ptr + (row * C + c) * 2 + 1, mask=c < C, other=0.0)
        mx = tl.max(m, axis=0)
        w = s * tl.exp(m - mx)  # each chunk's mass on the row's scale
        total = tl.sum(w, axis=0)
        u = tl.rand(tl.load(seed_ptr), row) * total
        cum = tl.cumsum(w, axis=0)
        # rounding (the chunk sums here and in the scan below are summed in different orders) may put u past
        # the last chunk or r past a chunk's last entry: such a draw takes the last one with mass, never one
        # with none
        chunk = tl.minimum(tl.sum((cum <= u).to(tl.int32), axis=0), tl.max(tl.where(w > 0, c, 0), axis=0))
        r = u - tl.sum(tl.where(c < chunk, w, 0.0), axis=0)  # what is left of u inside the chunk
        j = tl.arange(0, BLOCK)
        v = chunk * BLOCK + j
        x = tl.load(logits_ptr + row * stride_l + v, mask=v < V, other=float("-inf")).to(tl.float32) * inv_t
        p = tl.exp(x - mx)
        at = tl.sum((tl.cumsum(p, axis=0) <= r).to(tl.int32), axis=0)
        tok = chunk * BLOCK + tl.minimum(at, tl.max(tl.where(p > 0, j, 0), axis=0))
        xt = tl.load(logits_ptr + row * stride_l + tok).to(tl.float32) * inv_t
        tl.store(tok_ptr + row, tok.to(tl.int64))
        tl.store(lp_ptr + row, xt - mx - tl.log(total))

    @triton.jit
    def _uniforms_kernel(seed_ptr, out_ptr, B, BLOCK: tl.constexpr):
        row = tl.arange(0, BLOCK)
        tl.store(out_ptr + row, tl.rand(tl.load(seed_ptr), row), mask=row < B)


def draw_tokens(
    logits: torch.Tensor, temperature: float, seed: torch.Tensor, block: int = BLOCK_V
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (bf16 or fp32, unit stride along V), temperature > 0, seed int64 [1] on the device ->
    (token [B] int64, log-prob [B] fp32 of that token under softmax(logits / temperature))."""
    require(logits, seed, what="the token-draw kernel")
    if temperature <= 0:
        raise ValueError("draw_tokens samples at temperature > 0; take the argmax for greedy decoding")
    b, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    c = -(-v // block)
    part = torch.empty((b, c, 2), dtype=torch.float32, device=logits.device)
    tok = torch.empty(b, dtype=torch.int64, device=logits.device)
    lp = torch.empty(b, dtype=torch.float32, device=logits.device)
    inv_t = 1.0 / float(temperature)
    _chunk_kernel[(b, c)](logits, part, v, logits.stride(0), inv_t, c, BLOCK=block, num_warps=4)
    _pick_kernel[(b,)](
        logits, part, seed, tok, lp, v, logits.stride(0), inv_t, c, CP=max(2, next_pow2(c)), BLOCK=block, num_warps=8
    )
    return tok, lp


def row_uniforms(seed: torch.Tensor, rows: int) -> torch.Tensor:
    """The uniforms [rows] in [0, 1) that `draw_tokens` draws row r's token with, for this seed."""
    require(seed, what="the token-draw kernel")
    out = torch.empty(rows, dtype=torch.float32, device=seed.device)
    _uniforms_kernel[(1,)](seed, out, rows, BLOCK=max(16, next_pow2(rows)))
    return out


def draw_tokens_reference(
    logits: torch.Tensor, temperature: float, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same draw in float64 PyTorch, given the uniforms u [B]: the first token whose cumulative probability
    exceeds u (as the reference engine's `sample_tokens`), and its log-prob."""
    logp = (logits.double() / temperature).log_softmax(-1)
    cdf = logp.exp().cumsum(-1)
    tok = (cdf <= (u.double() * cdf[:, -1])[:, None]).sum(-1).clamp(max=logits.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1).float()
