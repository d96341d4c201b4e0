"""Layers an HF checkpoint holds past its decoder's: DeepSeek-V3's multi-token-prediction (MTP)
layers, numbered num_hidden_layers and up.

A model with `model.mtp` loads the first model.mtp.num_layers of them into megatron's MTP block (the
checkpoint's mapping, hf_mapping); any others, and all of them for a model without, travel unchanged
HF -> megatron -> HF rather than being dropped: an r1mega model folder keeps them as HF-named
safetensors (carried-*.safetensors and their index, CARRIED_INDEX), and an HF export writes them back
beside the trained layers, with `num_nextn_predict_layers` counting them. An fp8 source's carried
layers are dequantized as its decoder is, so an export is in one precision.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from r1mega.checkpoint.hf_config import read_hf_config
from r1mega.checkpoint.hf_io import INDEX, SCALE_SUFFIX, SINGLE, HFReader, ShardWriter, write_index

log = logging.getLogger(__name__)

CARRIED_INDEX = "carried.safetensors.index.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def layers_past(names: Iterable[str], num_layers: int) -> List[str]:
    """The tensors of layers numbered num_layers and up (their fp8 scales aside: reads dequantize)."""
    out = []
    for name in names:
        match = _LAYER.match(name)
        if match is not None and int(match.group(1)) >= num_layers and not name.endswith(SCALE_SUFFIX):
            out.append(name)
    return sorted(out)


def layer_count(names: Iterable[str]) -> int:
    return len({_LAYER.match(n).group(1) for n in names})


def carried_reader(folder: str | Path, num_layers: int, mtp_layers: int = 0) -> Optional[Tuple[HFReader, List[str]]]:
    """(reader, names) of the carried layers of an r1mega model folder, or of an HF folder whose decoder
    has num_layers layers (a folder of another model carries nothing), past the `mtp_layers` the model
    loads itself; None when there are none."""
    folder = Path(folder)
    if (folder / CARRIED_INDEX).is_file():
        reader = HFReader(folder, index=CARRIED_INDEX)
        return reader, sorted(reader.files)
    if not ((folder / INDEX).is_file() or (folder / SINGLE).is_file()):
        return None
    try:
        if read_hf_config(folder).get("num_hidden_layers") != num_layers:
            return None
    except (FileNotFoundError, ValueError):
        return None
    reader = HFReader(folder)
    names = layers_past(reader.files, num_layers + mtp_layers)
    if not names:
        reader.close()
        return None
    return reader, names


def write_carried(source: Optional[str | Path], folder: Path, num_layers: int,
                  prefix: str, mtp_layers: int = 0) -> Tuple[Dict[str, str], int, int]:
    """Copy the carried layers of the model folder `source` (the weights' own origin, never a tokenizer's
    folder) into `prefix`-NNNNN.safetensors shards of `folder`, tensor by tensor. Returns (weight map,
    bytes, number of layers)."""
    found = carried_reader(source, num_layers, mtp_layers) if source and Path(source).is_dir() else None
    if found is None:
        return {}, 0, 0
    reader, names = found
    writer, total = ShardWriter(folder, prefix), 0
    with reader:
        for name in names:
            tensor = reader.read(name)
            writer.add(name, tensor)
            total += tensor.numel() * tensor.element_size()
    writer.flush()
    layers = layer_count(names)
    log.info("%s: carried %d layer(s) past the decoder's %d (multi-token prediction) unchanged", reader.path, layers,
             num_layers)
    return writer.weight_map, total, layers


def save_carried(source: Optional[str | Path], folder: Path, num_layers: int, mtp_layers: int = 0) -> None:
    """The carried layers of model folder `source` into an r1mega model folder (rank 0)."""
    weight_map, total, _ = write_carried(source, folder, num_layers, "carried", mtp_layers)
    if weight_map:
        write_index(folder, weight_map, total, CARRIED_INDEX)
