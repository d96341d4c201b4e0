"""With model.fp8 set, every forward r1mega makes has the shapes Transformer Engine's FP8 linears
accept: a GRPO step (rollout decoding, reference and old-policy log-probs, the update), held-out
evaluation, and SFT steps over THD packs and padded rows, at TP=2 with sequence parallelism.

Transformer Engine is not installed here, so the layers are megatron's local ones; a guard on
each decoder linear layer checks TE 2.8's rules on its input instead: `assert_dim_for_fp8_exec`
(all dimensions but the last multiply to a multiple of 8, the last is a multiple of 16) for
per-tensor recipes, and MXFP8's 32 x 32 blocks (`MXFP8Quantizer::create_tensor`).
"""

from __future__ import annotations

import math

import pytest

from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

TP2_SP = ["parallel.tp=2", "parallel.sequence_parallel=true", "model.dtype=bf16"]
RULES = {"delayed": (8, 16), "mxfp8": (32, 32)}  # (rows: product of all but the last dim, last dim)


def _guarded(recipe: str, seen: list):
    """build_model, with a pre-hook on every decoder linear layer that records inputs TE refuses."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from r1mega.models import builder

    rows, last = RULES[recipe]

    def build(model, parallel, **kwargs):
        chunks = builder.build_model(model, parallel, **kwargs)
        for chunk in chunks:
            for name, module in chunk.named_modules():
                if ".layers." in name and isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                    module.register_forward_pre_hook(_check(name, rows, last, seen))
        return chunks

    return build


def _check(name, rows, last, seen):
    def hook(module, args):
        x = args[0]
        seen.append((name, tuple(x.shape), math.prod(x.shape[:-1]) % rows == 0 and x.shape[-1] % last == 0))
    return hook


def _grpo(out: str):
    import r1mega.trainer.model_setup as rl_setup
    from rl_helpers import run

    seen: list = []
    rl_setup.build_model = _guarded("mxfp8", seen)
    history = run([*TP2_SP, "model.fp8.format=e4m3", "model.fp8.recipe=mxfp8", "trainer.steps=1",
                   "data.prompts_per_step=3", "algorithm.group_size=3", "algorithm.minibatches=2",
                   "algorithm.kl_beta=0.01", "trainer.eval_at_ends=true", "rollout.eval_samples=3"], out, 2)
    assert "eval/pass_at_k" in history[-1] and history[-1]["step"] == 1
    return seen


def _sft(out: str, pack: str):
    import r1mega.trainer.model_setup as rl_setup
    from test_sft import _sft_run

    seen: list = []
    rl_setup.build_model = _guarded("delayed", seen)
    _sft_run(out, [*TP2_SP, "model.fp8.format=hybrid", "sft.steps=1", "sft.eval_every=1", f"sft.pack={pack}"],
             nproc=2)
    return seen


@pytest.mark.parametrize("what", ["grpo", "sft_packed", "sft_padded"])
def test_every_forward_has_shapes_transformer_engine_accepts(tmp_path, what):
    out = str(tmp_path / what)
    ranks = spawn(2, _grpo, out) if what == "grpo" else spawn(2, _sft, out, str(what == "sft_packed").lower())
    for seen in ranks:
        shapes = {shape for _, shape, _ in seen}
        assert len(shapes) > 2, shapes  # decoding, prefill and training shapes all went through
        bad = sorted({(name, shape) for name, shape, ok in seen if not ok})
        assert not bad, bad[:5]
