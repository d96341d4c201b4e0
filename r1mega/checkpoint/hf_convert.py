"""Load HF weights into megatron-core chunks and export them back, shard-aware.

Each rank reads only the slices of its own tensor-parallel shard, pipeline stage and
experts; export gathers each parameter over its tensor-parallel group and lets one rank
per replica write it. The HF family comes from r1mega.checkpoint.hf_mapping.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1mega.checkpoint.hf_carried import layer_count, layers_past, write_carried
from r1mega.checkpoint.hf_config import hf_config_from_model
from r1mega.checkpoint.hf_files import carry_with_tokenizer, has_tokenizer, write_generation_config
from r1mega.checkpoint.hf_io import CheckpointError, HFReader, ShardWriter, TensorReader, write_index
from r1mega.checkpoint.hf_mapping import MTP_SHARED_COPIES, Rule, decoder_tensor, mtp_layers, rule_for
from r1mega.checkpoint.staging import expert_biases, staging_dir, unwrap
from r1mega.platform.atomic import publish
from r1mega.platform.distributed import barrier, rank
from r1mega.config.schema import ModelConfig
from r1mega.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def _named_params(chunks: List[torch.nn.Module],
                  model: ModelConfig) -> Iterator[Tuple[str, torch.Tensor, Rule, torch.nn.Module]]:
    """(name, parameter, rule, its chunk) for every parameter (and routers' expert-bias buffer) of this
    rank, in a rank-independent order."""
    num_local = 0
    if model.moe is not None:
        num_local = model.moe.num_experts // ps.get_expert_model_parallel_world_size()
    expert_offset = ps.get_expert_model_parallel_rank() * num_local
    for chunk in map(unwrap, chunks):
        for name, param in [*chunk.named_parameters(), *expert_biases(chunk)]:
            layer_number = None
            if name.startswith("decoder.layers."):
                local = int(name.split(".")[2])
                layer_number = chunk.decoder.layers[local].layer_number
            yield name, param, rule_for(name, layer_number, expert_offset, model), chunk


def _tp(rule: Rule) -> Tuple[int, int, object]:
    if rule.is_expert:
        return (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
                ps.get_expert_tensor_parallel_group())
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_group())


def _is_split(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


# ---------------------------------------------------------------- HF -> megatron


def load_hf_weights(chunks: List[torch.nn.Module], model: ModelConfig,
                    source: str | Path | Dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of every parameter from the HF checkpoint folder `source`, or from
    HF-named tensors in memory (weights a trainer sent)."""
    reader = TensorReader(source) if isinstance(source, dict) else HFReader(source)
    if isinstance(reader, HFReader):
        _note_carried_layers(reader, model)
    with reader, torch.no_grad():
        if isinstance(reader, HFReader) and mtp_layers(model):
            _check_mtp_shares(reader, model, any(getattr(unwrap(c), "mtp_process", False) for c in chunks))
        for name, param, rule, _ in _named_params(chunks, model):
            shard = _read_shard(reader, param, rule, model)
            if tuple(shard.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{reader.path}: {' + '.join(rule.hf_names)} gives shape {tuple(shard.shape)} for "
                    f"{name}, which has shape {tuple(param.shape)} here (model config or layout mismatch)"
                )
            param.copy_(shard.to(param.dtype))


def _note_carried_layers(reader: HFReader, model: ModelConfig) -> None:
    """Layers past the decoder's and the model's MTP layers (DeepSeek-V3's multi-token prediction) are not
    trained: say where they go."""
    first = model.num_layers + mtp_layers(model)
    past = layers_past(reader.files, first)
    if past and rank() == 0:
        log.info("%s: %d layer(s) past the model's %d decoder and %d multi-token-prediction layers are not "
                 "trained; exports carry them unchanged (set model.mtp to train them)", reader.path,
                 layer_count(past), model.num_layers, mtp_layers(model))


def _check_mtp_shares(reader: HFReader, model: ModelConfig, holds_mtp: bool) -> None:
    """megatron's MTP layers share the model's embedding and output layer; an HF checkpoint repeats them in
    each MTP layer. Refuse copies that differ: loading would silently drop them. Each rank holding MTP
    layers compares its tensor-parallel share of the vocabulary rows; every rank (collective) learns
    the verdict, so all of them stop together."""
    differing = ""
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for depth in range(mtp_layers(model) if holds_mtp else 0):
        prefix = f"model.layers.{model.num_layers + depth}."
        for own, main in MTP_SHARED_COPIES.items():
            if main == "lm_head.weight" and model.tie_word_embeddings:
                main = "model.embed_tokens.weight"
            if prefix + own not in reader:
                continue
            rows = _rows(reader.shape(main)[0], rank, size)
            if not torch.equal(reader.read(prefix + own, 0, *rows), reader.read(main, 0, *rows)):
                differing = differing or f"{prefix + own} differs from {main}"
    found = [differing]
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, differing)
    differing = next((d for d in found if d), "")
    if differing:
        raise CheckpointError(f"{reader.path}: {differing}; r1mega's multi-token prediction (model.mtp) shares "
                              f"the model's, so it cannot load these (model.mtp=null carries the layer unchanged)")


