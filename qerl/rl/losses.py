"""Policy-gradient loss (PPO-clip with clip-higher) and chunked log-probs / entropy.

GRPO, DAPO and Dr.GRPO share one clipped surrogate and differ only in `LossConfig`:

    GRPO:    eps_low = eps_high = 0.2,   aggregation "seq_mean"
    DAPO:    eps_low 0.2, eps_high 0.28, aggregation "token_mean"
    Dr.GRPO: eps_low = eps_high = 0.2,   aggregation "constant" (max_completion_len)

Departures from the papers / released code:
- Micro-batching is exact. `global_tokens` / `global_seqs` let every micro-batch
  divide by the counts of the WHOLE batch, so the SUM of the micro-batch losses
  (and of their gradients) equals the full-batch loss. Frameworks that average
  per-micro-batch means instead reweight tokens by micro-batch length.
- Optional truncated importance weights (`is_weights`, see `qerl.rl.sampling`)
  correct for the rollout policy differing from the training policy: in qerl the
  rollout carries AQN noise and the training forward does not. The released QeRL
  code had no such correction.
- The log-ratio is clamped to [-20, 20] before `exp` (as verl does) and padded
  positions are zeroed with `torch.where` BEFORE `exp`, so garbage (even NaN)
  log-probs under the mask reach neither the loss nor its gradient.
"""

from dataclasses import dataclass

import torch

_AGGREGATIONS = ("token_mean", "seq_mean", "constant")
_MAX_LOG_RATIO = 20.0


@dataclass
class LossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO's clip-higher uses 0.28
    aggregation: str = "token_mean"  # "token_mean" (DAPO) | "seq_mean" (GRPO) | "constant" (Dr.GRPO)
    kl_beta: float = 0.0  # QeRL trains with beta = 0: no reference model at all
    max_completion_len: int | None = None  # the constant of "constant" aggregation

    def __post_init__(self):
        if self.aggregation not in _AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {_AGGREGATIONS}, got {self.aggregation!r}")
        if not (0.0 <= self.eps_low < 1.0) or self.eps_high < 0.0:
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.kl_beta < 0.0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")
        if self.aggregation == "constant" and not (self.max_completion_len and self.max_completion_len > 0):
            raise ValueError("aggregation 'constant' needs max_completion_len > 0")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) from samples of pi: exp(d) - d - 1, d = ref - logp.

    Non-negative, unbiased, lower variance than the plain log-ratio (Schulman's k3).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    ref_logp: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    global_tokens: int | None = None,
    global_seqs: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss, aggregated as `cfg.aggregation` says.

    logp, old_logp, ref_logp, is_weights, mask: [B, L]; advantages: [B].
    With `global_tokens` (token_mean) or `global_seqs` (seq_mean, constant) set to
    the whole batch's counts, sum the returned losses over micro-batches.
    `ref_logp` is required when `cfg.kl_beta > 0`; given with beta = 0 the KL is
    only measured. `is_weights` multiply the policy-gradient term only (as verl):
    the KL term is a regulariser, not an estimate of the rollout policy's return.
    Metrics are over this call's masked tokens.
    """
    if cfg.kl_beta > 0 and ref_logp is None:
        raise ValueError("cfg.kl_beta > 0 needs ref_logp")
    mask = mask.bool()  # [B, L]
    mask_f = mask.to(logp.dtype)  # [B, L]

    log_ratio = torch.where(mask, logp - old_logp, 0.0).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [B, L]
    ratio = torch.exp(log_ratio)  # [B, L]
    adv = advantages.to(logp.dtype).unsqueeze(1)  # [B, 1]
    surr = ratio * adv  # [B, L]
    surr_clipped = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv  # [B, L]
    loss_tok = -torch.minimum(surr, surr_clipped)  # [B, L]
    if is_weights is not None:
        loss_tok = loss_tok * is_weights.detach().to(loss_tok.dtype)

    kl_tok = None
    if ref_logp is not None:
        kl_tok = k3_kl(torch.where(mask, logp, 0.0), torch.where(mask, ref_logp, 0.0))  # [B, L], 0 where masked
        if cfg.kl_beta > 0:
            loss_tok = loss_tok + cfg.kl_beta * kl_tok

    loss_tok = torch.where(mask, loss_tok, 0.0)  # [B, L]; where, not *, so a NaN under the mask stays out
    if cfg.aggregation == "token_mean":
        n_tok = global_tokens if global_tokens is not None else mask_f.sum().clamp(min=1.0)
        loss = loss_tok.sum() / n_tok
    else:
        n_seq = global_seqs if global_seqs is not None else logp.shape[0]
        if cfg.aggregation == "seq_mean":
            # A fully masked sequence (e.g. an overlong-filtered one) adds 0 but still counts, as in TRL.
            seq_loss = loss_tok.sum(dim=1) / mask_f.sum(dim=1).clamp(min=1.0)  # [B]
            loss = seq_loss.sum() / n_seq
        else:  # "constant"
            loss = loss_tok.sum() / (n_seq * cfg.max_completion_len)

    with torch.no_grad():
        n = mask_f.sum().clamp(min=1.0)
        # Clipping is active where the clipped branch wins the min and has zero gradient.
        clipped = ((ratio > 1.0 + cfg.eps_high) & (adv > 0)) | ((ratio < 1.0 - cfg.eps_low) & (adv < 0))  # [B, L]
        metrics = {
            "loss": loss.item(),
            "clip_frac": ((clipped & mask).sum() / n).item(),
            "ratio_mean": ((ratio * mask_f).sum() / n).item(),
        }
        if kl_tok is not None:
            metrics["kl"] = ((kl_tok * mask_f).sum() / n).item()
    return loss, metrics


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """log p(target) and entropy of softmax((h @ W.T + b) / T), one token chunk at a time.

    Saves only the inputs; backward recomputes each chunk's logits, so neither pass
    holds more than one chunk of [chunk_tokens, V] logits (plus one same-size buffer).
    Gradients, with z = the scaled logits of one row, p = softmax(z), t = target:
        d logp / dz    = onehot(t) - p
        d entropy / dz = -p * (z - sum(p * z))
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, temperature):
        # hidden [N, H], weight [V, H], bias [V] | None, targets [N]
        mdt = torch.promote_types(hidden.dtype, weight.dtype)
        cdt = torch.promote_types(mdt, torch.float32)
        w = weight.to(mdt)  # [V, H], a copy only for mixed dtypes
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=cdt, device=hidden.device)  # [N]
        entropy = torch.empty(n, dtype=cdt, device=hidden.device)  # [N]
        for s in range(0, n, chunk_tokens):
            z = _scaled_logits(hidden[s : s + chunk_tokens].to(mdt), w, bias, temperature, cdt)  # [c, V]
            lse = torch.logsumexp(z, dim=-1)  # [c]
            t = targets[s : s + chunk_tokens]  # [c]
            logp[s : s + chunk_tokens] = z.gather(1, t.unsqueeze(1)).squeeze(1) - lse
            p = torch.softmax(z, dim=-1)  # [c, V]
            entropy[s : s + chunk_tokens] = lse - _rowdot(p, z)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_tokens, ctx.temperature = chunk_tokens, temperature
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        chunk, temp = ctx.chunk_tokens, ctx.temperature
        mdt = torch.promote_types(hidden.dtype, weight.dtype)
        cdt = torch.promote_types(mdt, torch.float32)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(mdt)  # [V, H]
        grad_h = torch.empty_like(hidden) if need_h else None  # [N, H]
        # Weight/bias gradients accumulate over chunks in fp32 (allocated only when asked for).
        grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None  # [V, H]
        grad_b = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if need_b else None  # [V]
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].to(mdt)  # [c, H]
            g1 = grad_logp[s : s + chunk].to(cdt).unsqueeze(1)  # [c, 1]
            g2 = grad_entropy[s : s + chunk].to(cdt).unsqueeze(1)  # [c, 1]
            z = _scaled_logits(h, w, bias, temp, cdt)  # [c, V]
            p = torch.softmax(z, dim=-1)  # [c, V]
            # dz = g1 * (onehot - p) - g2 * p * (z - E_p[z]), built in place in z.
            z.sub_(_rowdot(p, z).unsqueeze(1)).mul_(p).mul_(-g2)
            z.sub_(p.mul_(g1))
            z.scatter_add_(1, targets[s : s + chunk].unsqueeze(1), g1)
            dlogits = z.div_(temp)  # [c, V], gradient w.r.t. the unscaled logits
            if need_h:
                grad_h[s : s + chunk] = (dlogits.to(mdt) @ w).to(hidden.dtype)
            if need_w:
                grad_w.add_(dlogits.T.to(mdt) @ h)
            if need_b:
                grad_b.add_(dlogits.sum(dim=0))
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


