"""Multi-token prediction (model.mtp): a DeepSeek-V3 checkpoint's MTP layer loads into megatron's MTP block
and gives the loss and gradients of DeepSeek-V3's formula; the round trip keeps it bit-exact.

Oracle: the formula computed with transformers' DeepSeek-V3 modules holding the checkpoint's weights (the
main model's final hidden states h; per position i, eh_proj([enorm(embed(t[i+1])); hnorm(h[i])]) through
the MTP layer's decoder layer (transformers' own, loaded from the checkpoint's tensors), then
shared_head.norm and the shared output head, predicting t[i+2]). transformers itself never runs the layer.
The megatron side runs r1mega's path: RL micro-batches (a THD pack of two rows, and padded rows) whose
loss reads the responses, under TP=1, TP=2 with sequence parallelism, PP=2 (the MTP layer on the last
stage with its copy of the embedding) and EP=2.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sglang_standin import checkpoint_view

from r1mega.config.schema import ParallelConfig
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

VOCAB, LAYERS, SCALE = 64, 2, 0.3
LENGTHS, PROMPT = (11, 8), 4  # two rows: prompt 4 tokens, then the response


def _checkpoint(folder: Path) -> None:
    """A tiny DeepSeek-V3 (a dense layer, then DeepSeekMoE) and its MTP layer, as DeepSeek ships it: layer
    num_hidden_layers with its own norms and projection, an MoE decoder layer, and copies of the
    embedding and output head."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                              num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                              num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                              routed_scaling_factor=2.5, n_group=4, topk_group=1, first_k_dense_replace=1,
                              num_nextn_predict_layers=1)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    model.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    mtp, h = f"model.layers.{LAYERS}.", config.hidden_size
    for name, t in list(tensors.items()):
        if name.startswith("model.layers.1."):  # an MoE layer's tensors, drawn afresh
            tensors[mtp + name[len("model.layers.1."):]] = (
                0.3 * torch.randn_like(t) if "norm" not in name else 1 + 0.1 * torch.randn_like(t))
    tensors.update({mtp + "enorm.weight": 1 + 0.1 * torch.randn(h), mtp + "hnorm.weight": 1 + 0.1 * torch.randn(h),
                    mtp + "eh_proj.weight": 0.1 * torch.randn(h, 2 * h),
                    mtp + "shared_head.norm.weight": 1 + 0.1 * torch.randn(h),
                    mtp + "shared_head.head.weight": tensors["lm_head.weight"].clone(),
                    mtp + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone()})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _sequences():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


