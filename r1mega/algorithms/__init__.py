"""GRPO-family RL math as pure tensor functions: advantages, policy losses, KL, aggregation, filtering."""

from r1mega.algorithms.advantages import broadcast_to_tokens, group_advantages, group_moments
from r1mega.algorithms.aggregation import aggregate, local_counts
from r1mega.algorithms.filtering import keep_mask, varied_groups
from r1mega.algorithms.kl import kl_penalty
from r1mega.algorithms.policy_loss import (
    clipped_surrogate,
    log_ratio,
    logprob_gap_stats,
    truncated_is_weights,
)

__all__ = [
    "aggregate",
    "broadcast_to_tokens",
    "clipped_surrogate",
    "group_advantages",
    "group_moments",
    "keep_mask",
    "kl_penalty",
    "local_counts",
    "log_ratio",
    "logprob_gap_stats",
    "truncated_is_weights",
    "varied_groups",
]
