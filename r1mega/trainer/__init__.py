"""Training: the run loop every run shares, the policy set-up, the RL, SFT and pre-training runs."""
