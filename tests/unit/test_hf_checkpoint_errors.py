"""Bad HF checkpoints and configs get errors that name the file and tensor."""

import json

import pytest
import torch
from safetensors.torch import save_file

from r1mega.checkpoint.hf_config import UnsupportedModelError, hf_config_from_model, model_config_from_hf
from r1mega.checkpoint.hf_io import CheckpointError, HFReader
from r1mega.config.loader import compose_config, to_config


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


DSV2 = {**{k: v for k, v in DSV3.items() if k not in ("n_group", "topk_group")}, "topk_method": "greedy",
        "q_lora_rank": None, "routed_scaling_factor": 1.0}


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama", "qwen3_moe", "deepseek_v3", "deepseek_v2"])
def test_config_roundtrip_through_transformers(tmp_path, kind):
    """Our exported config.json loads in transformers and maps back to the same ModelConfig."""
    from transformers import (AutoConfig, DeepseekV2Config, DeepseekV3Config, LlamaConfig, Qwen2Config, Qwen3Config,
                              Qwen3MoeConfig)

    make = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig, "qwen3_moe": Qwen3MoeConfig,
            "deepseek_v3": DeepseekV3Config, "deepseek_v2": DeepseekV2Config}[kind]
    extra = {"qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True),
             "deepseek_v3": DSV3, "deepseek_v2": DSV2}
    heads = 4 if kind.startswith("deepseek") else 2  # multi-latent attention: a key per head
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
    if kind == "deepseek_v2":
        assert cfg.mla.q_lora_rank is None and cfg.moe.score_function == "softmax" and cfg.moe.pre_softmax
        assert not cfg.moe.expert_bias and cfg.moe.num_groups is None


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


@pytest.mark.parametrize("key,value,named", [
    ("topk_method", "noaux_tc", "topk_method='noaux_tc'"), ("scoring_func", "sigmoid", "scoring_func='sigmoid'"),
    ("norm_topk_prob", True, "norm_topk_prob=True"),
    # the best expert of each group ranks groups in DeepSeek-V2; megatron would sum the best two
    ("topk_method", "group_limited_greedy", "topk_group=2")])
def test_unsupported_deepseek_v2_options_are_named(tmp_path, key, value, named):
    hf = {"architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, **DSV2, "n_group": 4,
          "topk_group": 2, "num_experts_per_tok": 4, key: value}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UnsupportedModelError) as err:
        model_config_from_hf(tmp_path)
    assert named in str(err.value) and "config.json" in str(err.value) and "\n" not in str(err.value)


def test_deepseek_v3_single_expert_routing_is_refused(tmp_path):
    """DeepSeek-V3 renormalises even one routed weight to 1; megatron would keep its sigmoid score."""
    hf = {"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, **DSV3,
          "num_experts_per_tok": 1}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=1"):
        model_config_from_hf(tmp_path)


def test_export_refuses_routing_the_family_would_not_reproduce(tmp_path):
    from transformers import DeepseekV3Config

    DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, **DSV3).save_pretrained(tmp_path)
    cfg = model_config_from_hf(tmp_path)
    cfg.moe.score_function = "softmax"
    with pytest.raises(UnsupportedModelError, match="score_function=sigmoid"):
        hf_config_from_model(cfg)
    cfg = model_config_from_hf(tmp_path)
    cfg.moe.group_topk = None  # megatron then routes over every group; HF's router would limit them
    with pytest.raises(UnsupportedModelError, match="set both"):
        hf_config_from_model(cfg)


def test_mtp_export_is_deepseek_v3s_only(tmp_path):
    """Only DeepSeek-V3 checkpoints have an HF layout for multi-token-prediction layers; a V3 export counts
    the model's MTP layers and those carried past them."""
    from transformers import DeepseekV3Config

    from r1mega.config.schema import MTPConfig

    cfg = to_config(compose_config(["model=tiny_moe", "model.mtp.num_layers=1"])).model
    with pytest.raises(UnsupportedModelError, match="model.mtp: .* deepseek_v3 checkpoints only, not model.arch"):
        hf_config_from_model(cfg)
    DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, **DSV3).save_pretrained(tmp_path)
    cfg = model_config_from_hf(tmp_path)
    assert cfg.mtp is None and hf_config_from_model(cfg, 1)["num_nextn_predict_layers"] == 1
    cfg.mtp = MTPConfig(num_layers=2)
    assert hf_config_from_model(cfg, 1)["num_nextn_predict_layers"] == 3