def _rowdot(a, b):
    # Row-wise dot product [c, V] x [c, V] -> [c] as a batched GEMM: no [c, V] temporary.
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _scaled_logits(h, w, bias, temperature, cdt):
    # The matmul runs in the inputs' dtype, like the model's own lm_head (bf16 GEMM,
    # fp32 accumulation); softmax, logsumexp and entropy run in fp32.
    z = (h @ w.T).to(cdt)  # [c, V]
    if bias is not None:
        z.add_(bias.to(cdt))
    return z.div_(temperature)


def chunked_logprobs_and_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_tokens: int = 1024,
    temperature: float = 1.0,
    lm_head_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(targets) [B, L], entropy [B, L]) of softmax(lm_head(hidden) / temperature).

    hidden [B, L, H] (the final-norm output), lm_head_weight [V, H], targets [B, L]
    (valid token ids everywhere; put e.g. the pad id under the mask). The logits
    GEMM runs in the inputs' dtype (bf16 inputs: bf16 GEMM as in the model's own
    lm_head, no fp32 copy of the [V, H] weight); each chunk's logits are then upcast
    and log-softmax / entropy computed in fp32 (fp64 for fp64 inputs), the outputs'
    dtype. Differentiable w.r.t. hidden, lm_head_weight and lm_head_bias.
    `temperature` must be the sampling temperature so that logp matches the rollout's.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, l, h = hidden.shape
    logp, entropy = _ChunkedLogprobEntropy.apply(
        hidden.reshape(b * l, h), lm_head_weight, lm_head_bias, targets.reshape(b * l), chunk_tokens, temperature
    )
    return logp.view(b, l), entropy.view(b, l)
