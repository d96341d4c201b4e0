"""Turns on the GPUs between the trainer and a rollout engine that keeps its own weights (SGLang).

`rollout_turn` hands the GPUs and the current weights to the engine, `training_turn` takes them
back. The trainer's side is TrainState: gradients are freed (megatron's DDP keeps the buffer
views and reallocates them zeroed), and optimizer states (and optionally parameters) move to
host memory and back. Each tensor returns to the device it came from, so the same code runs,
as plain copies, on CPU ranks. The native engine decodes with the policy's own parameters and
takes no turns.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from r1mega.checkpoint.hf_gather import make_plan, world_hf_tensors
from r1mega.trainer.rl.context import RLContext


def rollout_turn(ctx: RLContext) -> Dict[str, float]:
    """Hand the GPUs and the updated weights to the engine: the trainer frees grads and offloads
    optimizer states, the engine takes its weights back, the weights cross in buckets, then the
    engine takes its KV cache and CUDA graphs back. Returns the sync's metrics (none without one)."""
    if ctx.engine_shares_weights:
        return {}
    if ctx.train_state is not None:
        ctx.train_state.offload_training()
    ctx.engine.resume_memory(["weights"])
    # the engine needs them after an optimizer step, and after a release that threw its copy away
    # (SGLang without --enable-weights-cpu-backup: also after an evaluation)
    stale = ctx.synced_version != ctx.weights_version or ctx.engine.weights_lost
    if stale:
        if ctx.hf_plan is None:
            # the server decodes without multi-token prediction: its layers stay here
            ctx.hf_plan = make_plan(ctx.chunks, ctx.cfg.model, decoder_only=True)
        ctx.engine.sync_weights(world_hf_tensors(ctx.chunks, ctx.cfg.model, ctx.hf_plan))
        ctx.synced_version = ctx.weights_version
    if ctx.train_state is not None:
        ctx.train_state.offload_parameters()
    ctx.engine.resume_memory(["kv_cache", "cuda_graph"])
    return dict(ctx.engine.last_sync) if stale else {}


def training_turn(ctx: RLContext) -> None:
    """Take the GPUs back from a colocated engine: it releases everything, the trainer reloads."""
    if ctx.train_state is None:
        return
    ctx.engine.release_memory()
    ctx.train_state.reload()


class TrainState:
    """Offload and reload of one policy's grads, optimizer states and (optionally) parameters."""

    def __init__(self, ddp_chunks: List[torch.nn.Module], optimizer, offload_optimizer: bool, offload_params: bool):
        self.ddp_chunks = ddp_chunks
        self.optimizer = optimizer
        self.offload_optimizer = offload_optimizer
        self.offload_params = offload_params
        self._host: List[torch.Tensor] = []  # host buffers (pinned under CUDA), reused turn after turn
        self._used = 0
        self._moved_states: List[Tuple[dict, str, torch.device]] = []
        self._moved_main: List[Tuple[torch.Tensor, torch.device]] = []  # fp32 main copies of bf16/fp16 params
        self._moved_params: List[Tuple[torch.Tensor, torch.Tensor, int]] = []  # (buffer, host copy, storage size)
        self.offloaded: List[str] = []  # what is off the device now, in the order it went

    def offload_training(self) -> None:
        """Before the engine resumes: free grads and move optimizer states to the host."""
        for chunk in self.ddp_chunks:
            chunk.offload_grad_buffers(synchronize=torch.cuda.is_available(), empty_cache=False)
        self.offloaded.append("grads")
        if self.offload_optimizer:
            # an fp32 model's optimizer steps the model's own parameters (or views of its buffers):
            # those stay; bf16/fp16 models' fp32 main copies have storage of their own and go
            model = {p.untyped_storage().data_ptr() for c in self.ddp_chunks for p in c.parameters()}
            for opt in self._inner_optimizers():
                for state in opt.state.values():
                    for key, value in state.items():
                        if torch.is_tensor(value) and value.dim() > 0:
                            self._moved_states.append((state, key, value.device))
                            state[key] = self._to_host(value)
                for group in opt.param_groups:
                    for p in group["params"]:
                        if p.untyped_storage().data_ptr() not in model:
                            self._moved_main.append((p, p.device))
                            p.data = self._to_host(p.data)
            self.offloaded.append("optimizer")
        _empty_cache()

    def offload_parameters(self) -> None:
        """After the weight sync (the engine holds its own copy): parameters to the host. Freeing a
        storage keeps the tensors that view it (parameters, optimizer views), to be refilled."""
        if not self.offload_params:
            return
        for data in self._parameter_storages():
            if data.untyped_storage().size() > 0:
                self._moved_params.append((data, self._to_host(data), data.untyped_storage().size()))
                data.untyped_storage().resize_(0)  # the whole storage: `data` spans all of it
        self.offloaded.append("params")
        _empty_cache()

    def reload(self) -> None:
        """Before training: parameters, optimizer states and zeroed grads back on their devices."""
        for data, host, size in self._moved_params:
            data.untyped_storage().resize_(size)
            data.copy_(host, non_blocking=True)
        for state, key, device in self._moved_states:
            state[key] = state[key].to(device, copy=True, non_blocking=True)
        for p, device in self._moved_main:
            p.data = p.data.to(device, copy=True, non_blocking=True)
        self._moved_params.clear()
        self._moved_states.clear()
        self._moved_main.clear()
        if "grads" in self.offloaded:
            for chunk in self.ddp_chunks:
                chunk.restore_grad_buffers(synchronize=torch.cuda.is_available())
        self.offloaded.clear()
        self._used = 0

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of `t` in the next pooled buffer (tensors come in the same order every turn)."""
        i = self._used
        self._used += 1
        if i == len(self._host) or self._host[i].shape != t.shape or self._host[i].dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            self._host[i:i + 1] = [buf]
        return self._host[i].copy_(t.detach(), non_blocking=True)

    def _parameter_storages(self):
        """Tensors spanning the storages that hold the parameters: with the distributed optimizer,
        megatron's contiguous buffers (the parameters are views of them); without it, each
        parameter's own storage (whole, should another parameter view part of it)."""
        seen = set()
        for chunk in self.ddp_chunks:
            for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                held = [buffer.param_data] if buffer.param_data is not None else [p.data for p in
                                                                                  buffer.param_index_map]
                for data in held:
                    storage = data.untyped_storage()
                    if storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        yield data.new_empty(0).set_(storage, 0, (storage.nbytes() // data.element_size(),))

    def _inner_optimizers(self):
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            if inner is not None:
                yield inner


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