def _carried_source(folder, num_layers=2):
    """An HF folder of a 2-layer model holding a multi-token-prediction layer (numbered 2)."""
    folder.mkdir()
    tensors = {"model.layers.1.mlp.down_proj.weight": torch.randn(2, 2), "model.norm.weight": torch.randn(2),
               "model.layers.2.eh_proj.weight": torch.randn(2, 4), "model.layers.2.enorm.weight": torch.randn(2)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": num_layers}))
    return tensors


def test_layers_past_the_decoder_are_carried_through_a_model_folder(tmp_path, caplog):
    """DeepSeek-V3 checkpoints hold their multi-token-prediction layer at index num_hidden_layers: it goes
    into an r1mega model folder and out of it unchanged."""
    import logging

    from r1mega.checkpoint.hf_carried import carried_reader, save_carried, write_carried

    tensors = _carried_source(tmp_path / "hf")
    mcore = tmp_path / "mcore"
    mcore.mkdir()
    with caplog.at_level(logging.INFO):
        save_carried(tmp_path / "hf", mcore, num_layers=2)
    assert "carried 1 layer(s) past the decoder's 2" in caplog.text
    out = tmp_path / "out"
    out.mkdir()
    weight_map, size, layers = write_carried(mcore, out, 2, "model-carried")
    assert layers == 1 and set(weight_map) == {"model.layers.2.eh_proj.weight", "model.layers.2.enorm.weight"}
    assert size == (2 * 4 + 2) * 4  # float32
    reader, names = carried_reader(mcore, 2)
    with reader:
        for name in names:
            assert torch.equal(reader.read(name), tensors[name])
    # a folder of another model (here: a tokenizer's, with 3 layers) is no source of carried layers
    _carried_source(tmp_path / "other", num_layers=3)
    assert carried_reader(tmp_path / "other", 2) is None
    assert write_carried(None, out, 2, "x") == ({}, 0, 0)


def _fp8_folder(folder, quant, with_scale=True):
    folder.mkdir()
    tensors = {"w": torch.randn(6, 5).to(torch.float8_e4m3fn)}
    if with_scale:
        tensors["w_scale_inv"] = torch.rand(2, 2)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"quantization_config": quant} if quant else {}))
    return tensors


def test_fp8_block_dequantization_of_row_slices(tmp_path):
    """Reading rows [1, 5) dequantizes with the scales of the blocks they fall in (block 4 x 3)."""
    tensors = _fp8_folder(tmp_path / "q", {"quant_method": "fp8", "weight_block_size": [4, 3]})
    full = tensors["w"].float() * tensors["w_scale_inv"].repeat_interleave(4, 0)[:6].repeat_interleave(3, 1)[:, :5]
    reader = HFReader(tmp_path / "q")
    assert torch.equal(reader.read("w"), full.to(torch.bfloat16))
    assert torch.equal(reader.read("w", 0, 1, 5), full[1:5].to(torch.bfloat16))
    assert torch.equal(reader.read("w", 1, 2, 5), full[:, 2:5].to(torch.bfloat16))


@pytest.mark.parametrize("quant,with_scale,named", [
    ({"quant_method": "gptq", "bits": 4}, True, "quantization_config.quant_method='gptq'"),
    ({"quant_method": "fp8"}, True, "weight_block_size=None"),
    (None, True, "no fp8 quantization_config"),
    ({"quant_method": "fp8", "weight_block_size": [4, 3]}, False, "'w_scale_inv'"),
])
def test_quantized_checkpoints_refused_by_name(tmp_path, quant, with_scale, named):
    _fp8_folder(tmp_path / "q", quant, with_scale)
    with pytest.raises(CheckpointError) as err:
        HFReader(tmp_path / "q").read("w")
    assert named in str(err.value) and str(tmp_path / "q") in str(err.value) and "\n" not in str(err.value)


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
