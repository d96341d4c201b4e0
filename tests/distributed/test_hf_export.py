"""An HF export is complete: a tiny r1mega model exported with `r1mega-convert mcore-to-hf` loads with
transformers' Auto classes as it is, its tokenizer encodes prompts to r1mega's ids, and transformers'
greedy generation equals the native engine's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from r1mega.config.schema import ModelConfig, ParallelConfig
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(name="t", arch="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, head_dim=16, vocab_size=384, qk_layernorm=True, init_method_std=0.2)
PROMPTS = ["12+34=", "What is 7 plus 8? <think>", "Answer: 9"]


def _native(root: str):
    """Save a random tiny model with the built-in tokenizer; the native engine's greedy responses."""
    from r1mega.checkpoint.mcore import save_model
    from r1mega.data.tokenizer import load_tokenizer
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import running
    from r1mega.rollout.native import NativeEngine
    from r1mega.rollout.types import SamplingParams

    with running(ParallelConfig(), 5):
        tokenizer = load_tokenizer(f"{root}/tok")
        chunks = build_model(MODEL, ParallelConfig())
        save_model(chunks, MODEL, f"{root}/mcore", tokenizer, carry_from=[f"{root}/tok"])
        engine = NativeEngine(chunks, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        out = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12))
        return prompts, out.response_ids


def test_export_loads_in_transformers_and_generates_the_same(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1mega.data.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(tmp_path / "tok", vocab_size=MODEL.vocab_size)
    prompts, responses = spawn(1, _native, str(tmp_path))[0]
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli.convert", "mcore-to-hf", f"src={tmp_path / 'mcore'}",
                           f"dst={tmp_path / 'hf'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = tmp_path / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["torch_dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(hf)
    generation = json.loads((hf / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["pad_token_id"] is not None
    assert (hf / "chat_template.jinja").read_bytes() == (tmp_path / "tok" / "chat_template.jinja").read_bytes()
    assert len(tokenizer) > 300 and tokenizer.chat_template
    assert [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS] == prompts
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    for ids, want in zip(prompts, responses):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        assert out[0, len(ids):].tolist() == want
    assert any(len(r) > 1 for r in responses)
