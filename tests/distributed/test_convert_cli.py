"""`r1mega-convert` round trips Qwen3, Qwen3-MoE and DeepSeek-V3 through megatron checkpoints under TP=2:
the same tensors (DeepSeek-V3's multi-token-prediction layer, which r1mega does not train, too), and every
other file of the HF folder (tokenizer, chat template, generation config, licence, custom code) byte for
byte."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.distributed


def _convert(*args):
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli.convert", *args], capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("r1mega: error:")]
    return proc.returncode, errors, proc.stderr


def _tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


# files of an HF folder besides weights and config that a round trip keeps as they are
EXTRA = {"LICENSE": "Apache-2.0 (test)\n", "README.md": "# tiny\n", "tokenization_custom.py": "# custom code\n"}


def _save_tiny(kind, folder, with_files=False):
    """A random tiny HF model; with_files adds the built-in tokenizer and EXTRA."""
    from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    from r1mega.data.tokenizer import build_tiny_tokenizer

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    elif kind.startswith("dsv3"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config(
            **{**common, "num_key_value_heads": 4}, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            n_shared_experts=1, routed_scaling_factor=2.5, n_group=1, topk_group=1, first_k_dense_replace=1,
            num_nextn_predict_layers=1))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=16, norm_topk_prob=True))
    model.to(torch.bfloat16)
    for module in model.modules():  # DeepSeek-V3 keeps its expert bias in fp32, in memory and on disk
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias = module.e_score_correction_bias.float()
    model.save_pretrained(folder)
    if kind.startswith("dsv3"):  # its multi-token-prediction layer (layer 2 of 2), which transformers does not build
        tensors = load_file(folder / "model.safetensors")
        mtp = {"model.layers.2." + n[len("model.layers.1."):]: torch.randn_like(t)
               for n, t in tensors.items() if n.startswith("model.layers.1.")}
        mtp["model.layers.2.eh_proj.weight"] = torch.randn(32, 64, dtype=torch.bfloat16)
        if kind == "dsv3_mtp":  # the whole layer, as DeepSeek ships it, to load into megatron's MTP block
            mtp.update({f"model.layers.2.{n}.weight": torch.randn(32, dtype=torch.bfloat16)
                        for n in ("enorm", "hnorm", "shared_head.norm")})
            mtp["model.layers.2.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
            mtp["model.layers.2.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
        save_file({**tensors, **mtp}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if with_files:
        tokenizer = build_tiny_tokenizer(folder.parent / "tokenizer", vocab_size=128)
        for f in tokenizer.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        for name, text in EXTRA.items():
            (folder / name).write_text(text)


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "dsv3", "dsv3_mtp"])
def test_roundtrip_under_tp2(tmp_path, kind):
    """dsv3 carries its MTP layer through the model folder; dsv3_mtp (mtp=true) loads it into megatron's MTP
    block and exports it from there."""
    hf, mcore, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    _save_tiny(kind, hf, with_files=True)
    extra = ["parallel.sequence_parallel=true"] if kind != "qwen3" else []
    extra += ["mtp=true"] if kind == "dsv3_mtp" else []
    code, errors, log = _convert("hf-to-mcore", f"src={hf}", f"dst={mcore}", "parallel.tp=2", "parallel.nproc=2",
                                 *extra)
    assert code == 0, log[-3000:]
    assert any(f.name.startswith("carried") for f in mcore.iterdir()) == (kind == "dsv3")
    code, errors, log = _convert("mcore-to-hf", f"src={mcore}", f"dst={back}")  # read back at TP=1
    assert code == 0, log[-3000:]
    original, exported = _tensors(hf), _tensors(back)
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    # every file comes back; all but the weights, their index and config.json byte for byte
    regenerated = {"config.json", "model.safetensors", "model.safetensors.index.json"}
    files = {f.name for f in hf.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", *EXTRA} <= files
    assert files - {"model.safetensors"} <= {f.name for f in back.iterdir()}
    for name in files - regenerated:
        assert (back / name).read_bytes() == (hf / name).read_bytes(), name
    config, source = (json.loads((d / "config.json").read_text()) for d in (back, hf))
    for key in ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "num_nextn_predict_layers"):
        assert config.get(key) == source.get(key), key
    if not kind.startswith("dsv3"):  # transformers derives DeepSeek's head_dim (qk_rope_head_dim)
        assert config["head_dim"] == source["head_dim"]
    assert config["torch_dtype"] == "bfloat16"


def test_bad_inputs_get_one_line(tmp_path):
    hf = tmp_path / "hf"
    _save_tiny("qwen3", hf)
    code, errors, _ = _convert("hf-to-mcore", f"src={hf}", f"dst={tmp_path / 'x'}", "parallel.tp=3",
                               "parallel.nproc=3")
    assert code == 2 and len(errors) == 1 and "parallel.tp=3 must divide" in errors[0]
    code, errors, _ = _convert("mcore-to-hf", f"src={tmp_path / 'missing'}", f"dst={tmp_path / 'y'}")
    assert code == 2 and "model.yaml" in errors[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:500])
    code, errors, _ = _convert("hf-to-mcore", f"src={broken}", f"dst={tmp_path / 'z'}")
    assert code == 2 and "model.safetensors" in errors[0]
    assert not (tmp_path / "z").exists() and not (tmp_path / "x").exists()
