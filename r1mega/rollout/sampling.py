"""Next-token choice from full-vocabulary logits: temperature, top-k, top-p, greedy."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from r1mega.rollout.types import SamplingParams


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and the top-p nucleus to -inf (rows of [b, v])."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p; the first token always stays
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(token ids [b], their log-probs [b] under softmax(logits / T)) for logits [b, v]."""
    logits = logits.float()
    logp = torch.log_softmax(logits / params.logprob_temperature, dim=-1)
    if params.greedy:
        tokens = logits.argmax(dim=-1)
    else:
        filtered = filter_logits(logp, params.top_k, params.top_p)
        probs = torch.softmax(filtered, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
