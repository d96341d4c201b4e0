"""The forward passes before the update: the old policy's log-probs (when the update runs off-policy),
the KL reference's, and the distillation teacher's (algorithm.opd), each a forward without gradients
over the step's micro-batches."""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core import parallel_state as ps

from r1mega.ops.logprobs import target_logprobs
from r1mega.trainer.forward_backward import run_schedule
from r1mega.trainer.rl.batch import MicroBatch, StepBatch, micro_batches, row_slices
from r1mega.trainer.rl.context import RLContext
from r1mega.trainer.rl.routing import record_old_routing, recording_forward_step


def needs_old_logprobs(a) -> bool:
    """Whether the update needs the old policy's log-probs recomputed: it runs off-policy (more
    than one optimizer step per batch) and does not take the engine's."""
    return not a.use_rollout_logprobs and (a.ppo_epochs > 1 or a.minibatches > 1)


def logprobs(ctx: RLContext, batch: StepBatch) -> None:
    """Fill batch.old_logp (when the update needs them), batch.ref_logp (when KL is on) and
    batch.teacher_logp (on-policy distillation)."""
    a = ctx.cfg.algorithm
    if a.use_rollout_logprobs:
        batch.old_logp = batch.rollout_logp
    if ctx.teacher is not None:  # collective over the whole job, in the teacher's own layout
        scores = ctx.teacher.score(batch)
        batch.teacher_logp, batch.teacher_topk_logp, batch.teacher_topk_ids = scores
    need_old = needs_old_logprobs(a)
    if not need_old and ctx.ref_chunks is None:
        return
    micro = micro_batches(ctx.cfg, batch, list(range(len(batch))))
    if need_old:
        recorded = {} if a.routing_replay == "old" else None  # R2: the update replays this pass's routing
        batch.old_logp = per_row(len(batch), micro, forward_logprobs(ctx.ddp_chunks, micro, ctx.temperature,
                                                                     recorded))
        if recorded is not None:
            record_old_routing(batch, micro, recorded, ctx.chunks[0].config)
    if ctx.ref_chunks is not None:
        batch.ref_logp = per_row(len(batch), micro, forward_logprobs(ctx.ref_chunks, micro, ctx.temperature))


def per_row(n: int, micro: List[MicroBatch], values) -> Optional[List[torch.Tensor]]:
    """forward_logprobs' values as each row's response log-probs; None off the last pipeline stage."""
    if values is None:  # not the last pipeline stage: the loss never runs here
        return None
    out: List[Optional[torch.Tensor]] = [None] * n
    for m, v in zip(micro, values):
        for row, vals in zip(m.rows, row_slices(m, v)):
            out[row] = vals
    return out


def forward_logprobs(chunks, micro: List[MicroBatch], temperature: float,
                     recorded: Optional[dict] = None) -> Optional[List[torch.Tensor]]:
    """Log-probs per micro-batch in the [b, W] layout of its mask, without gradients, on the last
    pipeline stage; None on others. With `recorded`, the experts the routers chose go there as well
    (routing.recording_forward_step)."""

    def collect(m, logits):
        logp, _ = target_logprobs(logits, m.targets, temperature, with_entropy=False)
        return logits.new_zeros(()), {"logp": m.per_row(logp).detach().float().cpu()}

    step = recording_forward_step(recorded, collect) if recorded is not None else None
    with torch.no_grad():
        out = run_schedule(chunks, micro, collect, forward_only=True, step=step)
    return [o["logp"] for o in out] if ps.is_pipeline_last_stage(ignore_virtual=True) else None
