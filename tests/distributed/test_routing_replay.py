"""MoE routing replay: the routers take the recorded experts, even ones they would never choose, and the
loss and gradients equal a hand-routed reference.

Oracle: transformers' DeepSeek-V3 (sigmoid routing with an expert bias over groups, a shared expert)
whose router is replaced by the crafted experts, weighted as DeepSeek weights them (the unbiased sigmoid
scores of the chosen experts, renormalised, scaled). The megatron side runs r1mega's path: a THD pack of
two rows of different lengths with the routing laid out like its tokens, under TP=1 and TP=2 with
sequence parallelism (each rank's routers see their slice of the pack).
"""

from __future__ import annotations

import pytest
import torch

from sglang_standin import checkpoint_view

from r1mega.config.schema import ParallelConfig
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

VOCAB, E, K = 64, 8, 2
LENGTHS, PROMPT = (9, 6), 3  # two rows: prompt 3 tokens, then the response


def _hf_model():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=E,
                              num_experts_per_tok=K, moe_intermediate_size=16, n_shared_experts=1,
                              routed_scaling_factor=2.5, n_group=2, topk_group=1, first_k_dense_replace=1)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    return model


def _crafted(n_moe: int):
    """Per row [len - 1, M, K] distinct experts, chosen at random: mostly not what a router would pick
    (and across groups, which group-limited routing never mixes)."""
    g = torch.Generator().manual_seed(5)
    return [torch.stack([torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n_moe)])
                         for _ in range(n - 1)]).to(torch.int16) for n in LENGTHS]


def _hand_routed_reference(folder, tokens, routing, weights):
    """Loss and gradients of transformers' model with every MoE router replaced by the crafted experts."""
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    moe_layers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    loss = 0.0
    for row, (ids, chosen) in enumerate(zip(tokens, routing)):
        for m, gate in enumerate(moe_layers):
            def forward(hidden, gate=gate, idx=chosen[:, m].long()):
                logits = torch.nn.functional.linear(hidden.view(-1, hidden.shape[-1]).float(), gate.weight.float())
                weights_ = logits.sigmoid().gather(1, idx)
                weights_ = weights_ / (weights_.sum(-1, keepdim=True) + 1e-20) * gate.routed_scaling_factor
                return logits, weights_, idx
            gate.forward = forward
        out = model(ids[None, :-1]).logits[0]
        loss = loss + (out[PROMPT - 1:] * weights[row]).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def _replayed_on_ranks(folder, tokens, routing, weights, tp):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from r1mega.checkpoint.hf_config import model_config_from_hf
    from r1mega.checkpoint.hf_convert import iter_hf_tensors, load_hf_weights
    from r1mega.models.builder import build_model
    from r1mega.models.routing_replay import install, mismatch_counts
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.forward_backward import run_schedule
    from r1mega.trainer.rl.batch import StepBatch, pack

    parallel = ParallelConfig(tp=tp, sequence_parallel=tp > 1)
    initialize(parallel, seed=3)
    try:
        cfg = model_config_from_hf(folder)
        chunks = build_model(cfg, parallel)
        load_hf_weights(chunks, cfg, folder)
        install(chunks)
        batch = StepBatch(list(tokens), [PROMPT, PROMPT], torch.zeros(2),
                          [torch.zeros(n - PROMPT) for n in LENGTHS], routing=list(routing))
        micro = pack(batch, [0, 1], multiple=tp * 2)
        chosen = {}

        def capture(module, args, output):  # the routing map each router used: [tokens, E]
            chosen.setdefault(module.layer_number, []).append(output[1].detach().clone())

        hooks = [layer.mlp.router.register_forward_hook(capture) for layer in chunks[0].decoder.layers
                 if hasattr(layer.mlp, "router")]

        def loss_fn(m, logits):
            full = gather_from_tensor_model_parallel_region(logits)  # [1, K, V]
            per_row = torch.cat([weights[0], weights[1]])
            loss = (full[0] * per_row).sum()
            return loss, {"loss": loss.detach()}

        out = run_schedule(chunks, [micro], loss_fn, forward_only=False)
        for h in hooks:
            h.remove()
        with torch.no_grad():  # the gradients, as the parameters' values, exported under HF names
            for p in chunks[0].parameters():
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if tp > 1 and getattr(p, "sequence_parallel", False):  # what megatron's grad finalisation sums
                    torch.distributed.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
                p.copy_(grad)
        grads = {name: t.clone() for name, t, _ in iter_hf_tensors(chunks, cfg)}
        differing, counted = mismatch_counts(chunks)
        maps = {n: torch.cat(v) for n, v in chosen.items()}
        return float(out[0]["loss"]), grads, maps, (differing, counted), ps.get_tensor_model_parallel_rank()
    finally:
        destroy()


@pytest.mark.parametrize("tp", [1, 2])
def test_replayed_routing_equals_hand_routed_reference(tmp_path, tp):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]
    n_moe = 2
    routing = _crafted(n_moe)
    weights = [torch.randn(n - PROMPT, VOCAB, generator=g) for n in LENGTHS]
    ref_loss, ref_grads = _hand_routed_reference(tmp_path / "hf", tokens, routing, weights)
    per_rank = spawn(tp, _replayed_on_ranks, str(tmp_path / "hf"), tokens, routing, weights, tp)
    loss, grads, maps, (differing, counted), _ = per_rank[0]
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for name, grad in grads.items():
        if name.endswith("e_score_correction_bias"):  # a buffer
            continue
        ref = checkpoint_view(ref_grads, name)  # transformers holds experts fused in memory
        assert torch.allclose(grad, ref, rtol=1e-4, atol=1e-6), f"{name}: {(grad - ref).abs().max():.2e}"
    # every router used the crafted experts: on each rank, its slice of the pack (real tokens first)
    pack_routing = torch.cat(routing)  # [real positions, M, K]
    real = pack_routing.shape[0]
    for _, _, maps, (differing, counted), tp_rank in per_rank:
        assert len(maps) == n_moe
        for m, layer_number in enumerate(sorted(maps)):
            used = maps[layer_number]
            first = tp_rank * used.shape[0]
            for t in range(min(used.shape[0], real - first)):
                want = torch.zeros(E, dtype=torch.bool)
                want[pack_routing[first + t, m].long()] = True
                assert torch.equal(used[t], want), (layer_number, first + t)
        # the crafted experts are mostly not what the routers would choose; padding is not counted
        mine = max(0, min(used.shape[0], real - first))
        assert counted == n_moe * mine and differing > 0.5 * counted
