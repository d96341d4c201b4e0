"""Parameter counts from the config match transformers' models built from the same config."""

import pytest

from r1mega.checkpoint.hf_config import model_config_from_hf


@pytest.mark.parametrize("kind", ["qwen2", "qwen3_tied", "qwen3_moe"])
def test_counts_match_transformers(tmp_path, kind):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, \
        Qwen3MoeForCausalLM

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    elif kind == "qwen3_tied":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, tie_word_embeddings=True))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, num_experts=6, num_experts_per_tok=2,
                                                   moe_intermediate_size=8))
    model.save_pretrained(tmp_path)
    from r1mega.models.builder import parameter_counts

    total, active = parameter_counts(model_config_from_hf(tmp_path))
    assert total == sum(p.numel() for p in model.parameters())
    if kind == "qwen3_moe":
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        assert active == total - experts * 4 // 6  # 2 of 6 experts per token
    else:
        assert active == total
