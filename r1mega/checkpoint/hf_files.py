"""The files of a model folder besides its weights: tokenizer, chat template, generation config,
custom code, licence, README. They are carried unchanged HF -> megatron -> HF (byte for byte), so
an exported folder is as complete as the checkpoint that came in, and an HF export always holds
a tokenizer and a generation_config.json that transformers, SGLang and vLLM load as they are.

What is never carried: weights in any format, their indexes, config.json (written from the
ModelConfig, which may have been trained on), megatron's checkpoint files, r1mega's model.yaml,
hidden files and subfolders (some HF repositories keep a second copy of the weights in one).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, List, Optional

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# written from the weights or the config, or megatron's / r1mega's own bookkeeping
REGENERATED = frozenset({"config.json", "model.yaml", "metadata.json", "common.pt"})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".distcp", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")


def carried_files(folder: str | Path) -> List[Path]:
    """The files of `folder` an export carries, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and not f.name.startswith(".") and f.name not in REGENERATED
                  and not f.name.endswith(WEIGHT_SUFFIXES))


def carry(sources: Iterable[Optional[str | Path]], dst: str | Path) -> List[str]:
    """Copy the carried files of each source folder into dst, in order (a later source's file wins);
    None and missing folders are skipped. Returns the names copied."""
    names = {}
    for source in sources:
        if source is None:
            continue
        for f in carried_files(source):
            shutil.copy2(f, Path(dst) / f.name)
            names[f.name] = True
    return list(names)


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def write_generation_config(folder: str | Path, tokenizer) -> Optional[Path]:
    """generation_config.json with the tokenizer's bos, eos and pad ids, unless the folder has one
    (a carried one holds the model's own sampling defaults). Pad falls back to eos, as r1mega's
    tokenizers do."""
    from transformers import GenerationConfig

    out = Path(folder) / GENERATION_CONFIG
    if out.is_file() or tokenizer is None:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=pad).to_json_file(str(out))
    return out
