"""The files of a model folder besides its weights: tokenizer, chat templates, generation config,
custom code, licence, README. They are carried unchanged HF -> megatron -> HF (byte for byte), so
an exported folder is as complete as the checkpoint that came in, and an HF export always holds
a tokenizer and a generation_config.json that transformers, SGLang and vLLM load as they are.

What is never carried: weights in any format and their indexes; config.json (written from the
ModelConfig, which may have been trained on); megatron's checkpoint files and r1mega's model.yaml;
files that describe weights the export does not hold (quantization configs, adapters, trainer
state); hidden files; and subfolders (some repositories keep a second copy of the weights in one)
except transformers' named chat templates.

A tokenizer is a set of files (tokenizer.json, its config, vocabularies, chat templates, special
tokens), so it comes whole from one folder: the last source that has one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterable, List, Optional

from r1mega.data.tokenizer import TOKENIZER_FILES

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATES_DIR = "additional_chat_templates"  # transformers' named chat templates
# written from the weights or the config, megatron's and r1mega's own, or about other weights
NOT_CARRIED = frozenset({
    "config.json", "model.yaml", "metadata.json", "common.pt", "hf_quant_config.json", "quantize_config.json",
    "quantization_config.json", "adapter_config.json", "trainer_state.json", "params.json"})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".distcp", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".nemo",
                   ".onnx", ".ot", ".index.json")
# the files that make up a tokenizer, besides TOKENIZER_FILES
TOKENIZER_PARTS = ("special_tokens_map.json", "added_tokens.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json", "spiece.model", "sentencepiece.bpe.model")


def _is_tokenizer_part(name: str) -> bool:
    return (name in TOKENIZER_FILES or name in TOKENIZER_PARTS or name.endswith(".tiktoken")
            or name.startswith("tokenization_") or name == CHAT_TEMPLATES_DIR)


def carried_files(folder: str | Path) -> List[Path]:
    """The files (and the named chat templates' folder) of `folder` an export carries, by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir()
                  if (f.is_file() and not f.name.startswith(".") and f.name not in NOT_CARRIED
                      and not f.name.endswith(WEIGHT_SUFFIXES)) or (f.is_dir() and f.name == CHAT_TEMPLATES_DIR))


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def carry(sources: Iterable[Optional[str | Path]], dst: str | Path) -> List[str]:
    """Copy the carried files of each source folder into dst, in order (a later source's file wins),
    the tokenizer's files from the last source that has a tokenizer only. Empty and missing sources
    are skipped (an empty path would be the working directory). Returns the names copied."""
    folders = [Path(s) for s in sources if s and Path(s).is_dir()]
    with_tokenizer = [f for f in folders if has_tokenizer(f)]
    names = {}
    for folder in folders:
        for f in carried_files(folder):
            if _is_tokenizer_part(f.name) and (not with_tokenizer or folder != with_tokenizer[-1]):
                continue
            target = Path(dst) / f.name
            if f.is_dir():
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(f, target)
            else:
                shutil.copy2(f, target)
            names[f.name] = True
    return list(names)


def carry_with_tokenizer(sources: Iterable[Optional[str | Path]], dst: str | Path, tokenizer=None) -> None:
    """carry(), then `tokenizer` saved into dst where no source held one."""
    carry(sources, dst)
    if tokenizer is not None and not has_tokenizer(dst):
        tokenizer.save_pretrained(str(dst))


def write_generation_config(folder: str | Path, tokenizer) -> Optional[Path]:
    """generation_config.json with the tokenizer's bos, eos and pad ids, unless the folder has one
    (a carried one holds the model's own sampling defaults; a warning if its eos is not the
    tokenizer's). Pad falls back to eos, as r1mega's tokenizers do."""
    from transformers import GenerationConfig

    out = Path(folder) / GENERATION_CONFIG
    if out.is_file():
        eos = json.loads(out.read_text()).get("eos_token_id")
        if tokenizer is not None and tokenizer.eos_token_id not in (eos if isinstance(eos, list) else [eos]):
            log.warning("%s: eos_token_id %s is not the tokenizer's eos (%s); generation may not stop where "
                        "training's did", out, eos, tokenizer.eos_token_id)
        return None
    if tokenizer is None:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=pad).to_json_file(str(out))
    return out
