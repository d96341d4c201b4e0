"""Model FLOPs from the config against torch's FlopCounterMode on the transformers model of the
same config (an independent count of every matmul and attention the forward runs); the
bench's config rules."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from r1mega.bench.flops import causal_context, forward_flops_per_token, mfu, training_flops_per_token
from r1mega.checkpoint.hf_config import transformers_config
from r1mega.config.loader import compose_config, load_config, to_config
from r1mega.config.validate import ConfigError


def _hf_model(model):
    from transformers import AutoModelForCausalLM

    config = transformers_config(model)
    config._attn_implementation = "eager"  # attention as matmuls the counter sees
    config._experts_implementation = "eager"  # a loop of per-expert matmuls over routed tokens
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("preset", ["tiny_qwen2", "tiny", "tiny_moe"])
def test_forward_flops_match_counted(preset):
    model = to_config(compose_config([f"model={preset}"])).model
    hf = _hf_model(model)
    batch, seq = 2, 48
    tokens = torch.randint(0, model.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        hf(input_ids=tokens)
    counted = counter.get_total_flops()
    # the counter charges SDPA for the full seq x seq score matrix, causal or not
    predicted = batch * seq * forward_flops_per_token(model, context=seq)
    assert counted > 0 and abs(predicted - counted) / counted < 1e-6, (predicted, counted)


def test_training_flops_and_mfu():
    model = to_config(compose_config(["model=tiny"])).model
    assert causal_context(255) == 128
    assert training_flops_per_token(model, 255) == 3 * forward_flops_per_token(model, 128)
    assert mfu(1e15, 2.0, 1000.0, 1) == pytest.approx(0.5)
    assert mfu(1e15, 2.0, None, 1) is None


@pytest.mark.parametrize("overrides,message", [
    (["bench.suites=[step,nope]"], "bench.suites='nope'"),
    (["bench.repeats=0"], "bench.repeats=0"),
    (["bench.suites=[peer]", "algorithm.ratio_level=sequence"], "algorithm.ratio_level='sequence' has no TRL"),
    (["bench.suites=[peer]", "algorithm=rloo"], "algorithm.advantage"),
    (["bench.suites=[peer]", "bench.peer.targets=[0.9,1.5]"], "bench.peer.targets=[0.9, 1.5]"),
    (["bench.suites=[peer]", "bench.peer.eval_every=0"], "bench.peer.eval_every"),
    (["bench.train.layouts=[{tp: 0}]"], "bench.train.layouts[0].tp=0"),
    (["bench.train.models=[tiny,nope]"], "bench.train.models[1]: no model preset 'nope'"),
    (["bench.suites=[peer]", "data=files", "data.train_path=x.jsonl", "data.max_prompt_tokens=256",
      "pretrain.enabled=false"],
     "bench peer: data.name='files'"),
])
def test_bench_rules_name_the_key(overrides, message):
    from r1mega.config.bench_rules import check_bench

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(overrides, 1, check_bench)


def test_default_bench_config_is_valid():
    from r1mega.config.bench_rules import check_bench

    for preset in ("default", "gpu"):
        load_config([f"bench={preset}"], 1, check_bench)
