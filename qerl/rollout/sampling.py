"""What a rollout is asked for and what it returns, and how a token is drawn: shared by both engines.

`SamplingParams` (temperature, top-k, top-p, samples per prompt, length limits, stop strings), `Rollout` (the
completions, their masks and the log-probs of the distribution each token was drawn from), `sample_tokens`
(temperature / top-k / top-p by inverse-CDF sampling, no host sync) and `left_pad`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    n: int = 1  # samples per prompt
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Optional per-row limit, one per output row (prompts x n, in order), each <= max_new_tokens:
    # a row that reaches its limit ends there with finish reason "length" (benchmarks use it to
    # give random-weight models, which never emit EOS, the ragged lengths of real rollouts).
    row_max_tokens: tuple[int, ...] | None = None

    def row_limits(self, rows: int, device) -> torch.Tensor:
        if self.row_max_tokens is None:
            return torch.full((rows,), self.max_new_tokens, dtype=torch.long, device=device)
        if len(self.row_max_tokens) != rows or not all(1 <= x <= self.max_new_tokens for x in self.row_max_tokens):
            raise ValueError(f"row_max_tokens needs {rows} values in [1, max_new_tokens={self.max_new_tokens}]")
        return torch.tensor(self.row_max_tokens, dtype=torch.long, device=device)


@dataclass
class Rollout:
    prompt_ids: list[list[int]]  # one per prompt (not per sample)
    completion_ids: torch.Tensor  # [N, L] long, padded with pad_id; N = prompts * n
    mask: torch.Tensor  # [N, L] bool, True on generated tokens
    logprobs: torch.Tensor  # [N, L] fp32 log-prob of each sampled token (0 on padding)
    finish_reasons: list[str]  # "stop" (EOS or stop string) or "length"
    texts: list[str] = field(default_factory=list)
    n: int = 1

    @property
    def lengths(self) -> list[int]:
        return self.mask.sum(1).tolist()


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (token [B], log-prob [B]) under the distribution actually sampled."""
    logits = logits.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    logp = logits.log_softmax(-1)
    # Inverse-CDF sampling: one uniform per row and a binary search; no host sync (no
    # multinomial) and ~40x cheaper on CPU than drawing an exponential per vocabulary entry.
    # Masked tokens have zero mass, so a flat CDF step can never be the first index >= u.
    cdf = logp.exp().cumsum(-1)  # [B, V]
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u.clamp(min=torch.finfo(cdf.dtype).tiny)).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, P], attn [B, P]) left-padded to the longest, attn 1 on real tokens."""
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(prompts), p), dtype=torch.long, device=device)
    for i, x in enumerate(prompts):
        ids[i, p - len(x) :] = torch.tensor(x, device=device)
        attn[i, p - len(x) :] = 1
    return ids, attn
