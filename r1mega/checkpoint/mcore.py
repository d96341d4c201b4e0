"""Model weights as megatron distributed checkpoints (dist_checkpointing), any layout in, any out.

A folder holds the sharded tensors plus `model.yaml`, the ModelConfig they belong to, so a
checkpoint can be loaded or exported without knowing how it was made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException
from omegaconf import OmegaConf

from r1mega.checkpoint.hf_carried import save_carried
from r1mega.checkpoint.hf_mapping import mtp_layers
from r1mega.checkpoint.hf_files import carry_with_tokenizer
from r1mega.checkpoint.hf_io import CheckpointError
from r1mega.checkpoint.staging import error_line, staging_dir, unwrap
from r1mega.platform.atomic import publish
from r1mega.platform.distributed import barrier, rank
from r1mega.config.schema import ModelConfig

MODEL_YAML = "model.yaml"


def model_keys(n: int) -> List[str]:
    """'model' for one chunk, 'model0', 'model1', ... under virtual pipelining (megatron's names)."""
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def model_sharded_state_dict(chunks: List[torch.nn.Module], metadata: Optional[dict] = None) -> Dict[str, object]:
    return {k: unwrap(c).sharded_state_dict(metadata=metadata) for k, c in zip(model_keys(len(chunks)), chunks)}


def save_model(chunks: List[torch.nn.Module], model: ModelConfig, folder: str | Path, tokenizer=None,
               carry_from: Sequence[Optional[str | Path]] = ()) -> None:
    """Every rank calls this; the folder appears only once complete. The carried files of the
    `carry_from` folders (tokenizer, chat template, generation config, licence: hf_files) come
    along unchanged, and so do the layers past the decoder that the first of them (the weights'
    origin) holds (hf_carried); `tokenizer` is saved only where none of them holds one (the next
    stage, SFT, RL or sampling, reads text with it)."""
    final = Path(folder)
    tmp = staging_dir(final)
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp))
    barrier()
    if rank() == 0:
        (tmp / MODEL_YAML).write_text(OmegaConf.to_yaml(OmegaConf.structured(model)))
        carry_with_tokenizer(carry_from, tmp, tokenizer)
        save_carried(carry_from[0] if carry_from else None, tmp, model.num_layers, mtp_layers(model))
        publish(tmp, final)
    barrier()


def read_model_config(folder: str | Path) -> ModelConfig:
    file = Path(folder) / MODEL_YAML
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; {folder} is not a complete r1mega model checkpoint")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(file))
    return OmegaConf.to_object(merged)


SHAPE_KEYS = ("arch", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "head_dim", "vocab_size", "mla")
# the MoE keys that shape the weights (routing and balancing settings may change between runs)
MOE_SHAPE_KEYS = ("num_experts", "ffn_hidden_size", "shared_expert_ffn_hidden_size", "shared_expert_gate",
                  "expert_bias", "first_k_dense", "dense_ffn_hidden_size")


def _shape(model: ModelConfig) -> dict:
    out = {k: getattr(model, k) for k in SHAPE_KEYS}
    out["moe"] = None if model.moe is None else {k: getattr(model.moe, k) for k in MOE_SHAPE_KEYS}
    out["mtp.num_layers"] = mtp_layers(model)
    return out


def check_model_matches(folder: str | Path, model: ModelConfig) -> None:
    """Refuse, naming the differing keys, weights saved for another architecture than `model`."""
    if not (Path(folder) / MODEL_YAML).is_file():
        return
    config = read_model_config(folder)
    saved, here = _shape(config), _shape(model)
    diff = [f"{k}: {saved[k]} there, {here[k]} here" for k in saved if saved[k] != here[k]]
    if diff:
        raise CheckpointError(f"{folder} holds model {config.name!r}, not the configured {model.name!r} "
                              f"({'; '.join(diff)}); choose the matching model= preset")


def load_model(chunks: List[torch.nn.Module], folder: str | Path) -> None:
    """Load weights saved under any parallel layout into this rank's chunks."""
    folder = Path(folder)
    if not (folder / "metadata.json").is_file():
        raise CheckpointError(f"{folder}: not a megatron distributed checkpoint (no metadata.json)")
    sharded = model_sharded_state_dict(chunks)
    try:
        state = dist_checkpointing.load(sharded, str(folder))
    except (Exception, CheckpointException) as e:  # the latter derives from BaseException
        raise CheckpointError(f"{folder}: cannot load model weights ({error_line(e)})") from None
    for key, chunk in zip(model_keys(len(chunks)), chunks):
        unwrap(chunk).load_state_dict(state[key], strict=True)


