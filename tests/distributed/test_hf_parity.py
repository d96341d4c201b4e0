"""Converted megatron models reproduce transformers' logits under every layout; HF -> megatron -> HF is exact.

Oracle: transformers' own Qwen2 / Qwen3 / Qwen3-MoE / DeepSeek-V3 / DeepSeek-V2 classes, random weights from a
config (multi-latent attention with and without a query latent, with YaRN past its original length;
DeepSeek-V3's sigmoid routing with an expert bias, DeepSeek-V2's softmax routing, greedy and group-limited).
DeepSeek-V3's checkpoint also holds a multi-token-prediction layer, which the round trip keeps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layout_utils import logits, rel

from r1mega.config.schema import ParallelConfig
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

VOCAB, SEQ = 128, 12
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2)


KINDS = ("qwen2", "qwen3", "qwen3_moe", "dsv3", "dsv3_q", "dsv3_moe", "dsv2", "dsv2_group")
MOE_KINDS = ("qwen3_moe", "dsv3_moe", "dsv2", "dsv2_group")
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
        "beta_fast": 32.0, "beta_slow": 1.0}


def _hf_model(kind: str):
    from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    mla = dict(kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4)
    if kind == "dsv2":  # V2-Lite's: no query latent, softmax over all experts, greedy top-k scaled, YaRN
        rope = {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}
        return DeepseekV2ForCausalLM(DeepseekV2Config(
            **{**COMMON, **mla}, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
            moe_intermediate_size=16, first_k_dense_replace=1, topk_method="greedy", routed_scaling_factor=1.5,
            rope_parameters=rope, max_position_embeddings=32))
    if kind == "dsv2_group":  # V2's: a query latent, the top expert of each of the 2 best of 4 groups
        return DeepseekV2ForCausalLM(DeepseekV2Config(
            **{**COMMON, **mla}, q_lora_rank=20, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            moe_intermediate_size=16, first_k_dense_replace=2, topk_method="group_limited_greedy", n_group=4,
            topk_group=2, routed_scaling_factor=2.0))

    if kind == "dsv3_moe":  # DeepSeekMoE after a dense layer: sigmoid routing with an expert bias, 1 of 4 groups
        moe = dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=1, n_shared_experts=1,
                   moe_intermediate_size=16, routed_scaling_factor=2.5, first_k_dense_replace=1)
        return DeepseekV3ForCausalLM(DeepseekV3Config(**{**COMMON, **mla}, **moe, q_lora_rank=20,
                                                      num_nextn_predict_layers=1))
    if kind.startswith("dsv3"):  # multi-latent attention, every layer dense
        if kind == "dsv3":  # query latent; YaRN, which the 12 positions outgrow (original length 8)
            rope = {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}
            return DeepseekV3ForCausalLM(DeepseekV3Config(**{**COMMON, **mla}, q_lora_rank=20, rope_parameters=rope,
                                                          max_position_embeddings=32, first_k_dense_replace=4))
        return DeepseekV3ForCausalLM(DeepseekV3Config(**{**COMMON, **mla}, q_lora_rank=None,  # V2-Lite's queries
                                                      first_k_dense_replace=4))

    if kind == "qwen2":  # qkv bias, untied head, large rope base
        return Qwen2ForCausalLM(Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=False))
    if kind == "qwen3":  # qk-norm, tied embeddings, head_dim != hidden/heads
        return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True))
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, head_dim=16, moe_intermediate_size=32, num_experts=4,
                                              num_experts_per_tok=2, norm_topk_prob=True))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{kind: (hf folder, input ids, reference logits)} for random tiny models."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, kind in enumerate(KINDS):
        torch.manual_seed(100 + i)
        model = _hf_model(kind).eval()
        with torch.no_grad():  # norms and biases start at 1 and 0: perturb them so mapping errors show
            for name, p in model.named_parameters():
                if "norm" in name or "bias" in name:
                    p.add_(0.1 * torch.randn_like(p))
            for name, b in model.named_buffers():  # DeepSeek-V3's expert bias: enough to change the routing
                if name.endswith("e_score_correction_bias"):
                    b.copy_(0.5 * torch.randn_like(b))
        model.save_pretrained(root / kind)
        if kind == "dsv3_moe":
            _add_mtp_layer(root / kind, model.config)
        ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            out[kind] = (root / kind, ids, model(ids).logits.double())
    return out


def _add_mtp_layer(folder: Path, config) -> None:
    """DeepSeek-V3's multi-token-prediction layer, as its checkpoints hold it: layer num_hidden_layers, a
    decoder layer plus the projections that feed it (transformers builds no such layer)."""
    import json

    from safetensors.torch import save_file

    tensors = load_file(folder / "model.safetensors")
    prefix, h = f"model.layers.{config.num_hidden_layers}.", config.hidden_size
    for name, t in list(tensors.items()):
        if name.startswith("model.layers.1."):  # an MoE layer's tensors, renumbered
            tensors[prefix + name[len("model.layers.1."):]] = torch.randn_like(t)
    tensors.update({prefix + "enorm.weight": torch.randn(h), prefix + "hnorm.weight": torch.randn(h),
                    prefix + "eh_proj.weight": torch.randn(h, 2 * h),
                    prefix + "shared_head.norm.weight": torch.randn(h),
                    prefix + "shared_head.head.weight": torch.randn(VOCAB, h),
                    prefix + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone()})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((folder / "config.json").read_text())
    assert hf["num_nextn_predict_layers"] == 1


def _convert_on_ranks(kinds, tp: int, pp: int, ep: int, paths, ids, out_root: str):
    from r1mega.checkpoint.hf_config import model_config_from_hf
    from r1mega.checkpoint.hf_convert import load_hf_weights, save_hf
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize

    results = {}
    initialize(ParallelConfig(tp=tp, pp=pp, ep=ep), seed=7)
    try:
        for kind in kinds:
            parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, sequence_parallel=tp > 1 and kind in MOE_KINDS)
            model_cfg = model_config_from_hf(paths[kind])
            chunks = build_model(model_cfg, parallel)
            load_hf_weights(chunks, model_cfg, paths[kind])
            results[kind] = logits(chunks, ids[kind])
            save_hf(chunks, model_cfg, f"{out_root}/{kind}", carry_from=[paths[kind]])
    finally:
        destroy()
    return results


LAYOUTS = [  # (tp, pp, ep), models
    ((1, 1, 1), KINDS),
    ((2, 1, 1), ("qwen2", "qwen3", "qwen3_moe", "dsv3", "dsv3_q", "dsv3_moe", "dsv2")),
    ((1, 2, 1), ("qwen2", "qwen3", "qwen3_moe", "dsv3", "dsv3_moe", "dsv2")),
    ((2, 2, 1), ("qwen2", "qwen3")),
    ((1, 1, 2), ("qwen3_moe", "dsv3_moe", "dsv2")),
    ((2, 1, 2), ("qwen3_moe", "dsv3_moe", "dsv2")),
]


def _tensors(folder: Path) -> dict:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("layout,kinds", LAYOUTS, ids=[f"tp{t}pp{p}ep{e}" for (t, p, e), _ in LAYOUTS])
def test_logits_and_roundtrip(checkpoints, tmp_path, layout, kinds):
    tp, pp, ep = layout
    paths = {k: str(checkpoints[k][0]) for k in kinds}
    ids = {k: checkpoints[k][1] for k in kinds}
    per_rank = spawn(tp * pp * ep, _convert_on_ranks, kinds, tp, pp, ep, paths, ids, str(tmp_path))
    for kind in kinds:
        ref = checkpoints[kind][2]
        for rank_logits in per_rank:
            got = rank_logits[kind]
            if got is None:
                continue
            assert torch.isfinite(got).all()
            error = rel(got, ref)
            assert error < 1e-5, f"{kind} {layout}: logits relative error {error:.2e}"
        original, exported = _tensors(checkpoints[kind][0]), _tensors(tmp_path / kind)
        assert original.keys() == exported.keys(), f"{kind}: {original.keys() ^ exported.keys()}"
        for name in original:
            assert torch.equal(original[name], exported[name]), f"{kind} {layout}: {name} differs"
        if kind == "dsv3_moe":  # the multi-token-prediction layer came through, and the config says so
            import json

            assert any(n.startswith("model.layers.4.") for n in exported)
            assert json.loads((tmp_path / kind / "config.json").read_text())["num_nextn_predict_layers"] == 1


def _quantize_fp8(folder: Path, out: Path, block: int) -> dict:
    """DeepSeek-V3's release format: every projection fp8 (e4m3) with one float32 `weight_scale_inv` per
    block x block tile, quantization_config in config.json. Returns the tensors dequantized by the
    formula, in bf16, as the oracle."""
    import json

    from safetensors.torch import save_file

    tensors, quantized, expected = load_file(folder / "model.safetensors"), {}, {}
    for name, w in tensors.items():
        if not (name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")):
            quantized[name] = expected[name] = w
            continue
        rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
        padded = torch.zeros(rows * block, cols * block)
        padded[:w.shape[0], :w.shape[1]] = w
        tiles = padded.reshape(rows, block, cols, block)
        scale = tiles.abs().amax(dim=(1, 3)) / 448.0
        q = (tiles / scale[:, None, :, None]).reshape_as(padded)[:w.shape[0], :w.shape[1]].to(torch.float8_e4m3fn)
        quantized[name], quantized[name + "_scale_inv"] = q, scale
        full_scale = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:w.shape[0], :w.shape[1]]
        expected[name] = (q.float() * full_scale).to(torch.bfloat16)
    out.mkdir()
    save_file(quantized, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((folder / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": [block, block]}
    (out / "config.json").write_text(json.dumps(hf))
    return expected


def test_fp8_checkpoint_is_dequantized_under_tp2(checkpoints, tmp_path):
    """A block-quantized fp8 DeepSeek-V3 checkpoint loads under TP=2, each rank dequantizing only its rows
    (blocks of 16 do not align with the shards), equal to transformers' model holding the same weights
    dequantized by the formula; the export, its multi-token-prediction layer too, is those weights."""
    from safetensors.torch import save_file
    from transformers import DeepseekV3ForCausalLM

    source, ids, _ = checkpoints["dsv3_moe"]
    fp8 = tmp_path / "fp8"
    expected = _quantize_fp8(source, fp8, block=16)
    dequantized = tmp_path / "dequantized"  # transformers' loader fuses experts: give it a folder
    dequantized.mkdir()
    save_file({k: v.float() for k, v in expected.items()}, str(dequantized / "model.safetensors"),
              metadata={"format": "pt"})
    (dequantized / "config.json").write_bytes((source / "config.json").read_bytes())
    with torch.no_grad():
        ref = DeepseekV3ForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()(ids).logits.double()
    per_rank = spawn(2, _convert_on_ranks, ("dsv3_moe",), 2, 1, 1, {"dsv3_moe": str(fp8)}, {"dsv3_moe": ids},
                     str(tmp_path / "out"))
    for rank_logits in per_rank:
        assert rel(rank_logits["dsv3_moe"], ref) < 1e-5
    exported = _tensors(tmp_path / "out" / "dsv3_moe")
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(exported[name].float(), tensor.float()), name
