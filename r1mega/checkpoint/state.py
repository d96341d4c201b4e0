"""Training state (model, optimizer, scheduler, RNG, data position, step) as megatron distributed checkpoints.

Layout on disk:
    <root>/step_<N>/        one checkpoint: dist_checkpointing shards + common.pt + r1mega_state.json
    <root>/step_<N>.tmp/    a save in progress (never loaded)
    <root>/latest           the name of the newest complete checkpoint, replaced atomically

Model weights and optimizer states are stored in model space (one global tensor per
parameter and state, independent of TP/PP/EP/DP), so a checkpoint saved under one parallel
layout loads under another. RNG states are per rank and restored only under the same layout.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer import distrib_optimizer as dopt
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch.distributed.checkpoint.api import CheckpointException

from r1mega.checkpoint.hf_io import CheckpointError
from r1mega.checkpoint.mcore import model_keys, model_sharded_state_dict
from r1mega.checkpoint.staging import error_line, staging_dir, unwrap
from r1mega.platform.atomic import publish, write_text_atomic
from r1mega.platform.distributed import barrier, rank

MARKER = "r1mega_state.json"  # written last, inside the .tmp folder: its presence means complete
LATEST = "latest"
FORMAT = 1
REFERENCE = "reference"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class TrainingCheckpointError(CheckpointError):
    """A training checkpoint that is missing, incomplete or unreadable; the message names the path."""


def sharded_metadata() -> Dict[str, Any]:
    """Options for megatron's sharded_state_dict methods (as megatron's own training passes them)."""
    return {
        # DistributedOptimizer states gathered into per-parameter tensors: reshardable over TP/PP/EP/DP.
        # mem_efficient gathers over the gloo DP group into host memory of DP rank 0 only.
        "distrib_optim_sharding_type": "fully_reshardable",
        "distrib_optim_fully_reshardable_mem_efficient": True,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }


def _layout() -> Dict[str, int]:
    ps = parallel_state
    return {
        "world": dist.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _rng_state() -> Dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(data: Any) -> ShardedObject:
    # One object per global rank; only meaningful when the world is laid out the same way.
    return ShardedObject("rng_state", data, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _state_dict(chunks, optimizer, scheduler, is_loading: bool, with_rng: bool, reference=None) -> Dict[str, Any]:
    metadata = sharded_metadata()
    model_state = model_sharded_state_dict(chunks, metadata)
    state: Dict[str, Any] = dict(model_state)
    if reference is not None:  # the RL reference policy, under its own tensor names
        state[REFERENCE] = {k: unwrap(c).sharded_state_dict(prefix=f"{REFERENCE}.", metadata=metadata)
                            for k, c in zip(model_keys(len(reference)), reference)}
    state["optimizer"] = _not_gathered_here(
        optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata))
    state["scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_object(None if is_loading else _rng_state())
    return state


def _not_gathered_here(state: Any) -> Any:
    """The optimizer's sharded state with the param_state of DP ranks > 0 marked as theirs alone.

    The memory-efficient fully reshardable format gathers every optimizer state on DP rank 0 and
    gives the other ranks param_state=None (distrib_optimizer.sharded_param_state_fully_reshardable).
    A plain None would count as common state that only they hold (megatron warns that their common
    state dict differs from rank 0's, which alone is written); it is nothing to save, so it is
    wrapped as a local non-persistent object, as megatron's dp_zero format wraps the same None."""
    if not isinstance(state, dict):
        return state
    if "param_state" in state:  # one optimizer's state dict: nothing below it needs a look
        return {**state, "param_state": state["param_state"] if state["param_state"] is not None
                else LocalNonpersistentObject(None)}
    return {k: _not_gathered_here(v) for k, v in state.items()}  # chained optimizers


def _prime_optimizer_state(optimizer: MegatronOptimizer) -> None:
    """Give a never-stepped torch Adam zero moments and step 0 (what its first step would create).

    Without Apex/TE, megatron's DistributedOptimizer.state_dict() reads every parameter's
    Adam 'step' (optimizer/distrib_optimizer.py, `assert len(steps) == 1`), which a fresh
    torch optimizer does not have yet; a load then overwrites these placeholders.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) or len(inner.state) > 0:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


def _unshare_steps(optimizer: MegatronOptimizer) -> None:
    """Give each parameter its own Adam step counter after a load.

    megatron's DistributedOptimizer.load_state_dict (torch-optimizer path) hands one step
    tensor to every parameter, and torch's foreach Adam then increments it once per parameter.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _patch_torch_adam_step_on_load() -> None:
    """Let megatron's DistributedOptimizer load reshardable states into a torch Adam.

    Without Apex/TE its inner optimizer is torch's, whose per-parameter state has a 'step'
    that the reshardable loaders leave out of the tensors they pass on (they restore it from
    the param groups), while _set_main_param_and_optimizer_states copies every key of the
    destination state: KeyError 'step' (optimizer/distrib_optimizer.py, megatron-core 0.16.1).
    Hide 'step' from that copy; megatron sets it itself in load_state_dict.
    """
    cls = dopt.DistributedOptimizer
    if dopt.HAVE_APEX_OR_TE or getattr(cls, "_r1mega_step_patch", False):
        return
    original = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state.get(self.optimizer.param_groups[group_index]["params"][group_order], {})
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    cls._set_main_param_and_optimizer_states = set_states
    cls._r1mega_step_patch = True


def save_checkpoint(
    root: str | Path,
    step: int,
    chunks: List[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    data_state: Dict[str, Any],
    reference: Optional[List[torch.nn.Module]] = None,
) -> Path:
    """Every rank calls this; <root>/step_<step> appears only once all ranks have written.

    `reference`: the RL reference model's chunks, saved beside the policy (it may have been reset).
    """
    root = Path(root)
    final = root / f"step_{step}"
    tmp = staging_dir(final)
    _prime_optimizer_state(optimizer)  # e.g. every fp16 step so far skipped on overflow
    state = _state_dict(chunks, optimizer, scheduler, is_loading=False, with_rng=True, reference=reference)
    state.update(step=step, data=data_state)
    dist_checkpointing.save(state, str(tmp))
    barrier()
    if rank() == 0:
        info = {"format": FORMAT, "step": step, "layout": _layout()}
        (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
        publish(tmp, final)
        write_text_atomic(root / LATEST, final.name + "\n")
    barrier()
    return final


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "metadata.json").is_file()


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """Newest complete step_<N> under root (the `latest` pointer first, else a scan), or None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.name and _is_complete(named):
            return named
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and _is_complete(p)]
    return max(steps)[1] if steps else None


def read_marker(folder: str | Path) -> Dict[str, Any]:
    """The checkpoint's r1mega_state.json; TrainingCheckpointError unless `folder` is complete."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingCheckpointError(f"{folder}: checkpoint folder does not exist")
    marker = folder / MARKER
    if not marker.is_file():
        raise TrainingCheckpointError(f"{folder}: incomplete checkpoint ({MARKER} missing: the save did not "
                                      "finish)")
    try:
        info = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainingCheckpointError(f"{marker}: corrupt checkpoint marker ({e})") from None
    if not isinstance(info, dict) or not {"step", "layout"} <= info.keys():
        raise TrainingCheckpointError(f"{marker}: corrupt checkpoint marker (needs 'step' and 'layout')")
    if not (folder / "metadata.json").is_file():
        raise TrainingCheckpointError(f"{folder}: corrupt checkpoint (metadata.json missing)")
    return info


def load_checkpoint(
    folder: str | Path,
    chunks: List[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    reference: Optional[List[torch.nn.Module]] = None,
) -> Dict[str, Any]:
    """Restore model, optimizer, scheduler (and RNG under the same layout); return {'step', 'data'}.

    With `reference`, the RL reference model saved beside the policy is restored into it.
    """
    folder = Path(folder)
    info = read_marker(folder)
    same_layout = info["layout"] == _layout()
    _prime_optimizer_state(optimizer)
    _patch_torch_adam_step_on_load()
    template = _state_dict(chunks, optimizer, scheduler, is_loading=True, with_rng=same_layout, reference=reference)
    template.pop("scheduler")  # plain values come from the checkpoint's common state
    try:
        state = dist_checkpointing.load(template, str(folder))
        for key, chunk in zip(model_keys(len(chunks)), chunks):
            unwrap(chunk).load_state_dict(state[key], strict=True)
        for key, chunk in zip(model_keys(len(reference or [])), reference or []):
            prefix = f"{REFERENCE}."
            unwrap(chunk).load_state_dict({k[len(prefix):]: v for k, v in state[REFERENCE][key].items()}, strict=True)
        optimizer.load_state_dict(state["optimizer"])
        _unshare_steps(optimizer)
        scheduler.num_steps = 0  # load_state_dict advances by the saved count from wherever it is
        scheduler.load_state_dict(state["scheduler"])
    except (Exception, CheckpointException) as e:  # the latter derives from BaseException
        raise TrainingCheckpointError(f"{folder}: cannot load checkpoint ({error_line(e)})") from None
    if same_layout:
        _set_rng_state(state["rng_state"])
    return {"step": int(state["step"]), "data": state["data"]}

