"""Context parallelism on gloo: RL packs split over CP=2 ranks (each row cut into megatron's two-chunk
layout, keys and values gathered for attention) give the logits, the loss, every reported sum and
every gradient of the same packs on one rank, on rows of odd and even lengths; also under TP=2 with
sequence parallelism."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from layout_utils import rel
from r1mega.config.schema import AlgorithmConfig, CorrectionConfig, ModelConfig, ParallelConfig
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(name="t", arch="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, head_dim=16, vocab_size=128, qk_layernorm=True, init_method_std=0.05)
# (prompt, response) tokens: forward lengths 13, 14, 14, 2, 12, 9 (odd, even, shorter than 2 x cp)
ROWS = [(9, 5), (4, 11), (12, 3), (2, 1), (7, 6), (3, 7)]
GROUPS = ([0, 1, 2], [3, 4, 5])


def step_batch():
    from r1mega.rollout.types import Rollouts
    from r1mega.trainer.rl.batch import StepBatch

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 128, (p,), generator=g).tolist() for p, _ in ROWS]
    responses = [torch.randint(1, 128, (r,), generator=g).tolist() for _, r in ROWS]
    logprobs = [(-torch.rand(len(r), generator=g)).tolist() for r in responses]
    rollouts = Rollouts(prompts, responses, logprobs, ["stop"] * len(ROWS), [0, 0, 0, 1, 1, 1])
    batch = StepBatch.from_rollouts(rollouts, torch.tensor([1.0, -0.5, 0.25, -1.0, 0.75, 0.5]))
    batch.old_logp = [lp - 0.1 * torch.rand(len(lp), generator=g) for lp in batch.rollout_logp]
    batch.ref_logp = [lp - 0.3 * torch.rand(len(lp), generator=g) for lp in batch.rollout_logp]
    return batch


def _run(parallel: ParallelConfig, loss_agg: str, ratio_level: str, dtype: torch.dtype = torch.float64):
    """Logits, loss, reported sums, gradients and per-row log-probs of GROUPS' packs, on CPU in float64
    (layouts, not rounding); tests/gpu runs it in bf16 on GPUs with Transformer Engine's attention."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_model_config

    from r1mega.models.builder import build_model
    from r1mega.models.context_parallel import local_positions
    from r1mega.ops.logprobs import target_logprobs
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.forward_backward import run_schedule
    from r1mega.trainer.rl.batch import pack, row_slices
    from r1mega.trainer.rl.loss import LossSettings, policy_loss

    initialize(parallel, seed=11)
    try:
        chunks = [c.to(dtype) for c in build_model(MODEL, parallel)]
        device = next(chunks[0].parameters()).device
        get_model_config(chunks[0]).variable_seq_lengths = True
        get_model_config(chunks[0]).pipeline_dtype = dtype
        batch = step_batch()
        cp, rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        multiple = parallel.tp if parallel.sequence_parallel else 1
        micro = [pack(batch, rows, multiple, cp, rank) for rows in GROUPS]
        out = {"local_lengths": [m.tokens.size(1) for m in micro], "logits": []}
        with torch.no_grad():  # every position's logits, gathered over TP (vocab) by the test
            for m in micro:
                logits = chunks[0](**m.to(device).model_inputs(), runtime_gather_output=True)[0].double().cpu()
                held = local_positions(m.cu_seqlens, rank, cp) if cp > 1 else torch.arange(m.tokens.size(1))
                bounds = m.cu_seqlens.tolist()
                out["logits"].append({"values": logits, "held": held, "starts": bounds,
                                      "lengths": [len(batch.tokens[i]) - 1 for i in m.rows]})
        algo = AlgorithmConfig(kl_beta=0.1, entropy_coeff=0.01, loss_agg=loss_agg,
                               # old / rollout in [0.905, 1]: some tokens rejected, whole-row weights
                               correction=CorrectionConfig(weight="sequence", weight_cap=2.0, reject="token",
                                                           reject_low=0.93),
                               ratio_level=ratio_level)
        settings = LossSettings(algo, 16, 0.9, float(batch.response_tokens(range(len(batch)))), float(len(batch)))
        reports = run_schedule(chunks, micro, partial(policy_loss, s=settings, scale=2.0), forward_only=False)
        # (Transformer Engine's fused weight-gradient accumulation writes main_grad where there is one)
        grads = {n: (p.grad if p.grad is not None else p.main_grad).clone() for n, p in chunks[0].named_parameters()
                 if p.grad is not None or getattr(p, "main_grad", None) is not None}
        for n, g in grads.items():
            if getattr(dict(chunks[0].named_parameters())[n], "sequence_parallel", False):
                torch.distributed.all_reduce(g, group=ps.get_tensor_model_parallel_group())
            # megatron's schedule multiplies each rank's loss by cp, and the data-parallel gradient
            # reduction (over DP x CP) averages: the rank sum over cp is the gradient
            torch.distributed.all_reduce(g, group=ps.get_context_parallel_group())
            g /= cp
        grads = {n: g.double().cpu() for n, g in grads.items()}
        out["loss"] = float(sum(r["sums"][0] for r in reports))
        out["stats"] = sum(r["sums"] for r in reports).double()
        out["grads"] = grads
        # a log-prob pass's per-row values (what fills old_logp and ref_logp), whole on every rank

        def collect(m, logits):
            logp, _ = target_logprobs(logits, m.targets, 1.0, with_entropy=False)
            return logits.new_zeros(()), {"logp": m.per_row(logp).detach()}

        with torch.no_grad():
            passes = run_schedule(chunks, micro, collect, forward_only=True)
        out["row_logp"] = [row_slices(m, p["logp"]) for m, p in zip(micro, passes)]
        return out
    finally:
        destroy()


