"""Rule-based rewards (accuracy, format, language consistency, length) and their time-limited runner."""

from r1mega.rewards.stack import RewardInput, RewardScores, RewardStack

__all__ = ["RewardInput", "RewardScores", "RewardStack"]
