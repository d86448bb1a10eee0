"""Packed micro-batches for the training forward: every token real, no padding.

A micro-batch holds whole groups (one prompt, its G completions). Its tokens are laid
end to end in one row,

    [prompt 1][completion 1.1] ... [completion 1.G][prompt 2][completion 2.1] ...

and attention runs over segments: a prompt attends causally to itself; a completion
attends to all of its group's prompt and causally to itself. The keys of a completion's
segment are [its prompt's keys, its own keys], gathered through `key_index`, so the
prompt is computed once per group (its key/value gradients flow back through the
gather) and a ragged batch costs the tokens it holds, not rows x longest.

`packed_attention` runs the segments with one variable-length flash-attention call on
CUDA (`torch.nn.attention.varlen.varlen_attn`, causal aligned bottom-right) and with a
loop of masked SDPA calls elsewhere (the reference the GPU path is tested against).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Packed:
    ids: torch.Tensor  # [T] token ids, end to end
    positions: torch.Tensor  # [T] rotary positions (a prompt starts at 0, its completions continue it)
    cu_q: torch.Tensor  # [S+1] int32: where each query segment starts in the T tokens
    cu_k: torch.Tensor  # [S+1] int32: where each key segment starts in key_index
    key_index: torch.Tensor  # [Tk] long: the token behind each key slot
    max_q: int
    max_k: int
    pred_index: torch.Tensor  # [Tc] long: the token whose hidden state predicts each completion token
    targets: torch.Tensor  # [Tc] the completion tokens
    out_index: torch.Tensor  # [Tc] long: flat index of each completion token in the [N, L] batch

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])


def pack(prompts: list[list[int]], completions: list[list[int]], group: int, length: int, device) -> Packed:
    """prompts: one per group; completions: group x len(prompts) rows (contiguous per group),
    each the completion's real tokens (possibly empty: a row that enters no loss);
    length: L of the [N, L] batch the outputs scatter back into."""
    if len(completions) != group * len(prompts):
        raise ValueError(f"{len(completions)} completions for {len(prompts)} prompts of group {group}")
    ids, pos, cu_q, cu_k, kidx, pred, tgt, out = [], [], [0], [0], [], [], [], []
    for g, prompt in enumerate(prompts):
        rows = range(g * group, (g + 1) * group)
        if not any(completions[r] for r in rows):
            continue  # nothing of this group enters the loss
        p0, plen = len(ids), len(prompt)
        if plen == 0:
            raise ValueError("an empty prompt cannot be packed (no position predicts the first token)")
        ids += prompt
        pos += range(plen)
        prompt_keys = list(range(p0, p0 + plen))
        kidx += prompt_keys
        cu_q.append(len(ids))
        cu_k.append(len(kidx))
        for r in rows:
            c = completions[r]
            if not c:
                continue
            c0 = len(ids)
            ids += c
            pos += range(plen, plen + len(c))
            kidx += prompt_keys + list(range(c0, c0 + len(c)))
            cu_q.append(len(ids))
            cu_k.append(len(kidx))
            pred += [p0 + plen - 1] + list(range(c0, c0 + len(c) - 1))
            tgt += c
            out += range(r * length, r * length + len(c))
    seg_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    seg_k = [b - a for a, b in zip(cu_k, cu_k[1:])]

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    return Packed(
        t(ids),
        t(pos),
        t(cu_q, torch.int32),
        t(cu_k, torch.int32),
        t(kidx),
        max(seg_q, default=0),
        max(seg_k, default=0),
        t(pred),
        t(tgt),
        t(out),
    )


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Packed) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] (rotary applied) -> [T, Hq, D]."""
    kk, vv = k[p.key_index], v[p.key_index]  # [Tk, Hkv, D]
    if q.is_cuda and _varlen() is not None:
        return _varlen_causal(q, kk, vv, p)
    return packed_attention_reference(q, kk, vv, p)


def packed_attention_reference(q, kk, vv, p: Packed) -> torch.Tensor:
    """One masked SDPA call per segment; query i of a segment sees key j iff j <= i + (Lk - Lq)."""
    g = q.shape[1] // kk.shape[1]
    outs = []
    cq, ck = p.cu_q.tolist(), p.cu_k.tolist()
    for s in range(len(cq) - 1):
        qs = q[cq[s] : cq[s + 1]].transpose(0, 1)  # [Hq, Lq, D]
        ks = kk[ck[s] : ck[s + 1]].transpose(0, 1).repeat_interleave(g, 0)  # [Hq, Lk, D]
        vs = vv[ck[s] : ck[s + 1]].transpose(0, 1).repeat_interleave(g, 0)
        lq, lk = qs.shape[1], ks.shape[1]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1))
    return torch.cat(outs, 0)


_VARLEN: list = []


def _varlen():
    if not _VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn

            _VARLEN.append((varlen_attn, set(inspect.signature(varlen_attn).parameters)))
        except ImportError:
            _VARLEN.append(None)
    return _VARLEN[0]


def _varlen_causal(q, kk, vv, p: Packed) -> torch.Tensor:
    fn, params = _varlen()
    # Flash attention aligns a causal mask bottom-right when a segment has more keys than
    # queries: query i sees keys up to i + (Lk - Lq), exactly the prompt + causal completion.
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params and kk.shape[1] != q.shape[1]:
        kw["enable_gqa"] = True
    return fn(q, kk, vv, p.cu_q, p.cu_k, p.max_q, p.max_k, **kw)
