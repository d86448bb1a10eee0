"""Rollout-side corrections: importance weights, DAPO dynamic sampling, overlong filtering.

Importance weights correct the policy gradient for sampling from a policy that is
not the one being trained. In qerl the gap is real and deliberate: rollouts run
with AQN noise in the norm weights (`qerl.noise`), the training forward without,
and the rollout engine's kernels may differ from the training ones. The released
QeRL code trained on the noisy samples with no correction and logged no mismatch;
here the mismatch is always measured (`mismatch_abs`, `mismatch_kl`) and the
correction (TIS or masking, token or sequence level) is one argument away.

Dynamic sampling (DAPO) drops groups whose rewards are all equal (zero advantage,
zero gradient) and samples again until the batch is full. `fill_batch` returns a
partial batch when `max_rounds` is exhausted instead of raising (verl's recipe
raises): the trainer sees `stats["filled"] == 0` and decides. Across data-parallel
ranks every rank runs the same rounds and the batch is filled globally (`fill_batch`).
"""

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")

_LEVELS = ("token", "sequence", "geometric")
_MODES = ("truncate", "mask")
_MAX_LOG_W = 20.0


@torch.no_grad()
def importance_weights(
    train_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    threshold: float = 2.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Detached weights w [B, L] = pi_train / pi_rollout, truncated or masked, and metrics.

    level:
      "token"     w_t = exp(train_t - rollout_t)
      "sequence"  every token of a sequence gets exp(sum over its masked tokens of the
                  log-ratio): the true likelihood ratio of the whole completion
      "geometric" exp(MEAN log-ratio), the per-token geometric mean: length-independent,
                  so long completions are not all truncated/masked by a product far from 1
    mode:
      "truncate"  min(w, threshold)                               (TIS)
      "mask"      w where 1/threshold <= w <= threshold, else 0.  Both sides: a weight
                  far below 1 is as strong a sign of a broken sample as one far above.
    The weights are 0 where mask is False. Metrics (over masked tokens):
    `mismatch_abs` = mean |train - rollout|; `mismatch_kl` = mean k3 estimate of
    KL(rollout || train) from the rollout's samples, exp(x) - x - 1 with
    x = train - rollout; `is_weight_mean` = mean final weight; and `frac_truncated`
    (truncate) or `frac_masked` (mask) = fraction of tokens whose weight was changed.
    """
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if threshold <= 1.0:
        raise ValueError(f"threshold must be > 1, got {threshold}")
    mask = mask.bool()  # [B, L]
    mask_f = mask.float()  # [B, L]
    n = mask_f.sum().clamp(min=1.0)
    log_ratio = torch.where(mask, train_logp.float() - rollout_logp.float(), 0.0)  # [B, L]

    if level == "token":
        log_w = log_ratio  # [B, L]
    else:
        log_w = log_ratio.sum(dim=1, keepdim=True)  # [B, 1]
        if level == "geometric":
            log_w = log_w / mask_f.sum(dim=1, keepdim=True).clamp(min=1.0)
        log_w = log_w.expand_as(log_ratio)  # [B, L]
    # The clamp only avoids inf: any threshold below e^20 decides the same way.
    w = torch.exp(log_w.clamp(-_MAX_LOG_W, _MAX_LOG_W))  # [B, L]

    if mode == "truncate":
        changed = w > threshold
        w = w.clamp(max=threshold)
    else:
        changed = (w > threshold) | (w < 1.0 / threshold)
        w = torch.where(changed, 0.0, w)
    w = w * mask_f

    k3 = torch.exp(log_ratio.clamp(-_MAX_LOG_W, _MAX_LOG_W)) - log_ratio - 1.0  # [B, L], 0 where masked
    metrics = {
        "mismatch_abs": (log_ratio.abs().sum() / n).item(),
        "mismatch_kl": ((k3 * mask_f).sum() / n).item(),
        "is_weight_mean": (w.sum() / n).item(),
        f"frac_{'truncated' if mode == 'truncate' else 'masked'}": ((changed & mask).sum() / n).item(),
    }
    return w, metrics


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool [B]: True for groups (contiguous, of `group_size`) whose rewards are not all equal.

    Equality is exact: rewards are computed by rule, so ties are exact ties.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    r = rewards.view(-1, group_size)  # [B, G]
    return r.amax(dim=1) != r.amin(dim=1)  # [B]


def fill_batch(
    sample_round: Callable[[int], tuple[Sequence[T], Sequence[bool] | torch.Tensor]],
    target_groups: int,
    max_rounds: int,
    world=None,
) -> tuple[list[T], dict[str, float]]:
    """Call `sample_round` until `target_groups` groups are kept or `max_rounds` calls were made.

    `sample_round(n)` is asked for the `n` groups still missing (it may return more,
    e.g. to keep generation batches large) and returns `(groups, keep)`: one item per
    group, of any type (a prompt's G completions, rewards, log-probs...), and one
    keep flag per group (e.g. `dynamic_sampling_keep(rewards, G)`). Kept groups are
    collected in order; extras beyond `target_groups` are dropped.
    Stats: rounds, groups_sampled, groups_kept (before dropping extras), keep_frac,
    filled (1.0 if the target was reached, else 0.0 and the batch is short).

    `world` (a `qerl.distributed.World`, data parallelism): `target_groups` is the GLOBAL
    batch and every rank runs the same rounds. Each round asks every rank for
    ceil(missing / ranks) groups (its share of the round's prompts, rank r the r-th slice),
    then one all-gather of the ranks' kept counts tells every rank the global count: all
    ranks take the same decision to stop or go on, so none waits for another forever and
    none drops groups the others count. The round's kept groups, in rank order, fill the
    batch up to the target; a rank's kept groups beyond it are dropped. Ranks may end with
    different numbers of groups (the update's normalizers are global); the stats are global.
    """
    if target_groups < 1 or max_rounds < 1:
        raise ValueError(f"need target_groups >= 1 and max_rounds >= 1, got {target_groups}, {max_rounds}")
    rank, ranks = (world.rank, world.size) if world is not None else (0, 1)
    kept: list[T] = []
    n_kept = sampled = rounds = 0  # global counts
    while n_kept < target_groups and rounds < max_rounds:
        groups, keep = sample_round(-(-(target_groups - n_kept) // ranks))
        keep = keep.tolist() if isinstance(keep, torch.Tensor) else list(keep)
        if len(keep) != len(groups):
            raise ValueError(f"sample_round returned {len(groups)} groups but {len(keep)} keep flags")
        mine = [g for g, k in zip(groups, keep) if k]
        counts = world.gather((len(mine), len(groups))) if ranks > 1 else [(len(mine), len(groups))]
        before = n_kept + sum(c for c, _ in counts[:rank])  # kept by the ranks before this one
        kept.extend(mine[: max(0, target_groups - before)])
        n_kept += sum(c for c, _ in counts)
        sampled += sum(n for _, n in counts)
        rounds += 1
    stats = {
        "rounds": float(rounds),
        "groups_sampled": float(sampled),
        "groups_kept": float(n_kept),
        "keep_frac": n_kept / max(sampled, 1),
        "filled": float(n_kept >= target_groups),
    }
    return kept, stats


def overlong_mask(finish_reasons: Sequence[str]) -> torch.Tensor:
    """Bool [N]: True where a completion hit the length limit (finish reason "length").

    For DAPO's overlong filtering: `loss_mask &= ~overlong_mask(reasons)[:, None]`.
    """
    return torch.tensor([r == "length" for r in finish_reasons], dtype=torch.bool)
