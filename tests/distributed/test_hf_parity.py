"""Converted megatron models reproduce transformers' logits under every layout; HF -> megatron -> HF is exact.

Oracle: transformers' own Qwen2 / Qwen3 / Qwen3-MoE / DeepSeek-V3 classes, random weights from a config
(DeepSeek-V3's multi-latent attention with and without a query latent, with YaRN past its original length).
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


def _hf_model(kind: str):
    from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    if kind == "dsv3_moe":  # DeepSeekMoE after a dense layer: sigmoid routing with an expert bias, 1 of 4 groups
        moe = dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=1, n_shared_experts=1,
                   moe_intermediate_size=16, routed_scaling_factor=2.5, first_k_dense_replace=1)
        return DeepseekV3ForCausalLM(DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, **moe, q_lora_rank=20,
                                                      kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                                      v_head_dim=12))
    if kind.startswith("dsv3"):  # multi-latent attention, every layer dense
        mla = dict(kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=4,
                   num_key_value_heads=4)
        if kind == "dsv3":  # query latent; YaRN, which the 12 positions outgrow (original length 8)
            rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
            return DeepseekV3ForCausalLM(DeepseekV3Config(**{**COMMON, **mla}, q_lora_rank=20, rope_parameters=rope,
                                                          max_position_embeddings=32))
        return DeepseekV3ForCausalLM(DeepseekV3Config(**{**COMMON, **mla}, q_lora_rank=None))  # V2-Lite's queries

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
    for i, kind in enumerate(("qwen2", "qwen3", "qwen3_moe", "dsv3", "dsv3_q", "dsv3_moe")):
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
        ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            out[kind] = (root / kind, ids, model(ids).logits.double())
    return out


def _convert_on_ranks(kinds, tp: int, pp: int, ep: int, paths, ids, out_root: str):
    from r1mega.checkpoint.hf_config import model_config_from_hf
    from r1mega.checkpoint.hf_convert import load_hf_weights, save_hf
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize

    results = {}
    initialize(ParallelConfig(tp=tp, pp=pp, ep=ep), seed=7)
    try:
        for kind in kinds:
            parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, sequence_parallel=tp > 1 and kind.endswith("moe"))
            model_cfg = model_config_from_hf(paths[kind])
            chunks = build_model(model_cfg, parallel)
            load_hf_weights(chunks, model_cfg, paths[kind])
            results[kind] = logits(chunks, ids[kind])
            save_hf(chunks, model_cfg, f"{out_root}/{kind}")
    finally:
        destroy()
    return results


LAYOUTS = [  # (tp, pp, ep), models
    ((1, 1, 1), ("qwen2", "qwen3", "qwen3_moe", "dsv3", "dsv3_q", "dsv3_moe")),
    ((2, 1, 1), ("qwen2", "qwen3", "qwen3_moe", "dsv3", "dsv3_q", "dsv3_moe")),
    ((1, 2, 1), ("qwen2", "qwen3", "qwen3_moe", "dsv3", "dsv3_moe")),
    ((2, 2, 1), ("qwen2", "qwen3")),
    ((1, 1, 2), ("qwen3_moe", "dsv3_moe")),
    ((2, 1, 2), ("qwen3_moe", "dsv3_moe")),
]


def _tensors(folder: Path) -> dict:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("layout,kinds", LAYOUTS, ids=[f"tp{t}pp{p}ep{e}" for (t, p, e), _ in LAYOUTS])
def test_logits_and_roundtrip(checkpoints, tmp_path, layout, kinds):
    from r1mega.models.megatron_fixes import mla_builds_here

    kinds = tuple(k for k in kinds if mla_builds_here() or not k.startswith("dsv3"))
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