def _read_shard(reader: HFReader, param: torch.Tensor, rule: Rule, model: ModelConfig) -> torch.Tensor:
    rank, size, _ = _tp(rule)
    if not _is_split(param):
        return reader.read(rule.hf_names[0])
    if rule.layout == "plain":
        dim = param.partition_dim
        n = reader.shape(rule.hf_names[0])[dim]
        return reader.read(rule.hf_names[0], dim, *_rows(n, rank, size))
    if rule.layout == "glu":
        parts = []
        for hf in rule.hf_names:
            n = reader.shape(hf)[0]
            parts.append(reader.read(hf, 0, *_rows(n, rank, size)))
        return torch.cat(parts, dim=0)
    return _read_qkv(reader, rule, model, rank, size)


def _rows(n: int, rank: int, size: int) -> Tuple[int, int]:
    if n % size:
        raise CheckpointError(f"dimension {n} does not split into {size} tensor-parallel shards")
    return rank * n // size, (rank + 1) * n // size


def _read_qkv(reader: HFReader, rule: Rule, model: ModelConfig, rank: int, size: int) -> torch.Tensor:
    """Rows of this rank's query groups, interleaved [q heads of g, k of g, v of g] per group."""
    groups = model.num_query_groups // size
    head_dim = model.head_dim or model.hidden_size // model.num_attention_heads
    q_per_group = model.num_attention_heads // model.num_query_groups
    g0 = rank * groups
    q_name, k_name, v_name = rule.hf_names
    q = reader.read(q_name, 0, g0 * q_per_group * head_dim, (g0 + groups) * q_per_group * head_dim)
    k = reader.read(k_name, 0, g0 * head_dim, (g0 + groups) * head_dim)
    v = reader.read(v_name, 0, g0 * head_dim, (g0 + groups) * head_dim)
    tail = q.shape[1:]
    q = q.reshape(groups, q_per_group * head_dim, *tail)
    k = k.reshape(groups, head_dim, *tail)
    v = v.reshape(groups, head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


# ---------------------------------------------------------------- megatron -> HF


def iter_hf_tensors(chunks: List[torch.nn.Module], model: ModelConfig) -> Iterator[Tuple[str, torch.Tensor, bool]]:
    """(hf_name, full tensor, this rank writes it) for this rank's stage and experts.

    Every rank must consume the iterator: the tensor-parallel gathers are collective.
    Tied output weights on the last stage are skipped (they are the embedding).
    """
    for tensors, writes in hf_tensors_by_param(chunks, model):
        for hf_name, tensor in tensors:
            yield hf_name, tensor, writes


def hf_tensors_by_param(chunks: List[torch.nn.Module], model: ModelConfig,
                        decoder_only: bool = False) -> Iterator[Tuple[List[Tuple[str, torch.Tensor]], bool]]:
    """For each parameter of this rank, in order: its HF tensors (one, or the q/k/v or gate/up parts)
    and whether this rank writes them. Each HF tensor has exactly one writer in the world. With
    `decoder_only` (what an engine decoding without MTP layers needs), the MTP layers' parameters and
    copies are left out before any gather (every rank of a stage leaves out the same ones)."""
    writer_dense = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank(
        with_context_parallel=True) == 0
    writer_expert = ps.get_expert_tensor_parallel_rank() == 0 and ps.get_expert_data_parallel_rank() == 0
    for name, param, rule, chunk in _named_params(chunks, model):
        if name == "output_layer.weight" and model.tie_word_embeddings:
            yield [], False
            continue
        copy = name == "embedding.word_embeddings.weight" and not chunk.pre_process  # the MTP stage's
        if decoder_only and (copy or not decoder_tensor(rule.hf_names[0], model)):
            continue
        full = _gather(param, rule)
        writes = writer_expert if rule.is_expert else writer_dense
        tensors = [] if copy else list(zip(rule.hf_names, _split_hf(full, rule, model, _tp(rule)[1])))
        if getattr(chunk, "mtp_process", False) and not decoder_only:
            tensors += _mtp_copies(name, full, model)
        yield tensors, writes


def _mtp_copies(name: str, full: torch.Tensor, model: ModelConfig) -> List[Tuple[str, torch.Tensor]]:
    """The copies of the embedding and output layer that an HF checkpoint keeps in each MTP layer."""
    copies = []
    if name == "embedding.word_embeddings.weight":
        copies = ["embed_tokens.weight"] + (["shared_head.head.weight"] if model.tie_word_embeddings else [])
    elif name == "output_layer.weight":
        copies = ["shared_head.head.weight"]
    # clones: safetensors refuses tensors that share memory in one file
    return [(f"model.layers.{model.num_layers + d}.{c}", full.clone()) for d in range(mtp_layers(model))
            for c in copies]


def _gather(param: torch.Tensor, rule: Rule) -> torch.Tensor:
    _, size, group = _tp(rule)
    if size == 1 or not _is_split(param):
        return param.detach()
    parts = [torch.empty_like(param) for _ in range(size)]
    dist.all_gather(parts, param.detach().contiguous(), group=group)
    if rule.layout == "glu":  # each shard is [gate_r; up_r]
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=param.partition_dim)


