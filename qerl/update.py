"""The policy update: pack rollout groups into sequences, micro-batch, PPO-clip, step.

Log-probs and entropies come from `chunked_logprobs_and_entropy` over the completion
positions only, so [tokens, vocab] fp32 logits never exist at once. With
`num_iterations == 1` the "old" log-probs are the detached log-probs of the same
forward (ratio 1), so no extra pass is spent; more iterations reuse those stored values.
Sequences whose advantage is exactly zero (every group whose completions all got the
same reward, under GRPO) contribute nothing to the policy loss, so without a KL term
they are not run at all; the loss keeps the whole batch's token and sequence counts as
normalizers, so the gradient is unchanged. Early in a run, when most groups are all
wrong, this skips most of the compute. Their entropy is then not measured either.

The rollout policy carried AQN noise and the training forward does not: the
importance correction (`is_mode`) reweights by exp(train - rollout) and the mismatch
is always measured and logged.

Data parallelism (`world`, see `qerl.distributed`): each rank updates on its share of the
batch with the token and sequence counts of the whole batch as normalizers, the gradients
are summed over the ranks before clipping, and a rank with nothing to run (all its groups
zero-advantage, or none kept) still takes part: the step equals the one-process step on
the whole batch, up to float summation order.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .distributed import World
from .lora import adapter_disabled
from .modeling import CausalLM, causal_mask, positions_from_mask
from .packing import pack
from .rl import LossConfig, chunked_logprobs_and_entropy, importance_weights, policy_loss


@dataclass
class Batch:
    input_ids: torch.Tensor  # [N, P+L] left-padded prompt, then completion (right-padded)
    attn: torch.Tensor  # [N, P+L] 1 on real tokens
    completion: torch.Tensor  # [N, L]
    mask: torch.Tensor  # [N, L] bool, tokens that enter the loss
    rollout_logp: torch.Tensor  # [N, L] log-probs the sampler reported
    advantages: torch.Tensor  # [N]
    prompt_len: int  # P

    def slice(self, idx) -> Batch:
        return Batch(
            self.input_ids[idx],
            self.attn[idx],
            self.completion[idx],
            self.mask[idx],
            self.rollout_logp[idx],
            self.advantages[idx],
            self.prompt_len,
        )


def build_batch(
    prompts: list[list[int]],
    completions: list[torch.Tensor],
    masks: list[torch.Tensor],
    logps: list[torch.Tensor],
    advantages: torch.Tensor,
    pad_id: int,
    device,
) -> Batch:
    """prompts[i] is the prompt of sequence i; completions/masks/logps are 1-D per sequence."""
    n = len(prompts)  # 0: a data-parallel rank with no group in this step's batch
    p = max((len(x) for x in prompts), default=0)
    length = max((int(c.shape[0]) for c in completions), default=0)
    ids = torch.full((n, p + length), pad_id, dtype=torch.long)
    attn = torch.zeros((n, p + length), dtype=torch.long)
    comp = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.bool)
    lp = torch.zeros((n, length), dtype=torch.float32)
    for i in range(n):
        pr, c, m = prompts[i], completions[i], masks[i]
        ids[i, p - len(pr) : p] = torch.tensor(pr)
        attn[i, p - len(pr) : p] = 1
        k = int(c.shape[0])
        ids[i, p : p + k], comp[i, :k], mask[i, :k], lp[i, :k] = c, c, m, logps[i]
        attn[i, p : p + k] = m.long()
    return Batch(
        ids.to(device),
        attn.to(device),
        comp.to(device),
        mask.to(device),
        lp.to(device),
        advantages.to(device).float(),
        p,
    )


def sequence_logprobs(model: CausalLM, b: Batch, temperature: float, chunk_tokens: int = 1024, group: int = 1):
    """-> (logp [N, L], entropy [N, L]) of the completion tokens under the current model.

    group > 1: rows come in contiguous groups of `group` completions of one prompt; the prompt
    is run once per group and its keys/values (with their gradient) are shared by the group's
    completions, instead of once per completion. Same values, G times fewer prompt tokens.
    """
    length = b.completion.shape[1]
    if group <= 1:
        hidden = model(b.input_ids, positions_from_mask(b.attn), causal_mask(b.attn))
        h = hidden[:, b.prompt_len - 1 : b.prompt_len - 1 + length]  # position t predicts completion token t
    else:
        p, n = b.prompt_len, b.input_ids.shape[0]
        prompt_attn = b.attn[::group, :p]  # [N/G, P]
        kv: list = []
        h_prompt = model(
            b.input_ids[::group, :p], positions_from_mask(prompt_attn), causal_mask(prompt_attn), capture=kv
        )
        prefix = [(k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)) for k, v in kv]
        plen = prompt_attn.sum(1).repeat_interleave(group)  # [N]
        pos = plen[:, None] + torch.arange(length, device=plen.device)  # completion token t sits at plen + t
        keys_prompt = prompt_attn.bool().repeat_interleave(group, 0)[:, None, None, :].expand(n, 1, length, p)
        causal = torch.ones(length, length, dtype=torch.bool, device=plen.device).tril().expand(n, 1, length, length)
        h_comp = model(b.completion, pos, torch.cat([keys_prompt, causal], dim=-1), prefix=prefix)
        # token 0 is predicted by the prompt's last position, token t by completion position t-1
        h = torch.cat([h_prompt[:, -1:].repeat_interleave(group, 0), h_comp[:, :-1]], dim=1)
    return chunked_logprobs_and_entropy(
        h, model.lm_head.weight, b.completion, chunk_tokens=chunk_tokens, temperature=temperature
    )


def packed_logprobs(model: CausalLM, b: Batch, temperature: float, chunk_tokens: int = 1024, group: int = 1):
    """`sequence_logprobs` on the packed layout (`qerl.packing`): the same (logp, entropy) [N, L]
    where `b.mask` is set (0 elsewhere), computed over real tokens only: each group's prompt
    once, each completion up to its last loss token, no padding, no [N, 1, T, S] masks.
    Rows come in contiguous groups of `group` (1: every row its own prompt); each row's mask
    must be a prefix of its completion (as rollouts make it)."""
    n, length = b.completion.shape
    p = b.prompt_len
    lens = b.mask.sum(1)
    if bool((b.mask != (torch.arange(length, device=lens.device) < lens[:, None])).any()):
        raise ValueError("packed_logprobs needs each row's loss mask to be a prefix of its completion")
    plens = b.attn[::group, :p].sum(1).tolist()
    rows = b.input_ids[::group, :p].tolist()
    prompts = [r[p - k :] for r, k in zip(rows, plens)]
    comps = [c[:k] for c, k in zip(b.completion.tolist(), lens.tolist())]
    pk = pack(prompts, comps, group, length, b.completion.device)
    logp = torch.zeros(n * length, device=b.completion.device)
    ent = torch.zeros(n * length, device=b.completion.device)
    if pk.targets.numel() == 0:
        return logp.view(n, length), ent.view(n, length)
    hidden = model(pk.ids[None], pk.positions[None], pk)[0]  # [T, H]
    lp, e = chunked_logprobs_and_entropy(
        hidden[pk.pred_index][None],
        model.lm_head.weight,
        pk.targets[None],
        chunk_tokens=chunk_tokens,
        temperature=temperature,
    )
    logp = logp.to(lp.dtype).index_copy(0, pk.out_index, lp[0])
    ent = ent.to(e.dtype).index_copy(0, pk.out_index, e[0])
    return logp.view(n, length), ent.view(n, length)


LOGPROB_PATHS = {"packed": packed_logprobs, "reference": sequence_logprobs}


def _non_finite(mb: Batch, logp: torch.Tensor, ent: torch.Tensor) -> str:
    """Where a micro-batch's non-finite loss comes from: counts of non-finite values among its loss tokens."""
    m = mb.mask
    parts = {
        "the rollout's log-probs": mb.rollout_logp,
        "the update's log-probs": logp.detach(),
        "entropies": ent.detach(),
        "advantages": mb.advantages[:, None].expand_as(m),
    }
    found = [f"{int(k)} of {int(m.sum())} {name}" for name, x in parts.items() if (k := (~torch.isfinite(x) & m).sum())]
    return "non-finite " + ", ".join(found) if found else "every input finite: the loss itself"


