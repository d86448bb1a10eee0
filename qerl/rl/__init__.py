"""RL pieces the trainer composes: advantages, the policy loss, rollout-side corrections."""

from .advantages import group_advantages
from .losses import LossConfig, chunked_logprobs_and_entropy, k3_kl, policy_loss
from .sampling import dynamic_sampling_keep, fill_batch, importance_weights, overlong_mask

__all__ = [
    "LossConfig",
    "chunked_logprobs_and_entropy",
    "dynamic_sampling_keep",
    "fill_batch",
    "group_advantages",
    "importance_weights",
    "k3_kl",
    "overlong_mask",
    "policy_loss",
]
