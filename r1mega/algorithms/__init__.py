"""GRPO-family RL math as pure tensor functions: advantages, policy losses, KL, aggregation, filtering."""
