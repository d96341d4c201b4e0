"""Bad HF checkpoints and configs get errors that name the file and tensor."""

import json

import pytest
import torch
from safetensors.torch import save_file

from r1mega.checkpoint.hf_config import UnsupportedModelError, hf_config_from_model, model_config_from_hf
from r1mega.checkpoint.hf_io import CheckpointError, HFReader


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        HFReader(tmp_path / "nope")


def test_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="model.safetensors"):
        HFReader(tmp_path)


def test_corrupt_file_names_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        HFReader(tmp_path)


def test_missing_tensor_and_missing_shard(tmp_path):
    save_file({"a": torch.randn(4, 2)}, str(tmp_path / "part-1.safetensors"))
    index = {"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    reader = HFReader(tmp_path)
    assert reader.read("a", 0, 1, 3).shape == (2, 2)
    with pytest.raises(CheckpointError, match="'zzz' is missing"):
        reader.read("zzz")
    with pytest.raises(CheckpointError, match="part-2.safetensors.*'b'"):
        reader.read("b")


def test_truncated_file(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        HFReader(tmp_path).read("w")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        model_config_from_hf(tmp_path)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_config_from_hf(tmp_path)


DSV3 = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
            routed_scaling_factor=2.5, n_group=4, topk_group=1, first_k_dense_replace=1, q_lora_rank=24,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                             "original_max_position_embeddings": 64})


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama", "qwen3_moe", "deepseek_v3"])
def test_config_roundtrip_through_transformers(tmp_path, kind):
    """Our exported config.json loads in transformers and maps back to the same ModelConfig."""
    from transformers import AutoConfig, DeepseekV3Config, LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    make = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig, "qwen3_moe": Qwen3MoeConfig,
            "deepseek_v3": DeepseekV3Config}[kind]
    extra = {"qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True),
             "deepseek_v3": DSV3}
    heads = 4 if kind == "deepseek_v3" else 2  # multi-latent attention: a key per head
    hf = make(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=heads, **extra.get(kind, {}))
    hf.save_pretrained(tmp_path / "a")
    cfg = model_config_from_hf(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(hf_config_from_model(cfg)))
    again = AutoConfig.from_pretrained(tmp_path / "b")
    assert type(again).__name__ == type(hf).__name__
    back = model_config_from_hf(tmp_path / "b", name=cfg.name)
    assert back == cfg
    if kind == "deepseek_v3":
        assert cfg.mla.yarn.factor == 40.0 and cfg.mla.yarn.mscale_all_dim == 1.0 and cfg.mla.q_lora_rank == 24
        assert cfg.moe.score_function == "sigmoid" and cfg.moe.expert_bias and cfg.moe.first_k_dense == 1


@pytest.mark.parametrize("key,value", [("topk_method", "greedy"), ("scoring_func", "softmax"),
                                       ("norm_topk_prob", False), ("rope_interleave", False),
                                       ("hidden_act", "gelu"), ("topk_group", 2)])
def test_unsupported_deepseek_options_are_named(tmp_path, key, value):
    hf = {"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, **DSV3, key: value}
    hf.pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UnsupportedModelError) as err:
        model_config_from_hf(tmp_path)
    assert f"{key}=" in str(err.value) and "config.json" in str(err.value) and "\n" not in str(err.value)


def test_layers_past_the_decoder_are_named_not_dropped_unseen(tmp_path, caplog):
    """DeepSeek-V3 checkpoints hold their multi-token-prediction layer at index num_hidden_layers."""
    import logging

    from r1mega.checkpoint.hf_convert import _warn_unloaded_layers
    from r1mega.config.schema import ModelConfig

    save_file({"model.layers.1.mlp.down_proj.weight": torch.zeros(2, 2), "model.layers.2.eh_proj.weight":
               torch.zeros(2, 2), "model.norm.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    model = ModelConfig(name="m", num_layers=2, hidden_size=2, ffn_hidden_size=2, num_attention_heads=1,
                        num_query_groups=1, vocab_size=2)
    with caplog.at_level(logging.WARNING):
        _warn_unloaded_layers(HFReader(tmp_path), model)
    assert "layer(s) 2 past the model's 2 decoder layers" in caplog.text


@pytest.mark.parametrize("scaling,refused", [
    ({"mscale": 1.0, "mscale_all_dim": 1.0}, None),  # DeepSeek-V3's
    ({}, None),
    ({"mscale_all_dim": 1.0}, "mscale=None with mscale_all_dim=1.0"),  # transformers: mscale(f); megatron: 1
    ({"mscale": 0.707, "mscale_all_dim": 0}, "mscale=0.707 with mscale_all_dim=0"),
    ({"attention_factor": 1.2}, "attention_factor"),
])
def test_yarn_is_read_as_transformers_reads_it(tmp_path, scaling, refused):
    """Where transformers and megatron would scale the rotary embedding differently, the config is refused."""
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 64,
            **scaling}
    hf = {"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, **DSV3, "rope_parameters": rope}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    if refused is None:
        assert model_config_from_hf(tmp_path).mla.yarn.factor == 40.0
        return
    with pytest.raises(UnsupportedModelError, match=refused):
        model_config_from_hf(tmp_path)


def test_deepseek_config_without_its_sizes_is_refused(tmp_path):
    """transformers would fill them with DeepSeek-V3's own sizes (n_group 8, q_lora_rank 1536, ...)."""
    hf = {"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, **DSV3}
    del hf["n_group"], hf["q_lora_rank"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UnsupportedModelError, match="without q_lora_rank, n_group"):
        model_config_from_hf(tmp_path)
