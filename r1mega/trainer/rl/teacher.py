"""The on-policy distillation teacher: a frozen megatron model inside the job, in its own parallel
layout over the same ranks, that scores every token the student sampled.

The teacher may be larger than the student and split otherwise (TP=2 teacher beside TP=1 students
on two ranks: the students are two data-parallel ranks with different rows, the teacher one
tensor-parallel pair that must see both). So a scoring pass runs in the teacher's layout
(r1mega.platform.layouts): the rows of every rank of a teacher replica (its TP x PP ranks) are
gathered, each student replica's once; the replica computes their log-probs in micro-batches of its
own size; the last pipeline stage's values go to the replica's other stages; each rank keeps its own
rows'. Every rank of the job takes part, whatever the student's layout.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1mega.checkpoint.hf_config import model_config_from_hf
from r1mega.checkpoint.hf_convert import load_hf_weights
from r1mega.checkpoint.hf_io import CheckpointError
from r1mega.checkpoint.mcore import MODEL_YAML, load_model, read_model_config
from r1mega.config.schema import FP8Config, ModelConfig, R1Config
from r1mega.models.builder import build_model
from r1mega.platform.distributed import rank
from r1mega.platform.layouts import ParallelLayout
from r1mega.trainer.model_setup import exchange_shapes
from r1mega.trainer.rl.batch import StepBatch, micro_batches
from r1mega.trainer.rl.logprob_passes import forward_logprobs, per_row

log = logging.getLogger(__name__)


def teacher_model_config(path: str | Path) -> ModelConfig:
    """The teacher's architecture: an r1mega model folder's model.yaml, or an HF checkpoint's config.json."""
    folder = Path(path)
    if (folder / MODEL_YAML).is_file():
        return read_model_config(folder)
    if (folder / "config.json").is_file():
        return model_config_from_hf(folder)
    raise CheckpointError(f"algorithm.opd.teacher.path={path}: neither an r1mega model folder ({MODEL_YAML}) nor "
                          "an HF checkpoint (config.json)")


class Teacher:
    """Built collectively on every rank; `logprobs` is collective too."""

    def __init__(self, cfg: R1Config):
        t = cfg.algorithm.opd.teacher
        # the job's precision and attention kernels; a frozen scorer needs no FP8 and no MTP layers
        self.model = replace(teacher_model_config(t.path), dtype=cfg.model.dtype, fp8=FP8Config(), mtp=None,
                             attention_backend=cfg.model.attention_backend)
        trainer = replace(cfg.trainer, micro_batch_tokens=t.micro_batch_tokens or cfg.trainer.micro_batch_tokens)
        # micro-batching (packing, sequence-parallel multiples) as the student's, under the teacher's model
        self.cfg = replace(cfg, model=self.model, parallel=t.parallel, trainer=trainer)
        self.layout = ParallelLayout(t.parallel)
        with self.layout.active():
            self.chunks = build_model(self.model, t.parallel)
            if (Path(t.path) / MODEL_YAML).is_file():
                load_model(self.chunks, t.path)
            else:
                load_hf_weights(self.chunks, self.model, t.path)
            exchange_shapes(self.chunks)
            for chunk in self.chunks:
                chunk.eval()
                chunk.requires_grad_(False)
        if rank() == 0:
            log.info("teacher %s from %s: tp=%d pp=%d ep=%d", self.model.name, t.path, t.parallel.tp, t.parallel.pp,
                     t.parallel.ep)

    def logprobs(self, batch: StepBatch) -> List[torch.Tensor]:
        """The teacher's log-prob of each response token of this rank's rows, on every rank: of its own
        distribution (temperature 1, as an SGLang server returns prompt log-probs), which the student's
        sampling distribution learns to match."""
        student = ps.get_data_parallel_rank()  # rows are the same on every rank of one student replica
        mine = (student, batch.tokens, batch.prompt_lens)
        with self.layout.active():
            group = ps.get_model_parallel_group()  # a teacher replica: its TP x PP ranks (cp is 1)
            everyone: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(everyone, mine, group=group)
            owners = {}  # student replica -> its rows' place in the gathered batch, each replica once
            tokens, prompt_lens = [], []
            for who, rows, lens in everyone:
                if who not in owners:
                    owners[who] = list(range(len(tokens), len(tokens) + len(rows)))
                    tokens += rows
                    prompt_lens += lens
            responses = [torch.zeros(len(t) - n) for t, n in zip(tokens, prompt_lens)]  # (no engine log-probs)
            gathered = StepBatch(tokens, prompt_lens, torch.zeros(len(tokens)), responses)
            micro = micro_batches(self.cfg, gathered, list(range(len(tokens))))
            values = per_row(len(tokens), micro, forward_logprobs(self.chunks, micro, 1.0))
            values = self._from_last_stage(values)
        return [values[i] for i in owners[student]]

    @staticmethod
    def _from_last_stage(values: Optional[List[torch.Tensor]]) -> List[torch.Tensor]:
        """The last pipeline stage's values on every stage of the replica (in the teacher's layout)."""
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return values
        group = ps.get_pipeline_model_parallel_group()
        box = [values]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(), group=group)
        return box[0]
