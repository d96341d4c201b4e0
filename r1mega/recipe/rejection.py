"""Rejection sampling: k responses per prompt from a checkpoint, scored, filtered, written as SFT data.

Each data-parallel rank generates for its share of the prompts; the first rank of each
model-parallel group scores them (accuracy, format, language consistency) and applies the
filters of r1mega.recipe.filters to them; rank 0 joins the kept shards and writes

  data.jsonl   one conversation per kept response, with provenance (source checkpoint,
               prompt id, sample index, rewards, length), then the mixed-in conversations
  stats.json   per data source: prompts, samples, accepted, kept, rejections by rule,
               acceptance rate
  parts/       each generation call's scored candidates: a stopped run resumes after the
               last finished call
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1mega.config.rl_rules import pretrain_runs
from r1mega.config.schema import R1Config
from r1mega.data.conversations import conversation_row, load_conversations
from r1mega.data.templates import user_text
from r1mega.platform.distributed import Runtime, dp_all_reduce, dp_share, replica_group
from r1mega.recipe.filters import Candidate, FilterRules, merge_stats, select
from r1mega.recipe.inference import inference_context
from r1mega.recipe.jsonl import write_json, write_jsonl
from r1mega.trainer.rl.context import RLContext
from r1mega.trainer.rl.step import score

log = logging.getLogger(__name__)
DATA_FILE, STATS_FILE, PARTS_DIR = "data.jsonl", "stats.json", "parts"
COMPONENTS = {"accuracy": 1.0, "format": 0.0, "language": 0.0}


def rules(cfg: R1Config) -> FilterRules:
    s = cfg.sample
    return FilterRules(min_accuracy=s.min_accuracy, min_format=s.min_format, min_language=s.min_language,
                       max_response_tokens=s.max_response_tokens or cfg.rollout.max_new_tokens, dedupe=s.dedupe,
                       keep_per_prompt=s.keep_per_prompt)


def _prompts(cfg: R1Config, train: list) -> list:
    """sample.max_prompts of the train split (a seeded choice), or all of it."""
    n = cfg.sample.max_prompts
    if not n or n >= len(train):
        return train
    pick = np.random.default_rng([cfg.sample.seed, 3]).choice(len(train), size=n, replace=False)
    return [train[i] for i in sorted(pick.tolist())]


def setup_key(cfg: R1Config) -> str:
    """What the candidates depend on besides the prompts and seed: the weights (path and their files'
    times), the model, sampling, template and reward settings. Saved parts of another setup are stale."""
    source = cfg.model.mcore_path or cfg.model.hf_path
    stamps = []
    if source:
        stamps = [f.stat().st_mtime_ns for f in (Path(source) / "metadata.json", Path(source) / "config.json")
                  if f.is_file()]
    fields = {"source": source, "stamps": stamps, "model": asdict(cfg.model), "rollout": asdict(cfg.rollout),
              "template": cfg.data.template, "language": cfg.reward.language, "custom": dict(cfg.reward.custom),
              "pretrain": asdict(cfg.pretrain) if pretrain_runs(cfg) else None}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _candidates(ctx: RLContext, prompts: list, k: int, seed: int, parts: Path, per_call: int,
                setup: str) -> List[Candidate]:
    """k scored responses to each prompt (on every rank of the model-parallel group).

    Prompts go in calls of `per_call`; each call's candidates are kept in `parts`, so a
    stopped run picks up after the last call every rank finished."""
    out: List[Candidate] = []
    for call, start in enumerate(range(0, len(prompts), per_call)):
        batch = prompts[start:start + per_call]
        content = json.dumps([[r.token_ids, r.answer] for r in batch]).encode()
        key = {"setup": setup, "seed": seed, "k": k, "prompts": [r.prompt_id for r in batch],
               "content": hashlib.sha256(content).hexdigest()[:16]}  # edited prompts or answers: stale
        part = parts / f"dp{ps.get_data_parallel_rank()}-call{call}.json"
        done = _read_part(part, key)
        if dp_all_reduce([float(done is not None)], dist.ReduceOp.MIN)[0] < 1:  # every rank resumes, or none
            done = _generate(ctx, batch, k, seed * 1_000_003 + call)
            if _first_of_group():
                write_json(part, {"key": key, "candidates": [asdict(c) for c in done]})
        out += done
        if dist.get_rank() == 0:
            log.info("sampled %d of %d prompts (this rank's share)", min(start + len(batch), len(prompts)),
                     len(prompts))
    return out


def _read_part(part: Path, key: dict) -> Optional[List[Candidate]]:
    """A finished call's candidates, if saved for the same key (the replica group agrees)."""
    found = [None]
    if _first_of_group() and part.is_file():
        try:
            saved = json.loads(part.read_text())
            if saved.get("key") == key:
                found = [[Candidate(**c) for c in saved["candidates"]]]
        except (ValueError, TypeError, KeyError):  # a damaged part is generated again
            found = [None]
    group = replica_group()
    if dist.get_world_size(group) > 1:
        dist.broadcast_object_list(found, src=dist.get_global_rank(group, 0), group=group)
    return found[0]


