"""Fused tensor ops shared by the trainers (vocab-parallel log-probs)."""

from r1mega.ops.logprobs import token_logprobs

__all__ = ["token_logprobs"]