def _reference(folder: Path, detach: bool):
    """(mean MTP cross-entropy over the response positions, gradients of SCALE x it by HF name)."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    model = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    tensors = load_file(folder / "model.safetensors")
    mtp = f"model.layers.{LAYERS}."
    # transformers builds no MTP layer: load its decoder layer as a copy's layer 1 (an MoE layer there too)
    copy = folder.parent / "as_layer_1"
    copy.mkdir(exist_ok=True)
    renamed = {k: v for k, v in tensors.items() if not k.startswith(mtp)}
    renamed.update({"model.layers.1." + k[len(mtp):]: v for k, v in tensors.items() if k.startswith(mtp)})
    save_file(renamed, str(copy / "model.safetensors"), metadata={"format": "pt"})
    (copy / "config.json").write_bytes((folder / "config.json").read_bytes())
    layer = DeepseekV3ForCausalLM.from_pretrained(copy, dtype=torch.float32,
                                                  attn_implementation="eager").model.layers[1]
    eps, h = model.config.rms_norm_eps, model.config.hidden_size
    norms = {}
    for name in ("enorm", "hnorm", "shared_head.norm"):
        norms[name] = DeepseekV3RMSNorm(h, eps)
        norms[name].weight.data.copy_(tensors[mtp + name + ".weight"])
    eh_proj = torch.nn.Linear(2 * h, h, bias=False)
    eh_proj.weight.data.copy_(tensors[mtp + "eh_proj.weight"])

    total, count = 0.0, 0
    for seq in _sequences():
        ids = seq[None, :-1]
        n = ids.shape[1]
        hidden = model.model(ids).last_hidden_state  # after the final norm, as megatron hands it over
        if detach:
            hidden = hidden.detach()
        following = torch.cat([ids[:, 1:], torch.zeros(1, 1, dtype=ids.dtype)], dim=1)  # t[i+1]; 0 past the end
        emb = model.model.embed_tokens(following)
        if detach:
            emb = emb.detach()
        x = eh_proj(torch.cat([norms["enorm"](emb), norms["hnorm"](hidden)], dim=-1))
        positions = torch.arange(n)[None]
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        x = layer(x, attention_mask=causal, position_ids=positions,
                  position_embeddings=model.model.rotary_emb(x, positions))
        x = x[0] if isinstance(x, tuple) else x
        head = model.lm_head.weight.detach() if detach else model.lm_head.weight
        logits = torch.nn.functional.linear(norms["shared_head.norm"](x), head)[0]
        # position i predicts t[i+2] where the loss reads position i+1 (a response token's prediction)
        for i in range(n - 1):
            if i + 1 >= PROMPT - 1:
                total = total + torch.nn.functional.cross_entropy(logits[i], seq[i + 2])
                count += 1
    mean = total / count
    (SCALE * mean).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for n, p in layer.named_parameters():
        if p.grad is not None:
            grads[mtp + n] = p.grad.clone()
    for name, norm in norms.items():
        grads[f"{mtp}{name}.weight"] = norm.weight.grad.clone()
    grads[mtp + "eh_proj.weight"] = eh_proj.weight.grad.clone()
    return float(mean), grads


def _on_ranks(folder: str, tp: int, pp: int, ep: int, packed: bool, detach: bool, token_weight=None,
              layout=None):
    from megatron.core import parallel_state as ps

    from r1mega.checkpoint.hf_config import model_config_from_hf
    from r1mega.checkpoint.hf_convert import iter_hf_tensors, load_hf_weights
    from r1mega.config.schema import MTPConfig
    from r1mega.models.builder import build_model
    from r1mega.models.mtp import detach_from_trunk, mtp_chunks
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.forward_backward import run_schedule
    from r1mega.trainer.rl.batch import StepBatch, collate, pack

    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, sequence_parallel=tp > 1, pipeline_layout=layout)
    initialize(parallel, seed=3)
    try:
        cfg = replace(model_config_from_hf(folder), mtp=MTPConfig(num_layers=1, loss_scale=SCALE))
        chunks = build_model(cfg, parallel)
        load_hf_weights(chunks, cfg, folder)
        if detach:
            detach_from_trunk(chunks)
        seqs = _sequences()
        batch = StepBatch(seqs, [PROMPT, PROMPT], torch.zeros(2), [torch.zeros(n - PROMPT) for n in LENGTHS])
        micro = pack(batch, [0, 1], multiple=tp * 2) if packed else collate(batch, [0, 1], multiple=tp * 2)

        def no_main_loss(m, logits):  # the gradients are the MTP loss's alone
            return (logits * 0).sum(), {}

        run_schedule(chunks, [micro], no_main_loss, forward_only=False, mtp_token_weight=token_weight)
        means = [float(m) for c in mtp_chunks(chunks) for m in c.mtp_losses]
        with torch.no_grad():  # the gradients, as the parameters' values, exported under HF names
            for p in chunks[0].parameters():
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if tp > 1 and getattr(p, "sequence_parallel", False):  # what megatron's grad finalisation sums
                    torch.distributed.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
                if pp > 1 and getattr(p, "shared_embedding", False) or (
                        pp > 1 and not chunks[0].pre_process and p is chunks[0].embedding.word_embeddings.weight):
                    torch.distributed.all_reduce(grad, group=ps.get_embedding_group())  # the MTP stage's copy
                if ep > 1 and not getattr(p, "allreduce", True):
                    # the expert-parallel ranks are data-parallel replicas of one batch here: an expert's
                    # gradient sums both replicas' tokens, which megatron's data-parallel average halves
                    grad = grad / ep
                p.copy_(grad)
        grads = {name: t.clone() for name, t, writes in iter_hf_tensors(chunks, cfg) if writes}
        return means, grads
    finally:
        destroy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mtp") / "hf"
    _checkpoint(folder)
    return folder


def _check(per_rank, ref_mean, ref_grads, detach: bool, factor: float = 1.0):
    means = [m for r in per_rank for m in r[0]]
    assert means, "no rank ran the MTP layer"
    for mean in means:
        assert abs(mean - ref_mean) <= 1e-5 * ref_mean, (mean, ref_mean)
    grads = {name: g for r in per_rank for name, g in r[1].items()}
    mtp = f"model.layers.{LAYERS}."
    checked = 0
    for name, grad in grads.items():
        if name.endswith("e_score_correction_bias") or (name.startswith(mtp) and "shared_head.head" in name) \
                or name == mtp + "embed_tokens.weight":
            continue  # a buffer; copies of the shared weights
        if detach and not name.startswith(mtp):
            assert not grad.any(), f"{name}: the decoder got a gradient from the MTP loss under RL"
            continue
        ref = checkpoint_view(ref_grads, name) if name in ref_grads or ".experts." in name else None
        ref = torch.zeros_like(grad) if ref is None else factor * ref
        assert torch.allclose(grad, ref, rtol=1e-4, atol=1e-7), f"{name}: {(grad - ref).abs().max():.2e}"
        checked += name.startswith(mtp)
    assert checked > 10


@pytest.mark.parametrize("packed", [True, False], ids=["pack", "padded"])
def test_mtp_loss_and_gradients_equal_deepseek_formula(checkpoint, packed):
    ref_mean, ref_grads = _reference(checkpoint, detach=False)
    per_rank = spawn(1, _on_ranks, str(checkpoint), 1, 1, 1, packed, False)
    _check(per_rank, ref_mean, ref_grads, detach=False)


@pytest.mark.parametrize("layout", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (1, 2, 1, [1, 1])],
                         ids=["tp2", "pp2", "ep2", "pp2-layout"])
def test_mtp_under_parallel_layouts(checkpoint, layout):
    """pp2-layout: the stages given as parallel.pipeline_layout, which names the MTP layer's stage too."""
    tp, pp, ep = layout[:3]
    ref_mean, ref_grads = _reference(checkpoint, detach=False)
    per_rank = spawn(tp * pp * ep, _on_ranks, str(checkpoint), tp, pp, ep, True, False, None,
                     layout[3] if len(layout) > 3 else None)
    _check(per_rank, ref_mean, ref_grads, detach=False)


