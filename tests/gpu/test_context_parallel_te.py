"""Context parallelism through Transformer Engine's attention (megatron's ring exchange over the
two-chunk layout) on two GPUs: CP=2 gives the loss, every reported sum, the per-row log-probs and
the gradients of CP=1, within bf16's rounding (TE runs CP in bf16 or fp16 only). The same check runs
exactly, in float64, on the SDPA path on CPU: tests/distributed/test_context_parallel.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from layout_utils import rel  # noqa: E402
from r1mega.config.schema import ParallelConfig  # noqa: E402
from r1mega.platform.installed import transformer_engine  # noqa: E402
from r1mega.platform.launch import spawn  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2 or not transformer_engine(),
    reason="needs two GPUs and Transformer Engine")]


def test_te_context_parallel_equals_one_rank():
    from test_context_parallel import CASES, _run

    ref = spawn(1, _run, ParallelConfig(), *CASES[0], torch.bfloat16)[0]
    results = spawn(2, _run, ParallelConfig(cp=2), *CASES[0], torch.bfloat16)
    for r in results:
        assert r["loss"] == pytest.approx(ref["loss"], rel=2e-2)
        assert rel(r["stats"], ref["stats"]) < 2e-2
        for rows, want in zip(r["row_logp"], ref["row_logp"]):
            for a, b in zip(rows, want):
                assert torch.allclose(a, b, atol=5e-2, rtol=0)
        assert r["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) > 4
        for name, g in ref["grads"].items():
            assert rel(r["grads"][name], g) < 5e-2, name
