"""Group-relative advantages: GRPO, Dr.GRPO and an optional batch-level rescale.

The G completions of one prompt form a group and are stored contiguously: rows
i*G .. i*G+G-1 of a flat `[B*G]` reward vector belong to prompt i.

- GRPO:    A = (r - mean_group) / (std_group + eps)
- Dr.GRPO: A = r - mean_group                        (`normalize_std=False`)
- `batch_scale=True` divides the result by its std over the whole batch, the
  REINFORCE++-baseline recipe (group mean as baseline, batch std as scale).

The group std is the UNBIASED one (divisor G-1), as TRL's GRPOTrainer and verl's
GRPO estimator use (`torch.std` default). The paper writes "std" without saying
which; for G = 8 the two differ by a factor sqrt(8/7) ~ 1.07 on every advantage,
which a tuned learning rate absorbs but which matters when comparing runs.
"""

import torch


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
    batch_scale: bool = False,
) -> torch.Tensor:
    """Advantages `[B*G]` (fp32) from rewards `[B*G]` with contiguous groups of `group_size`.

    A group whose rewards are all equal gets advantage 0 for every member (its
    std is 0, so GRPO's division yields 0 / eps = 0).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if normalize_std and group_size < 2:
        raise ValueError("std normalization needs group_size >= 2 (the unbiased std of one sample is undefined)")
    r = rewards.float().view(-1, group_size)  # [B, G]
    adv = r - r.mean(dim=1, keepdim=True)  # [B, G]
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # unbiased std, [B, 1]
    adv = adv.reshape(-1)  # [B*G]
    if batch_scale and adv.numel() > 1:
        # The group-centred advantages already have batch mean 0; only rescale.
        adv = adv / (adv.std() + eps)
    return adv
