"""A second parallel layout in the same job, for a model that is not the policy (the on-policy
distillation teacher: larger than the student, with its own TP/PP/EP).

megatron-core keeps its process groups in `parallel_state`'s module state, and every collective of a
forward reads them there: the pipeline schedule, the vocab-parallel log-probs, MoE dispatch, the
data-parallel reductions of r1mega's own helpers. A layout made here holds a second set of those
groups (made by `initialize_model_parallel`, collectively, on every rank of the job); `active()`
switches the module state to them for the length of a block, so the model of that layout is built,
loaded and run exactly as it would be in a job started with its layout, and the policy's groups
come back afterwards.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Dict, Iterator

from megatron.core import parallel_state as ps

from r1mega.config.schema import ParallelConfig
from r1mega.platform.distributed import model_parallel_groups

_STATE = re.compile(r"_[A-Z][A-Z0-9_]*")  # parallel_state's module globals: groups, ranks, sizes


def _snapshot() -> Dict[str, object]:
    return {k: v for k, v in vars(ps).items() if _STATE.fullmatch(k)}


def _fresh(state: Dict[str, object]) -> Dict[str, object]:
    """The state before any initialize_model_parallel (None, or an empty container). Not
    destroy_model_parallel: it also destroys the gloo data-parallel groups, which the policy's
    optimizer keeps using."""
    return {k: type(v)() if isinstance(v, (dict, list, set)) else None for k, v in state.items()}


class ParallelLayout:
    """Process groups of another layout over the same ranks; built collectively on every rank."""

    def __init__(self, parallel: ParallelConfig):
        self.parallel = parallel
        home = _snapshot()
        vars(ps).update(_fresh(home))
        try:
            model_parallel_groups(parallel, gloo=False)  # no optimizer state is kept under this layout
            self._state = _snapshot()
        finally:
            vars(ps).update(home)

    @contextmanager
    def active(self) -> Iterator[None]:
        """parallel_state is this layout's inside the block (and what it was before, afterwards)."""
        home = _snapshot()
        vars(ps).update(self._state)
        try:
            yield
        finally:
            self._state = _snapshot()  # anything set lazily under the layout stays with it
            vars(ps).update(home)