def _row_logits(results) -> list:
    """Per row, the logits of its real positions [n, v], from every context-parallel rank's part."""
    rows = []
    for k in range(len(GROUPS)):
        parts = [r["logits"][k] for r in results]
        total = parts[0]["starts"][-1]
        whole = torch.zeros(total, parts[0]["values"].size(-1), dtype=torch.float64)
        for p in parts:
            whole[p["held"]] = p["values"]
        starts, lengths = parts[0]["starts"], parts[0]["lengths"]
        rows += [whole[s:s + n] for s, n in zip(starts, lengths)]
    return rows


CASES = [("token-mean", "token"), ("seq-mean-token-mean", "token"), ("seq-mean-token-sum-norm", "sequence")]


@pytest.fixture(scope="module")
def single():
    return {case: spawn(1, _run, ParallelConfig(), *case) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_context_parallel_equals_one_rank(single, case):
    results = spawn(2, _run, ParallelConfig(cp=2), *case)
    assert all(n % 2 == 0 for n in results[0]["local_lengths"])
    _check(single[case], results, tp=1, check_logits=case == CASES[0])


def test_context_parallel_with_tensor_and_sequence_parallelism():
    # the oracle keeps TP=2 (its weights and gradients are TP shards) and drops CP
    ref = spawn(2, _run, ParallelConfig(tp=2, sequence_parallel=True), *CASES[0])
    results = spawn(4, _run, ParallelConfig(tp=2, cp=2, sequence_parallel=True), *CASES[0])
    assert all(n % 2 == 0 for r in results for n in r["local_lengths"])  # each CP part splits over TP
    _check(ref, results, tp=2, check_logits=True)


def _check(ref: list, results: list, tp: int, check_logits: bool) -> None:
    """Global ranks run TP fastest, then CP: rank i is TP rank i % tp."""
    from r1mega.trainer.rl.loss import STAT_SUMS

    rejected = float(ref[0]["stats"][STAT_SUMS.index("off_policy/rejected_share")])
    assert 0 < rejected < float(ref[0]["stats"][-1])  # the correction bites, not everywhere
    if check_logits:
        want, got = _row_logits(ref[:1]), _row_logits(results[::tp])  # the CP ranks of TP rank 0
        assert len(got) == len(want) == len(ROWS)
        for j, (a, b) in enumerate(zip(got, want)):
            assert a.shape == b.shape and rel(a, b) < 1e-9, f"row {j}"
    for i, r in enumerate(results):
        oracle = ref[i % tp]
        assert r["loss"] == pytest.approx(oracle["loss"], rel=1e-9)
        assert torch.allclose(r["stats"], oracle["stats"], rtol=1e-9, atol=1e-12)
        for rows, want_rows in zip(r["row_logp"], oracle["row_logp"]):
            for a, b in zip(rows, want_rows):
                assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
        assert r["grads"].keys() == oracle["grads"].keys() and len(oracle["grads"]) > 4
        for name, g in oracle["grads"].items():
            assert rel(r["grads"][name], g) < 1e-9, name
