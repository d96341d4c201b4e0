"""Make megatron-core 0.16 run on CPU with gloo.

megatron-core assumes CUDA in many places. Everything r1mega does to run it without a GPU
lives here, is applied once by `install()` and only when CUDA is absent; each measure names
the upstream code it covers. On a CUDA machine this module changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE: "_CudaToCpuMode | None" = None


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):  # torch.cuda.current_device() returns an int index
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites device="cuda"/int arguments to CPU, and Tensor.cuda() to a no-op.

    Covers megatron-core's tensor factories with `device=torch.cuda.current_device()`
    (e.g. rotary_pos_embedding.get_emb, moe token dispatchers, optimizer buffers,
    distributed.param_and_grad_buffer) and `.cuda()` calls on CPU tensors.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # every torch call on CPU passes here: the common case (no device argument, not one of
        # the methods below) returns after two lookups
        if kwargs and "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func not in _REWRITTEN:
            return func(*args, **(kwargs or {}))
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.backward:
            # handle_torch_function pops this mode while it runs a handler, so calling func
            # here would run the whole backward pass (megatron's autograd Functions, e.g.
            # tensor_parallel.mappings._AllToAll / _gather_along_first_dim backward, which
            # allocate on torch.cuda.current_device()) without it. Re-push it, and run
            # Tensor.backward's body: torch.autograd.backward ignores modes (_patch_autograd).
            with self:
                return _tensor_backward(*args, **kwargs)
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.pin_memory:
            return args[0]
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and not out.startswith("torch.cuda."):
            # megatron's optimizers sort and assert parameters by their CUDA type name
            # (optimizer/distrib_optimizer.py, optimizer/optimizer.py, optimizer/clip_grads.py):
            # a CPU parameter reads as its CUDA counterpart ('torch.cuda.FloatTensor').
            return out.replace("torch.", "torch.cuda.", 1)
        return out


_REWRITTEN = frozenset({torch.Tensor.cuda, torch.Tensor.backward, torch.Tensor.to, torch.Tensor.pin_memory,
                        torch.Tensor.type})


def _tensor_backward(tensor, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    """torch.Tensor.backward without its __torch_function__ check (torch/_tensor.py)."""
    torch.autograd.backward(tensor, gradient, retain_graph, create_graph, inputs=inputs)


def _patch_autograd() -> None:
    """Let torch.autograd.backward/grad run under the device mode instead of handing themselves to it.

    In torch 2.13 they call handle_torch_function whenever any TorchFunctionMode is active,
    and handle_torch_function pops the mode for the call: megatron's backward_step
    (pipeline_parallel.schedules: torch.autograd.backward) would then run every backward
    node without the cuda -> cpu mapping. Their override check now looks at tensor
    subclasses only (as without a mode); modes stay on the stack through the backward pass.
    """
    import torch.autograd as autograd
    from torch.overrides import _get_overloaded_args

    # (plain torch.Tensor carries the default __torch_function__: not an override, as in C++.)
    def has_subclass_override(args) -> bool:
        return any(type(a) is not torch.Tensor for a in _get_overloaded_args(args))

    autograd.has_torch_function = has_subclass_override


class _InertStream:
    """Stand-in for torch.cuda.Stream/ExternalStream: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def record_event(self, event=None):
        return event or _InertEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _InertEvent:
    """Stand-in for torch.cuda.Event (megatron timers, overlapped grad reduce, offloading)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _patch_torch_cuda() -> None:
    """Give torch.cuda inert stream/event/sync functions and a CPU-backed RNG.

    megatron-core calls torch.cuda.current_device() (175 sites), Stream/Event/synchronize
    (pipeline_parallel.schedules, distributed.param_and_grad_buffer, timers) and the CUDA
    RNG (tensor_parallel.random) unconditionally.
    """
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _InertStream
    cuda.ExternalStream = _InertStream
    cuda.Event = _InertEvent
    cuda.current_stream = lambda *a, **k: _InertStream()
    cuda.default_stream = lambda *a, **k: _InertStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    # CudaRNGStatesTracker.add seeds, reads and restores "the CUDA RNG"; the CPU generator
    # stands in so each tracked stream (data-, tensor-, expert-parallel) stays distinct.
    # (torch.manual_seed itself calls cuda.manual_seed_all, which must stay a no-op.)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed) and None
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.nvtx = types.SimpleNamespace(
        range_push=lambda *a, **k: None,
        range_pop=lambda *a, **k: None,
        range=lambda *a, **k: contextlib.nullcontext(),
        mark=lambda *a, **k: None,
    )


def _patch_megatron() -> None:
    """Point megatron-core's CUDA-only helpers at CPU equivalents."""
    from megatron.core.tensor_parallel import random as mrandom

    # tensor_parallel.random._get/_set_cuda_rng_state read torch.cuda.default_generators;
    # the CudaRNGStatesTracker swaps states through them, so back them with the CPU RNG.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # transformer.moe.moe_utils imports te_general_gemm from megatron.core.extensions
    # inside a try block whose except branch never binds the name (NameError without TE).
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None

    # transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize
    # turns its all-to-all split sizes into numpy arrays through moe_utils.maybe_move_tensor_to_cpu,
    # which converts only `tensor.is_cuda` tensors. On CPU the splits stayed torch tensors, and
    # torch.distributed.all_to_all_single (tensor_parallel.mappings._AllToAll) rejects a tensor
    # as split sizes (TypeError: it takes a sequence of ints). Give CPU tensors the numpy copy
    # the CUDA path makes; gloo handles uneven splits given as a sequence.
    from megatron.core.transformer.moe import token_dispatcher

    upstream = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(upstream)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.detach().numpy().copy()
        return upstream(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    # tensor_parallel.mappings._gather_along_first_dim with output_split_sizes (the alltoall
    # dispatcher's gather over the TP group when TP > 1 and EP > 1, and the backward of its
    # uneven reduce-scatter) calls torch.distributed.all_gather on unequal tensors, which
    # ProcessGroupGloo rejects ("invalid tensor size"). Send the whole input to every rank with
    # all_to_all_single, which gloo runs with uneven splits. (Uneven reduce_scatter works.)
    from megatron.core.tensor_parallel import mappings

    upstream_gather = mappings._gather_along_first_dim

    @functools.wraps(upstream_gather)
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return upstream_gather(input_, group, output_split_sizes, use_global_buffer)
        world, rows = group.size(), input_.size(0)
        output = input_.new_empty([sum(output_split_sizes), *input_.shape[1:]])
        copies = input_.contiguous().repeat(world, *[1] * (input_.dim() - 1))
        torch.distributed.all_to_all_single(
            output, copies, output_split_sizes=[int(n) for n in output_split_sizes],
            input_split_sizes=[rows] * world, group=group)
        return output

    mappings._gather_along_first_dim = _gather_along_first_dim

    # models.common.embeddings.yarn_rotary_pos_embedding.YarnRotaryEmbedding.__init__ makes its tables
    # inside `with torch.device(torch.cuda.current_device())` unless use_cpu_initialization, which
    # transformer.multi_latent_attention.MLASelfAttention never passes (YaRN under MLA): build them on
    # the CPU, as use_cpu_initialization would.
    from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding as yarn

    upstream_yarn = yarn.YarnRotaryEmbedding.__init__

    @functools.wraps(upstream_yarn)
    def yarn_init(self, *args, **kwargs):
        upstream_yarn(self, *args, **{**kwargs, "use_cpu_initialization": True})

    yarn.YarnRotaryEmbedding.__init__ = yarn_init


def install() -> None:
    """Apply every CPU measure once; no-op when CUDA is available."""
    global _INSTALLED, _MODE
    if _INSTALLED or torch.cuda.is_available():
        return
    _patch_torch_cuda()
    _patch_autograd()
    _patch_megatron()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _INSTALLED = True


def installed() -> bool:
    return _INSTALLED
