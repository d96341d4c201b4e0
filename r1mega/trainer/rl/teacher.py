"""The on-policy distillation teacher: a frozen megatron model inside the job, in its own parallel
layout over the same ranks, that scores every token the student sampled.

The teacher may be larger than the student and split otherwise (TP=2 teacher beside TP=1 students
on two ranks: the students are two data-parallel ranks with different rows, the teacher one
tensor-parallel pair that must see both). So a scoring pass runs in the teacher's layout
(r1mega.platform.layouts): the rows of every rank of a teacher replica (its TP x PP ranks) are
gathered, each student replica's once; the replica computes their log-probs in micro-batches of its
own size; the last pipeline stage's values go to the replica's other stages; each rank keeps its own
rows'. Every rank of the job takes part, whatever the student's layout.

On GPU clusters the teacher may instead be an SGLang server (`algorithm.opd.teacher.server`): each
student replica's first rank sends its rows, prefill only, and shares the prompt log-probs it gets back.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1mega.checkpoint.hf_config import model_config_from_hf
from r1mega.checkpoint.hf_io import CheckpointError
from r1mega.checkpoint.mcore import MODEL_YAML, read_model_config
from r1mega.config.schema import FP8Config, ModelConfig, R1Config
from r1mega.models.builder import build_model
from r1mega.ops.logprobs import target_logprobs, top_logprobs
from r1mega.platform.distributed import rank, replica_group
from r1mega.platform.layouts import ParallelLayout
from r1mega.rollout.sglang.client import SGLangClient
from r1mega.trainer.forward_backward import run_schedule
from r1mega.trainer.model_setup import exchange_shapes, load_weights
from r1mega.trainer.rl.batch import StepBatch, micro_batches

log = logging.getLogger(__name__)


def teacher_model_config(path: str | Path) -> ModelConfig:
    """The teacher's architecture, with the folder as where its weights load from (model.mcore_path or
    model.hf_path, as load_weights reads them): an r1mega model folder's model.yaml, or an HF checkpoint's
    config.json."""
    folder = Path(path)
    if (folder / MODEL_YAML).is_file():
        return replace(read_model_config(folder), mcore_path=str(folder), hf_path=None)
    if (folder / "config.json").is_file():
        return replace(model_config_from_hf(folder), hf_path=str(folder), mcore_path=None)
    raise CheckpointError(f"algorithm.opd.teacher.path={path}: neither an r1mega model folder ({MODEL_YAML}) nor "
                          "an HF checkpoint (config.json)")


def make_teacher(cfg: R1Config):
    """The configured teacher: served by SGLang, or a model in the job."""
    return ServedTeacher(cfg) if cfg.algorithm.opd.teacher.server else Teacher(cfg)


class Teacher:
    """Built collectively on every rank; `score` is collective too."""

    def __init__(self, cfg: R1Config):
        t = cfg.algorithm.opd.teacher
        # the job's precision and attention kernels; a frozen scorer needs no FP8 (nor MTP layers: below)
        self.model = replace(teacher_model_config(t.path), dtype=cfg.model.dtype, fp8=FP8Config(),
                             attention_backend=cfg.model.attention_backend)
        trainer = replace(cfg.trainer, micro_batch_tokens=t.micro_batch_tokens or cfg.trainer.micro_batch_tokens)
        # micro-batching (packing, sequence-parallel multiples) as the student's, under the teacher's model
        self.cfg = replace(cfg, model=self.model, parallel=t.parallel, trainer=trainer)
        self.top_k = cfg.algorithm.opd.top_k
        self.student_vocab = cfg.model.vocab_size  # top-k candidates the student's output layer has
        self.layout = ParallelLayout(t.parallel)
        with self.layout.active():
            # built without MTP layers, loaded (checked against the folder's model) as generation loads a model
            self.chunks = build_model(replace(self.model, mtp=None), t.parallel, initialize=False)
            load_weights(self.chunks, self.cfg, self.model.mcore_path or self.model.hf_path)
            exchange_shapes(self.chunks)
            for chunk in self.chunks:
                chunk.eval()
                chunk.requires_grad_(False)
        if rank() == 0:
            log.info("teacher %s from %s: tp=%d pp=%d ep=%d", self.model.name, t.path, t.parallel.tp, t.parallel.pp,
                     t.parallel.ep)

    def score(self, batch: StepBatch) -> "TeacherScores":
        """The teacher's log-prob of each response token of this rank's rows (and its top-k), on every rank:
        of its own distribution (temperature 1, as an SGLang server returns prompt log-probs), which the
        student's sampling distribution learns to match."""
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
            rows = self._from_last_stage(self._forward(micro, len(tokens)))
        return TeacherScores.of([rows[i] for i in owners[student]])

    def _forward(self, micro: list, n: int) -> Optional[list]:
        """(log-probs [R], top-k log-probs [R, k], top-k ids [R, k]) of each row, on the last pipeline stage."""
        k = self.top_k

        def collect(m, logits):
            logp, _ = target_logprobs(logits, m.targets, 1.0, with_entropy=False)
            report = {"logp": m.per_row(logp).float().cpu()}
            if k:
                top, ids = top_logprobs(logits, k, below=self.student_vocab)
                report.update(top=m.per_row(top).float().cpu(), ids=m.per_row(ids).cpu())
            return logits.new_zeros(()), report

        with torch.no_grad():
            out = run_schedule(self.chunks, micro, collect, forward_only=True)
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return None
        rows: list = [None] * n
        for m, o in zip(micro, out):
            for j, row in enumerate(m.rows):
                keep = m.mask[j]
                rows[row] = (o["logp"][j][keep],) + ((o["top"][j][keep], o["ids"][j][keep]) if k else (None, None))
        return rows

    @staticmethod
    def _from_last_stage(values: Optional[list]) -> list:
        """The last pipeline stage's values on every stage of the replica (in the teacher's layout)."""
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return values
        group = ps.get_pipeline_model_parallel_group()
        box = [values]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(), group=group)
        return box[0]


