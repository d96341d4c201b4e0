"""The trainer's side of colocated memory turns: free what training holds while the engine generates.

Gradients are freed (megatron's DDP keeps the buffer views and reallocates them zeroed), and
optimizer states (and optionally parameters) move to host memory and back. Each tensor returns
to the device it came from, so the same code runs, as plain copies, on CPU ranks.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch


def gpu_memory_gib() -> Dict[str, float]:
    """Allocated and reserved GPU memory of this rank (empty on CPU)."""
    if not torch.cuda.is_available():
        return {}
    gib = float(1 << 30)
    return {"allocated_gib": torch.cuda.memory_allocated() / gib, "reserved_gib": torch.cuda.memory_reserved() / gib}


class TrainState:
    """Offload and reload of one policy's grads, optimizer states and (optionally) parameters."""

    def __init__(self, ddp_chunks: List[torch.nn.Module], optimizer, offload_optimizer: bool, offload_params: bool):
        self.ddp_chunks = ddp_chunks
        self.optimizer = optimizer
        self.offload_optimizer = offload_optimizer
        self.offload_params = offload_params
        self._model_params = {id(p) for c in ddp_chunks for p in c.parameters()}
        self._moved_states: List[Tuple[dict, str, torch.device]] = []
        self._moved_main: List[Tuple[torch.Tensor, torch.device]] = []  # fp32 main copies of bf16/fp16 params
        self._moved_params: List[Tuple[torch.Tensor, torch.Tensor, int]] = []  # (buffer, host copy, storage size)
        self.offloaded: List[str] = []  # what is off the device now, in the order it went

    def offload_training(self) -> None:
        """Before the engine resumes: free grads and move optimizer states to the host."""
        cuda = torch.cuda.is_available()
        for chunk in self.ddp_chunks:
            chunk.offload_grad_buffers(synchronize=cuda, empty_cache=False)
        self.offloaded.append("grads")
        if self.offload_optimizer:
            for opt in self._inner_optimizers():
                for state in opt.state.values():
                    for key, value in state.items():
                        if torch.is_tensor(value) and value.dim() > 0:
                            self._moved_states.append((state, key, value.device))
                            state[key] = _to_host(value)
                for group in opt.param_groups:
                    for p in group["params"]:
                        # fp32 main copies of bf16/fp16 params; fp32 models' optimizers step the
                        # model's own parameters (or views of them), which stay
                        if id(p) not in self._model_params and p.data._base is None:
                            self._moved_main.append((p, p.device))
                            p.data = _to_host(p.data)
            self.offloaded.append("optimizer")
        _empty_cache()

    def offload_parameters(self) -> None:
        """After the weight sync (the engine holds its own copy): parameters to the host. The
        parameters are views of megatron's contiguous buffers; freeing a buffer's storage keeps them."""
        if not self.offload_params:
            return
        for buffer in self._param_buffers():
            data = buffer.param_data
            if data is not None and data.untyped_storage().size() > 0:
                self._moved_params.append((data, _to_host(data), data.untyped_storage().size()))
                data.untyped_storage().resize_(0)
        self.offloaded.append("params")
        _empty_cache()

    def reload(self) -> None:
        """Before training: parameters, optimizer states and zeroed grads back on their devices."""
        for data, host, size in self._moved_params:
            data.untyped_storage().resize_(size)
            data.copy_(host, non_blocking=True)
        self._moved_params.clear()
        for state, key, device in self._moved_states:
            state[key] = state[key].to(device, non_blocking=True)
        for p, device in self._moved_main:
            p.data = p.data.to(device, non_blocking=True)
        self._moved_states.clear()
        self._moved_main.clear()
        if "grads" in self.offloaded:
            for chunk in self.ddp_chunks:
                chunk.restore_grad_buffers(synchronize=torch.cuda.is_available())
        self.offloaded.clear()

    def _param_buffers(self):
        for chunk in self.ddp_chunks:
            yield from chunk.buffers + chunk.expert_parallel_buffers

    def _inner_optimizers(self):
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            if inner is not None:
                yield inner


def _to_host(t: torch.Tensor) -> torch.Tensor:
    host = t.detach().to("cpu", copy=True)
    return host.pin_memory() if t.is_cuda else host


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