def policy_update(
    model: CausalLM,
    optimizer,
    params: list[torch.nn.Parameter],
    batch: Batch,
    loss_cfg: LossConfig,
    *,
    temperature: float,
    micro_batch_size: int,
    num_iterations: int,
    max_grad_norm: float,
    is_level: str,
    is_mode: str,
    is_threshold: float,
    group: int = 1,
    path: str = "packed",
    world: World | None = None,
) -> dict:
    """group > 1: rows are contiguous groups sharing a prompt (see `sequence_logprobs`);
    micro-batches then hold whole groups (micro_batch_size rounded down to a multiple of group).
    path: "packed" (`packed_logprobs`, the default) or "reference" (`sequence_logprobs`, the
    padded oracle it is tested against): same values, the packed one costs the tokens it holds.
    world: the data-parallel ranks, each calling with its share of the batch (default: one process)."""
    logprobs = LOGPROB_PATHS[path]
    world = world or World()
    tokens, seqs = (int(x) for x in world.sum(int(batch.mask.sum()), batch.input_ids.shape[0]))  # the whole batch's
    if tokens == 0:  # e.g. every completion truncated and masked (DAPO overlong filtering)
        return {"skipped_updates": 0.0, "loss_tokens": 0.0, "active_seqs": 0.0}
    if loss_cfg.kl_beta == 0:  # drop whole groups whose advantages are all zero
        g = max(group, 1)
        live = (batch.advantages != 0).view(-1, g).any(1).repeat_interleave(g)
        batch = batch.slice(live.nonzero().squeeze(-1))
    n = batch.input_ids.shape[0]
    active = int(world.sum(n)[0])
    if active == 0:
        return {"skipped_updates": 0.0, "loss_tokens": float(tokens), "active_seqs": 0.0}
    old_logp = torch.zeros_like(batch.rollout_logp)
    metrics: dict[str, list[float]] = {}
    skipped, allreduce_s = 0, 0.0
    if group > 1:
        micro_batch_size = max(group, micro_batch_size // group * group)
    model.train()
    for it in range(num_iterations):
        optimizer.zero_grad(set_to_none=True)
        finite, why = True, ""
        for s in range(0, n, micro_batch_size):
            mb = batch.slice(slice(s, s + micro_batch_size))
            logp, ent = logprobs(model, mb, temperature, group=group)
            if it == 0:
                old_logp[s : s + micro_batch_size] = logp.detach()
            old = old_logp[s : s + micro_batch_size]
            isw, is_m = (None, {})
            if is_mode == "none":
                _, is_m = importance_weights(
                    old, mb.rollout_logp, mb.mask, level=is_level, mode="truncate", threshold=is_threshold
                )
            else:
                isw, is_m = importance_weights(
                    old, mb.rollout_logp, mb.mask, level=is_level, mode=is_mode, threshold=is_threshold
                )
            ref = None
            if loss_cfg.kl_beta > 0:
                with torch.no_grad(), adapter_disabled(model):
                    ref, _ = logprobs(model, mb, temperature, group=group)
            loss, m = policy_loss(
                logp,
                old,
                mb.advantages,
                mb.mask,
                loss_cfg,
                ref_logp=ref,
                is_weights=isw,
                global_tokens=tokens,
                global_seqs=seqs,
            )
            if not torch.isfinite(loss):
                finite = False
                why = f" (micro-batch {s // micro_batch_size}: {_non_finite(mb, logp, ent)})"
                break
            loss.backward()
            w = float(mb.mask.sum()) / max(tokens, 1)
            ent_mean = float((ent.detach() * mb.mask).sum() / mb.mask.sum().clamp(min=1))
            for k, v in {**m, **is_m, "entropy": ent_mean}.items():
                metrics.setdefault(k, []).append((float(v), w))
        finite = world.max(not finite)[0] == 0  # a non-finite loss on any rank skips the update on every rank
        if finite:
            allreduce_s += world.sum_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if finite else torch.tensor(float("nan"))
        if not finite or not torch.isfinite(grad_norm):
            warnings.warn(
                f"non-finite loss or gradient in iteration {it}{why}: update skipped, adapter unchanged", stacklevel=2
            )
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        optimizer.step()
        metrics.setdefault("grad_norm", []).append((float(grad_norm), 1.0))
    model.eval()
    sums: dict[str, list[float]] = {}  # key -> [sum of value x weight, sum of weights] over the ranks
    for part in world.gather(
        {k: (sum(v * w for v, w in vals), sum(w for _, w in vals)) for k, vals in metrics.items()}
    ):
        for k, (vw, w) in part.items():
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + vw, acc[1] + w
    out = {k: vw / max(w, 1e-12) for k, (vw, w) in sums.items()}
    out["skipped_updates"] = float(skipped)
    out["loss_tokens"] = float(tokens)
    out["active_seqs"] = float(active)
    if world.size > 1:  # the slowest rank's all-reduce time over the iterations (waiting for the others included)
        out["allreduce_s"] = world.max(allreduce_s)[0]
    return {k: (v if math.isfinite(v) else float("nan")) for k, v in out.items()}
