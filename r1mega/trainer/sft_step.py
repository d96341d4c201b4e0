"""One SFT step: assistant-token cross-entropy over packed (or padded) micro-batches, one update.

The loss is the mean negative log-likelihood over every assistant token of the step's
global batch: each micro-batch carries the global token count as its denominator, so
packing, micro-batching and data parallelism do not change the math.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, List, Sequence

import torch
from megatron.core import parallel_state as ps

from r1mega.config.schema import FP8Config, ParallelConfig, SFTConfig
from r1mega.data.conversations import SFTSample
from r1mega.data.packing import SFTMicroBatch, pack, pad_rows
from r1mega.platform.fp8 import sequence_multiple
from r1mega.trainer.schedule import dp_sum, reduce_last_stage, run_schedule, target_logprobs, train_step


def micro_batches(samples: Sequence[SFTSample], sft: SFTConfig, parallel: ParallelConfig,
                  fp8: FP8Config) -> List[SFTMicroBatch]:
    """This rank's samples as micro-batches; every data-parallel rank makes the same number of them."""
    multiple = sequence_multiple(fp8, parallel)  # sequence parallelism, FP8 shapes
    make = pack if sft.pack else pad_rows
    parts = make(samples, sft.micro_batch_tokens, multiple)
    count = int(dp_sum([len(parts)], op=torch.distributed.ReduceOp.MAX)[0])
    if count > len(parts):
        parts = make(samples, sft.micro_batch_tokens, multiple, min_parts=count)
    return parts


def nll_loss(micro: SFTMicroBatch, logits: torch.Tensor, num_tokens: float, scale: float):
    """Summed NLL of the micro-batch's assistant targets over the step's global target count."""
    logp, _ = target_logprobs(logits, micro.targets)
    nll = -torch.where(micro.mask, logp, 0.0).sum()
    report = torch.stack([nll.detach(), micro.mask.sum().to(nll.dtype)]).double().cpu()
    # megatron divides each micro-batch loss by the local micro-batch count and averages
    # gradients over data-parallel ranks; `scale` undoes both, the global count stays.
    return nll / num_tokens * scale, {"sums": report}


def _target_count(parts: List[SFTMicroBatch]) -> float:
    return dp_sum([float(sum(int(m.mask.sum()) for m in parts))])[0]


def _sums(outputs: List[dict]) -> torch.Tensor:
    local = torch.zeros(2, dtype=torch.float64)
    for out in outputs or []:
        local += out["sums"]
    return reduce_last_stage(local)


def sft_step(ddp_chunks, optimizer, scheduler, parts: List[SFTMicroBatch]) -> Dict[str, float]:
    """Forward/backward over this rank's micro-batches, reduce grads, one optimizer step."""
    num_tokens = max(_target_count(parts), 1.0)
    scale = float(len(parts) * ps.get_data_parallel_world_size())
    out, grad_norm, update_ok = train_step(ddp_chunks, optimizer, scheduler, parts,
                                           partial(nll_loss, num_tokens=num_tokens, scale=scale))
    sums = _sums(out)
    return {"loss": float(sums[0] / sums[1].clamp(min=1)), "tokens": float(sums[1]), "grad_norm": grad_norm,
            "update_skipped": float(not update_ok)}


def eval_loss(chunks, parts: List[SFTMicroBatch]) -> Dict[str, float]:
    """Mean NLL per assistant token (and its perplexity) without gradients."""
    with torch.no_grad():
        out = run_schedule(chunks, parts, partial(nll_loss, num_tokens=1.0, scale=1.0), forward_only=True)
    sums = _sums(out)
    loss = float(sums[0] / sums[1].clamp(min=1))
    return {"eval/loss": loss, "eval/perplexity": float(torch.tensor(loss).exp()), "eval/tokens": float(sums[1])}