class TeacherScores(NamedTuple):
    logp: List[torch.Tensor]  # [R_i] of each row's response tokens
    # [R_i, k + 1] the teacher's k most likely tokens, most likely first, then the log of all other tokens' mass
    topk_logp: Optional[List[torch.Tensor]]
    topk_ids: Optional[List[torch.Tensor]]

    @staticmethod
    def of(rows: list) -> "TeacherScores":
        """From (logp, top-k log-probs or None, top-k ids or None) per row."""
        with_topk = bool(rows) and rows[0][1] is not None
        return TeacherScores([r[0] for r in rows], [r[1] for r in rows] if with_topk else None,
                             [r[2] for r in rows] if with_topk else None)


class ServedTeacher:
    """An SGLang server as the teacher (checked against sglang 0.5.23's input log-probs: see
    SGLangClient.prompt_logprobs). Its log-probs are the served model's raw distribution, as Teacher's."""

    ROWS_PER_REQUEST = 64  # rows of one /generate call: bounds the server's prefill batch and the reply's size

    def __init__(self, cfg: R1Config):
        self.url, self.top_k = cfg.algorithm.opd.teacher.server, cfg.algorithm.opd.top_k
        self.client = SGLangClient(self.url)
        group = replica_group()
        self.first = dist.get_rank() == dist.get_global_rank(group, 0)
        if self.first:
            self.client.wait_ready(timeout_s=cfg.rollout.sglang.startup_timeout_s)
            if rank() == 0:
                log.info("teacher: SGLang server %s (version %s)", self.url, self.client.server_version())

    def score(self, batch: StepBatch) -> TeacherScores:
        group = replica_group()
        box: list = [None]
        if self.first:
            try:
                box[0] = self._request(batch)
            except Exception as e:  # noqa: BLE001 - every rank of the group raises it, none waits
                box[0] = f"teacher {self.url}: {type(e).__name__}: {e}"
        if dist.get_world_size(group) > 1:
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        if isinstance(box[0], str):
            raise RuntimeError(box[0])
        return TeacherScores.of(box[0])

    def _request(self, batch: StepBatch) -> list:
        k = self.top_k
        out = [(torch.zeros(0), torch.zeros(0, k + 1), torch.zeros(0, k, dtype=torch.long)) if k else
               (torch.zeros(0), None, None)] * len(batch)  # rows with no response
        rows = [i for i in range(len(batch)) if len(batch.tokens[i]) > batch.prompt_lens[i]]
        for start in range(0, len(rows), self.ROWS_PER_REQUEST):
            part = rows[start:start + self.ROWS_PER_REQUEST]
            got = self.client.prompt_logprobs([batch.tokens[i].tolist() for i in part],
                                              [batch.prompt_lens[i] for i in part], k)
            for i, (values, top) in zip(part, got):
                top = torch.tensor(top, dtype=torch.float64) if k else None  # [R, k, (log-prob, id)]
                out[i] = (torch.tensor(values, dtype=torch.float32), _with_rest(top[..., 0]) if k else None,
                          top[..., 1].long() if k else None)
        return out


def _with_rest(top: torch.Tensor) -> torch.Tensor:
    """[R, k + 1]: a server's top-k log-probs and the log of the rest's mass, 1 minus theirs, in float64. The
    server's log-probs are fp32: a rest below their rounding (float32's epsilon) is taken as that epsilon."""
    floor = torch.finfo(torch.float32).eps
    rest = torch.log((1.0 - top.exp().sum(-1)).clamp(min=floor))
    return torch.cat([top, rest.unsqueeze(-1)], dim=-1).float()
