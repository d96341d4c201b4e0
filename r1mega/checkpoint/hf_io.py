"""Reading and writing HF safetensors checkpoints tensor by tensor, slices only where asked.

Block-quantized fp8 checkpoints (DeepSeek-V3's own release: `quantization_config.quant_method: fp8`,
each quantized `X.weight` with a float32 `X.weight_scale_inv` holding one scale per
`weight_block_size` block) are dequantized as they are read, to bf16 as DeepSeek's own fp8-to-bf16
cast does; other quantization methods are refused.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint; the message names the file and tensor."""


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"


def fp8_block_size(folder: Path) -> Optional[Tuple[int, int]]:
    """The (rows, columns) block of the folder's fp8 weight scales; None for an unquantized checkpoint."""
    file = folder / "config.json"
    if not file.is_file():
        return None
    try:
        quant = json.loads(file.read_text()).get("quantization_config")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not quant:
        return None
    where = f"{file}: quantization_config"
    if quant.get("quant_method") != "fp8":
        raise CheckpointError(f"{where}.quant_method={quant.get('quant_method')!r} is not supported (r1mega reads "
                              "unquantized weights and dequantizes block-wise fp8, DeepSeek-V3's)")
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}.weight_block_size={block!r}: r1mega dequantizes fp8 with one scale per "
                              "[rows, columns] block only")
    return block[0], block[1]


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: Tuple[int, int], dim: int = 0,
                   start: int = 0) -> torch.Tensor:
    """bf16 of `weight`, the rows [start, start + len) along `dim` of a block-quantized fp8 matrix whose
    block (i, j) is scaled by scale_inv[i, j]."""
    scale = scale_inv.float()
    for d in (0, 1):
        offset = start if d == dim else 0
        blocks = (torch.arange(weight.shape[d]) + offset) // block[d]
        scale = scale.index_select(d, blocks)
    return (weight.float() * scale).to(torch.bfloat16)


class HFReader:
    """Lazy access to the tensors of an HF checkpoint folder (single file or sharded index).

    `index` names another index file in the folder (r1mega's carried layers: hf_carried)."""

    def __init__(self, path: str | Path, index: str = INDEX):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: HF checkpoint folder does not exist")
        self.index_name = index
        self.files = self._index()
        self._stack = ExitStack()
        self._open: Dict[str, object] = {}
        self.fp8_block = fp8_block_size(self.path) if index == INDEX else None

    def _index(self) -> Dict[str, str]:
        index = self.path / self.index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            return dict(weight_map)
        if self.index_name != INDEX:
            raise CheckpointError(f"{index}: missing")
        single = self.path / SINGLE
        if not single.is_file():
            raise CheckpointError(f"{self.path}: neither {INDEX} nor {SINGLE} found")
        with self._safe_open(single) as f:
            return {name: SINGLE for name in f.keys()}

    def _safe_open(self, file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises several types for a bad header or file
            raise CheckpointError(f"{file}: cannot open as safetensors ({e})") from None

    def _handle(self, name: str):
        if name not in self.files:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        file = self.files[name]
        if file not in self._open:
            path = self.path / file
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {self.index_name} for {name!r} does not exist")
            self._open[file] = self._stack.enter_context(self._safe_open(path))
        return self._open[file]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> List[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, dim: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """Tensor `name`, or only rows [start, stop) along `dim` (read from disk, not sliced after);
        fp8 weights dequantized."""
        tensor = self._read(name, dim, start, stop)
        if tensor.dtype not in FP8_DTYPES:
            return tensor
        if self.fp8_block is None:
            raise CheckpointError(f"{self.path / self.files[name]}: tensor {name!r} is {tensor.dtype} but "
                                  f"{self.path / 'config.json'} has no fp8 quantization_config")
        if name + SCALE_SUFFIX not in self.files:
            raise CheckpointError(f"{self.path}: fp8 tensor {name!r} has no {name + SCALE_SUFFIX!r} to dequantize it")
        return dequantize_fp8(tensor, self._read(name + SCALE_SUFFIX), self.fp8_block, dim, start or 0)

    def _read(self, name: str, dim: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        handle = self._handle(name)
        try:
            if start is None:
                return handle.get_tensor(name)
            view = handle.get_slice(name)
            index = [slice(None)] * len(view.get_shape())
            index[dim] = slice(start, stop)
            return view[tuple(index)]
        except Exception as e:  # as above: a truncated or corrupt file
            raise CheckpointError(f"{self.path / self.files[name]}: cannot read tensor {name!r} ({e})") from None

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TensorReader:
    """HFReader's interface over HF-named tensors in memory (weights received from a trainer), so
    one converter loads both."""

    def __init__(self, tensors: Dict[str, torch.Tensor], label: str = "received weights"):
        self.tensors, self.path = tensors, Path(label)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        return self.tensors[name]

    def shape(self, name: str) -> List[int]:
        return list(self._get(name).shape)

    def read(self, name: str, dim: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        t = self._get(name)
        return t if start is None else t.narrow(dim, start, stop - start)

    def close(self) -> None:
        """Nothing is open."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardWriter:
    """Writes (name, tensor) pairs into safetensors files of about `max_bytes` each."""

    def __init__(self, folder: Path, prefix: str, max_bytes: int = 2 << 30):
        self.folder, self.prefix, self.max_bytes = folder, prefix, max_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: Dict[str, str] = {}
        self.count = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        file = f"{self.prefix}-{self.count:05d}.safetensors"
        save_file(self.pending, str(self.folder / file), metadata={"format": "pt"})
        self.weight_map.update({name: file for name in self.pending})
        self.pending, self.pending_bytes = {}, 0
        self.count += 1


def write_index(folder: Path, weight_map: Dict[str, str], total_bytes: int, name: str = INDEX) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / name).write_text(json.dumps(index, indent=2))
