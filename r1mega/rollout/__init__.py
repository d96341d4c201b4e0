"""Rollout engines: generate groups of responses for the RL step."""
