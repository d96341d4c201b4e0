"""SFT on megatron: a THD pack gives the loss and gradients of the same samples unpacked (one
rank), and of a single rank when packed under TP=2 with sequence parallelism and under PP=2."""

from __future__ import annotations

import pytest
import torch

from layout_utils import load_model, rel, save_model
from r1mega.config.schema import ModelConfig, MoEConfig, ParallelConfig
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(name="t", arch="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, head_dim=16, vocab_size=128, qk_layernorm=True, init_method_std=0.05)
MOE = ModelConfig(**{**MODEL.__dict__, "name": "moe", "moe": MoEConfig(num_experts=4, ffn_hidden_size=32,
                                                                        router_topk=2, token_dispatcher="alltoall")})


def conversations(n=6, seed=0):
    """Samples of varied lengths whose assistant part starts at varied points."""
    from r1mega.data.conversations import SFTSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(8, 30, (1,), generator=g))
        start = int(torch.randint(2, length - 2, (1,), generator=g))
        tokens = torch.randint(1, 128, (length,), generator=g).tolist()
        out.append(SFTSample(tokens, [False] * start + [True] * (length - start)))
    return out


def _loss_and_grads(parallel: ParallelConfig, packed: bool, folder: str, save: bool, model: ModelConfig = MODEL):
    from functools import partial

    from megatron.core.utils import get_model_config

    from r1mega.data.packing import pack, pad_rows
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.sft import _sums, _target_count, nll_loss
    from r1mega.trainer.forward_backward import run_schedule

    initialize(parallel, seed=7)
    try:
        chunks = build_model(model, parallel)
        get_model_config(chunks[0]).variable_seq_lengths = True
        if save:
            save_model(chunks, folder)
        else:
            load_model(chunks, folder)
        data = conversations()
        multiple = parallel.tp if parallel.sequence_parallel else 1
        parts = pack(data, 64, multiple) if packed else pad_rows(data, 64, multiple)
        num_tokens = _target_count(parts)
        out = run_schedule(chunks, parts, partial(nll_loss, num_tokens=num_tokens, scale=float(len(parts))),
                           forward_only=False)
        sums = _sums(out)
        grads = {n: p.grad.clone() for n, p in chunks[0].named_parameters() if p.grad is not None}
        return {"loss": float(sums[0] / sums[1]), "micro": len(parts),
                "grads": grads if parallel.tp == 1 and parallel.pp == 1 else None}
    finally:
        destroy()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sft") / "weights")
    padded = spawn(1, _loss_and_grads, ParallelConfig(), False, folder, True)[0]
    return folder, padded


def test_pack_equals_unpacked_loss_and_gradients(single):
    folder, padded = single
    packed = spawn(1, _loss_and_grads, ParallelConfig(), True, folder, False)[0]
    assert packed["micro"] < padded["micro"]  # packing fills micro-batches: fewer forwards
    assert abs(packed["loss"] - padded["loss"]) <= 1e-6 * abs(padded["loss"])
    assert packed["grads"].keys() == padded["grads"].keys() and len(padded["grads"]) > 10
    for name, g in padded["grads"].items():
        assert rel(packed["grads"][name], g) < 1e-5, name


@pytest.mark.parametrize("parallel", [ParallelConfig(tp=2, sequence_parallel=True), ParallelConfig(pp=2)],
                         ids=["tp2_sp", "pp2"])
def test_packed_under_model_parallelism_equals_single_rank(single, parallel):
    folder, padded = single
    results = spawn(2, _loss_and_grads, parallel, True, folder, False)
    for r in results:
        assert abs(r["loss"] - padded["loss"]) <= 1e-5 * abs(padded["loss"])



def test_packed_moe_under_expert_parallelism_equals_single_rank(tmp_path):
    """Every rank packs the same samples: with EP=2 (DP=2 for the dense part) the global token mean is
    the single-rank one; the expert all-to-all runs over packed tokens."""
    folder = str(tmp_path / "moe")
    ref = spawn(1, _loss_and_grads, ParallelConfig(), False, folder, True, MOE)[0]
    for r in spawn(2, _loss_and_grads, ParallelConfig(ep=2), True, folder, False, MOE):
        assert abs(r["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])

SFT = ["sft.template=r1_zero", "sft.samples_per_step=8", "sft.micro_batch_tokens=256", "trainer.save_every=0",
       "cold_start.traces=40", "cold_start.general=8", "sft.eval_every=2"]


def _sft_run(out: str, extra: list, nproc: int = 1):
    from rl_helpers import config

    from r1mega.recipe.cold_start import write
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.sft import train

    data = f"{out}-data"
    cfg = config(out, [*SFT, *extra, f"sft.train_files=[{data}/cold_start.jsonl]",
                       f"sft.valid_files=[{data}/general.jsonl]"], world_size=nproc)
    runtime = initialize(cfg.parallel, cfg.trainer.seed)
    try:
        if runtime.is_main:
            cfg.trainer.output_dir = data
            write(cfg)
            cfg.trainer.output_dir = out
        torch.distributed.barrier()
        return train(cfg, runtime)
    finally:
        destroy()


def test_resumed_sft_equals_uninterrupted(tmp_path):
    straight = spawn(1, _sft_run, str(tmp_path / "a"), ["sft.steps=4"])[0]
    spawn(1, _sft_run, str(tmp_path / "b"), ["sft.steps=2"])
    resumed = spawn(1, _sft_run, str(tmp_path / "b"), ["sft.steps=4", "trainer.load=auto"])[0]
    assert [h["step"] for h in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        assert a.keys() == b.keys()
        for key in ("loss", "grad_norm", "tokens", "eval/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    assert straight[-1]["eval/loss"] < straight[1]["eval/loss"]  # evaluated at steps 2 and 4


def test_data_parallel_sft_equals_single_rank(tmp_path):
    single = spawn(1, _sft_run, str(tmp_path / "one"), ["sft.steps=2"])[0]
    dp = spawn(2, _sft_run, str(tmp_path / "two"), ["sft.steps=2", "sft.pack=false"], 2)[0]
    assert len(single) == len(dp) == 2
    for a, b in zip(single, dp):
        for key in ("loss", "grad_norm", "tokens", "eval/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
