"""rollout.mode=async with colocated SGLang engines: one step off-policy.

Colocated engines and the trainer take turns on the same GPUs. The update cannot run beside the
engine's decoding (gradients and optimizer states need the memory its weights and KV cache hold),
nor can a weight sync (the weights would change under running requests). What can run beside it is
what needs little GPU memory or none: rewards (CPU), advantages, and the trainer's forward-only
log-prob passes (the parameters stay on the GPU unless rollout.sglang.offload_params). Step t:

    sync       the engine takes the GPUs and the weights of version t-1
    submit     step t+1's prompts go out under version t-1       --+
    score      step t's groups (generated during step t-1)          |  beside the engine's decoding
    logprobs   the old policy's and the reference's log-probs     --+  (after the release under offload_params)
    wait       step t+1's groups are in
    release    the engine gives the GPUs back, the trainer reloads
    update     step t's groups train the policy into version t

So every sample trains the policy one version after the one that sampled it; step 1's groups,
generated at its start, are on-policy.

A checkpoint after step t holds step t+1's groups (every data-parallel rank's, in prompt order) and
the prompt stream's position before their prompts, so a resumed run trains on the samples an
uninterrupted one would. A synchronous run resumed from it draws those prompts again and samples
them under the restored weights.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1mega.rollout.types import Rollouts, SamplingParams
from r1mega.trainer.timing import PhaseTimer


class OneStepOff:
    """Every trainer rank holds one; its engine is the run's colocated SGLangEngine."""

    def __init__(self, engine, sampler, sampling: SamplingParams, group_size: int, steps: int):
        self.engine, self.sampler, self.sampling = engine, sampler, sampling
        self.group_size, self.steps = group_size, steps
        self.pending = None  # the next step's generation in flight (SGLangEngine.submit)
        self.next_records: list = []  # its prompts
        self.next_streams: dict = {}  # the prompt stream and the engine's seed calls before them
        # the next step's groups once in: (prompt records, rollouts, version that sampled them), and the
        # streams before them
        self.ready: Optional[Tuple[list, Rollouts, int]] = None
        self.ready_streams: dict = {}
        self.kept: Optional[tuple] = None  # (ready, ready_streams) as the last finished step left them

    def this_step(self, step: int, timer: PhaseTimer) -> Tuple[list, Rollouts]:
        """Step `step`'s prompt records (one per row) and groups, with the version of every token; the
        next step's prompts are submitted under the weights the engine holds now (version step - 1).
        Call after the engine's sync."""
        if self.ready is None:  # the first step (or a resume from a checkpoint without groups ahead)
            prompts = self.sampler.next_batch()
            with timer("generate"):
                rollouts = self.engine.generate([r.token_ids for r in prompts], self.sampling, n=self.group_size)
            version = step - 1
        else:
            (prompts, rollouts, version), self.ready = self.ready, None
        rollouts.versions = [[version] * len(r) for r in rollouts.response_ids]
        self.next_streams = {"sampler": self.sampler.state_dict(), "calls": self.engine.state_dict()["calls"]}
        if step < self.steps:
            self.next_records = self.sampler.next_batch()
            self.pending = self.engine.submit([r.token_ids for r in self.next_records], self.sampling,
                                              n=self.group_size)
        return [prompts[g] for g in rollouts.group_index], rollouts

    @property
    def in_flight(self) -> bool:
        return self.pending is not None

    def collect(self, step: int) -> None:
        """Wait for the next step's groups (the engine must be idle before it releases the GPUs)."""
        if self.pending is None:
            return
        rollouts = self.engine.collect(self.pending)
        self.pending = None
        self.ready, self.ready_streams = (self.next_records, rollouts, step - 1), self.next_streams

    def step_done(self) -> None:
        """The step is trained on: from now on a checkpoint keeps the groups it left for the next one."""
        self.kept = (self.ready, self.ready_streams) if self.ready is not None else None

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The groups the last finished step left for the next one, every data-parallel rank's in rank
        order (= prompt order), and the prompt stream and seed calls before them; {} when none.
        Collective over the data-parallel group (its gloo group: host memory, not the GPUs')."""
        if self.kept is None:
            return {}
        (_, rollouts, version), streams = self.kept
        parts: List[Optional[dict]] = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(parts, rollouts.pack(), group=ps.get_data_parallel_group_gloo())
        return {**streams, "version": version, "groups": parts}

    def load_state_dict(self, state: dict) -> None:
        """Take this rank's share of the stored groups. The sampler and the engine's seed calls must
        stand where the state's do (before the groups), and move past them."""
        if not state:
            return
        whole = Rollouts.concat([Rollouts.unpack(p) for p in state["groups"]])
        prompts = self.sampler.next_batch()
        dp, me = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        total = max(whole.group_index, default=-1) + 1
        if total != len(prompts) * dp or len(whole) != total * self.group_size:
            raise ValueError(f"the checkpoint holds {len(whole)} samples in {total} groups generated ahead, but a "
                             f"step here has {len(prompts) * dp} prompts x {self.group_size} (data.prompts_per_step "
                             "or algorithm.group_size changed?)")
        first = me * len(prompts)
        mine = whole.select([i for i, g in enumerate(whole.group_index) if first <= g < first + len(prompts)])
        mine.group_index = [g - first for g in mine.group_index]
        for row, g in zip(mine.prompt_ids, mine.group_index):
            if row != list(prompts[g].token_ids):
                raise ValueError("the groups generated ahead in the checkpoint answer other prompts than this run "
                                 "draws (data or data.template changed?)")
        engine = self.engine.state_dict()
        self.engine.load_state_dict({**engine, "calls": engine["calls"] + 1})  # their generate call
        self.ready = (prompts, mine, int(state["version"]))
        self.ready_streams = {"sampler": state["sampler"], "calls": state["calls"]}
        self.kept = (self.ready, self.ready_streams)