def _split_hf(full: torch.Tensor, rule: Rule, model: ModelConfig, tp_size: int) -> List[torch.Tensor]:
    if rule.layout == "plain":
        return [full]
    if rule.layout == "glu":
        return list(full.chunk(2, dim=0))
    head_dim = model.head_dim or model.hidden_size // model.num_attention_heads
    q_per_group = model.num_attention_heads // model.num_query_groups
    tail = full.shape[1:]
    grouped = full.reshape(model.num_query_groups, (q_per_group + 2) * head_dim, *tail)
    q, k, v = grouped.split([q_per_group * head_dim, head_dim, head_dim], dim=1)
    return [x.reshape(-1, *tail) for x in (q, k, v)]


def _folder_tokenizer(folder: Path):
    """The folder's tokenizer, for its special ids; None (with a warning) where transformers cannot
    load it here (e.g. one that needs trust_remote_code)."""
    if not has_tokenizer(folder):
        return None
    try:
        return load_tokenizer(folder)
    except Exception as e:  # transformers raises many types for a tokenizer it cannot build
        log.warning("%s: tokenizer not loadable here (%s); no generation_config.json written", folder, e)
        return None


def save_hf(chunks: List[torch.nn.Module], model: ModelConfig, out_dir: str | Path, tokenizer=None,
            carry_from: Sequence[Optional[str | Path]] = (), max_shard_bytes: int = 2 << 30) -> None:
    """Write the model as a complete HF folder: safetensors shards, their index, config.json, the
    layers past the decoder that the first `carry_from` folder (the weights' origin) holds (hf_carried),
    the carried files of the `carry_from` folders (tokenizer, chat template, licence, ...: hf_files),
    `tokenizer` where none of them holds one, and generation_config.json where none came along.

    Every rank calls this. Files go to `<out_dir>.tmp` and the folder is renamed once complete.
    """
    out = Path(out_dir)
    tmp = staging_dir(out)
    writer = ShardWriter(tmp, f"model-rank{rank():05d}", max_shard_bytes)
    total = 0
    for hf_name, tensor, writes in iter_hf_tensors(chunks, model):
        if writes:
            writer.add(hf_name, tensor)
            total += tensor.numel() * tensor.element_size()
    writer.flush()
    carried_layers = 0
    if rank() == 0:  # the layers past the decoder, from the weights' origin (hf_carried)
        carried, size, carried_layers = write_carried(carry_from[0] if carry_from else None, tmp, model.num_layers,
                                                      "model-carried", mtp_layers(model))
        writer.weight_map.update(carried)
        total += size
    maps = [(writer.weight_map, total)]
    if dist.is_initialized():
        maps = [None] * dist.get_world_size()
        dist.all_gather_object(maps, (writer.weight_map, total))
    if rank() == 0:
        weight_map = {k: v for m, _ in maps for k, v in m.items()}
        write_index(tmp, weight_map, sum(t for _, t in maps))
        (tmp / "config.json").write_text(json.dumps(hf_config_from_model(model, carried_layers), indent=2))
        carry_with_tokenizer(carry_from, tmp, tokenizer)
        write_generation_config(tmp, tokenizer if tokenizer is not None else _folder_tokenizer(tmp))
        publish(tmp, out)
    barrier()