def test_token_weight_weights_each_position_as_the_steps_loss(checkpoint):
    """RL and SFT steps weight each MTP position as their loss weights a token (the step's global count),
    not by a per-micro-batch mean: twice the mean's weight doubles every gradient, the reported loss stays."""
    counted = sum(1 for n in LENGTHS for i in range(n - 2) if i + 1 >= PROMPT - 1)  # as _reference counts
    ref_mean, ref_grads = _reference(checkpoint, detach=False)
    per_rank = spawn(1, _on_ranks, str(checkpoint), 1, 1, 1, True, False, 2.0 / counted)
    _check(per_rank, ref_mean, ref_grads, detach=False, factor=2.0)


def test_rl_detaches_the_decoder_from_the_mtp_loss(checkpoint):
    """Under RL the MTP loss trains the MTP layers alone: their gradients are the formula's with the
    decoder, embedding and head detached, and every other parameter gets none from it."""
    ref_mean, ref_grads = _reference(checkpoint, detach=True)
    per_rank = spawn(1, _on_ranks, str(checkpoint), 1, 1, 1, True, True)
    _check(per_rank, ref_mean, ref_grads, detach=True)


def _round_trip_on_ranks(folder: str, tp: int, pp: int, out: str):
    from r1mega.checkpoint.hf_config import model_config_from_hf
    from r1mega.checkpoint.hf_convert import load_hf_weights, save_hf
    from r1mega.config.schema import MTPConfig
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize

    parallel = ParallelConfig(tp=tp, pp=pp, sequence_parallel=tp > 1)
    initialize(parallel, seed=3)
    try:
        cfg = replace(model_config_from_hf(folder), mtp=MTPConfig(num_layers=1))
        chunks = build_model(cfg, parallel)
        load_hf_weights(chunks, cfg, folder)
        save_hf(chunks, cfg, out, carry_from=[folder])
    finally:
        destroy()


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_round_trip_through_the_mtp_block_is_exact(checkpoint, tmp_path, layout):
    """HF -> megatron (the MTP layer in megatron's block, not carried) -> HF gives the checkpoint back bit for
    bit, the MTP layer's copies of the embedding and head included."""
    tp, pp = layout
    spawn(tp * pp, _round_trip_on_ranks, str(checkpoint), tp, pp, str(tmp_path / "out"))
    original = load_file(checkpoint / "model.safetensors")
    exported = {}
    for file in (tmp_path / "out").glob("*.safetensors"):
        exported.update(load_file(file))
    assert not any("carried" in f.name for f in (tmp_path / "out").iterdir())  # loaded, so not carried
    assert original.keys() == exported.keys(), original.keys() ^ exported.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_mtp_layer_whose_head_differs_is_refused(checkpoint, tmp_path):
    """megatron's MTP layers share the model's head; a checkpoint whose MTP head differs cannot load into
    them, and the message names the tensor (carrying it, without model.mtp, still works)."""
    folder = tmp_path / "hf"
    folder.mkdir()
    tensors = load_file(checkpoint / "model.safetensors")
    tensors[f"model.layers.{LAYERS}.shared_head.head.weight"] += 1
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    with pytest.raises(Exception, match=f"model.layers.{LAYERS}.shared_head.head.weight differs from lm_head"):
        spawn(1, _round_trip_on_ranks, str(folder), 1, 1, str(tmp_path / "out"))
