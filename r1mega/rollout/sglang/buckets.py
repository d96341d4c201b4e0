"""Weight-sync buckets: runs of named tensors up to a byte budget, packed into one uint8 buffer.

The packed layout is SGLang's flattened bucket (weight_sync/tensor_bucket.py): tensors back to
back as bytes, each described by (name, shape, dtype, start, end, byte count). Tensors are
ordered by element size, widest first, so every start is a multiple of its dtype's size, which
SGLang's receiving side of an NCCL broadcast requires.

Multi-latent attention with a query latent: SGLang 0.5.23's DeepSeek loader
(deepseek_common/deepseek_weight_loader.py) fuses a layer's `q_a_proj` and `kv_a_proj_with_mqa` into
one parameter only when a single load call brings both; a half that arrives alone is dropped without
a word. So the two always share a bucket.
"""

from __future__ import annotations

import base64
import io
from multiprocessing.reduction import ForkingPickler
from typing import Iterable, Iterator, List, Tuple

import torch
import torch.multiprocessing  # noqa: F401  (registers torch's tensor and storage reductions)

Named = Tuple[str, torch.Tensor]


FUSED_PAIR = ("self_attn.q_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight")


def _units(named: Iterable[Named]) -> Iterator[List[Named]]:
    """The tensors in order, a layer's q_a_proj held back until its kv_a_proj_with_mqa comes (whichever is
    first) so that the two form one unit."""
    held: dict = {}
    for name, t in named:
        half = next((i for i, suffix in enumerate(FUSED_PAIR) if name.endswith(suffix)), None)
        if half is None:
            yield [(name, t)]
            continue
        layer = name[:-len(FUSED_PAIR[half])]
        if layer in held:
            yield [held.pop(layer), (name, t)]
        else:
            held[layer] = (name, t)
    for rest in held.values():  # no partner (V2-Lite's q_proj layout has no q_a_proj)
        yield [rest]


def buckets(named: Iterable[Named], max_bytes: int) -> Iterator[List[Named]]:
    """Consecutive runs of `named` of at most `max_bytes` each; a larger tensor (or fused pair) travels
    alone."""
    bucket: List[Named] = []
    size = 0
    for unit in _units(named):
        nbytes = sum(t.numel() * t.element_size() for _, t in unit)
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket += unit
        size += nbytes
    if bucket:
        yield bucket


def _meta_class():
    """sglang's FlattenedTensorMetadata: the server's unpickler admits no other class."""
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
    except ImportError as err:
        raise RuntimeError(f"packing weights for SGLang needs sglang installed: {err}") from None
    return FlattenedTensorMetadata


def pack(bucket: List[Named]) -> Tuple[torch.Tensor, list]:
    """(uint8 buffer, metadata) of the bucket, widest dtypes first."""
    if not bucket:
        raise ValueError("cannot pack an empty bucket")
    ordered = sorted(bucket, key=lambda nt: -nt[1].element_size())  # stable: same-size order kept
    meta_cls = _meta_class()
    parts, meta, offset = [], [], 0
    for name, t in ordered:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        parts.append(raw)
        meta.append(meta_cls(name=name, shape=torch.Size(t.shape), dtype=t.dtype, start_idx=offset,
                             end_idx=offset + raw.numel(), numel=raw.numel()))
        offset += raw.numel()
    return torch.cat(parts), meta


def unpack(buffer: torch.Tensor, meta: list) -> List[Named]:
    """The tensors of a packed bucket (views into `buffer`)."""
    return [(m.name, buffer[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in meta]


def serialize(obj) -> str:
    """What sglang's MultiprocessingSerializer.serialize(obj, output_str=True) sends: a base64
    ForkingPickler dump, CUDA tensors as IPC handles."""
    _patch_device_reductions()
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode()


def _patch_device_reductions() -> None:
    # sglang names a CUDA tensor's device by UUID, so a server process that numbers GPUs
    # differently (another CUDA_VISIBLE_DEVICES) opens the handle on the right one.
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError:
        return
    monkey_patch_torch_reductions()