def _generate(ctx: RLContext, batch: list, k: int, seed: int) -> List[Candidate]:
    params = replace(ctx.sampling, seed=seed)
    rollouts = ctx.engine.generate([r.token_ids for r in batch], params, n=k)
    records = [batch[g] for g in rollouts.group_index]
    scores = score(ctx, records, rollouts)
    out = []
    for row, (record, ids, reason) in enumerate(zip(records, rollouts.response_ids, rollouts.finish_reasons)):
        out.append(Candidate(
            prompt_id=record.prompt_id, data_source=record.data_source, prompt=user_text(record),
            response=ctx.tokenizer.decode(ids, skip_special_tokens=True), response_tokens=len(ids),
            finished=reason == "stop", sample_index=row % k,
            rewards={name: float(v[row]) for name, v in scores.components.items()}))
    return out


def _first_of_group() -> bool:
    return dist.get_rank() == dist.get_global_rank(replica_group(), 0)


def _shard_stats(stats: Dict[str, dict]) -> List[Dict[str, dict]]:
    """Every data-parallel shard's statistics (model-parallel peers contribute nothing)."""
    parts: List = [None] * dist.get_world_size()
    dist.all_gather_object(parts, stats if _first_of_group() else {})
    return parts


def _concat(files: List[Path]) -> Iterator[Dict]:
    for file in files:
        with file.open(encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def _row(c: Candidate, source_checkpoint: str) -> Dict:
    return conversation_row(f"{c.prompt_id}-s{c.sample_index}", c.prompt, c.response, c.data_source,
                            {"source_checkpoint": source_checkpoint, "prompt_id": c.prompt_id,
                             "sample_index": c.sample_index, "rewards": c.rewards,
                             "response_tokens": c.response_tokens})


def _mixed(cfg: R1Config) -> List[Dict]:
    """The non-reasoning conversations, ids made unique over the files."""
    rows = []
    for i, path in enumerate(cfg.sample.mix_files):
        for conv in load_conversations([path], cfg.data.on_bad_row, cfg.data.limits):
            rows.append({"id": f"mix{i}-{conv.prompt_id}", "messages": conv.messages,
                         "data_source": conv.data_source,
                         "provenance": {"source": "mix", "file": str(path), "id": conv.prompt_id}})
    return rows


def run(cfg: R1Config, runtime: Runtime) -> Dict[str, dict]:
    """Generate, score, filter and write; the statistics (on every rank)."""
    mixed = _mixed(cfg)  # read first: a bad file fails before hours of generation
    out = Path(cfg.trainer.output_dir)
    ctx, train = inference_context(cfg, runtime, COMPONENTS)
    try:
        prompts = _prompts(cfg, train)
        shard, real = dp_share(prompts, prompts[0])  # ranks generate in lock-step (expert parallelism)
        k = cfg.sample.samples_per_prompt
        mine = _candidates(ctx, shard, k, cfg.sample.seed + ps.get_data_parallel_rank(), out / PARTS_DIR,
                           cfg.sample.prompts_per_call, setup_key(cfg))
    finally:
        ctx.close()
    # A prompt's responses all live on one data-parallel rank: each rank filters its own and
    # writes what it keeps; rank 0 joins the shard files, so no rank holds every response.
    kept, stats = select(mine[:real * k], rules(cfg))  # padding prompts' responses are dropped
    source = str(cfg.model.mcore_path or cfg.model.hf_path
                 or ("built-in base model" if pretrain_runs(cfg) else "random initialisation"))
    shard_file = out / PARTS_DIR / f"kept-dp{ps.get_data_parallel_rank()}.jsonl"
    if _first_of_group():
        write_jsonl(shard_file, (_row(c, source) for c in kept))
    stats = merge_stats(_shard_stats(stats))
    if runtime.is_main:
        stats["mix"] = {"rows": len(mixed), "files": list(cfg.sample.mix_files)}
        shards = [out / PARTS_DIR / f"kept-dp{r}.jsonl" for r in range(ps.get_data_parallel_world_size())]
        write_jsonl(out / DATA_FILE, itertools.chain(_concat(shards), mixed))
        write_json(out / STATS_FILE, stats)
        for name, s in stats.items():
            if name != "mix":
                log.info("%-12s prompts %5d  samples %6d  accepted %5.1f%%  kept %5d  rejected %s", name,
                         s["prompts"], s["samples"], 100 * s["acceptance_rate"], s["kept"],
                         {r: n for r, n in s["rejected"].items() if n})
        log.info("wrote %s (%d kept + %d mixed)", out / DATA_FILE, stats["all"]["kept"], len(mixed))
    dist.barrier()
    return stats
