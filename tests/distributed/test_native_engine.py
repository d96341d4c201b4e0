"""The native engine: KV-cache decoding agrees with the trainer's forward and across layouts.

Greedy fp32 generation under TP=2 and PP=2 gives the single-rank tokens; the engine's
per-token log-probs equal log_softmax of a plain full-sequence forward within 1e-5; sampled
generation is reproducible under a seed and honours stop tokens and the length cap.
"""

from __future__ import annotations

import pytest
import torch

from layout_utils import load_model, logits, save_model
from r1mega.config.schema import ModelConfig, MoEConfig, ParallelConfig
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

VOCAB, EOS, PAD = 96, 3, 0
STOPS = tuple(range(30, 34))  # stop tokens: rows finish at different steps
PROMPTS = [[5, 17, 40, 9, 22, 61, 7], [11, 12], [70, 71, 72, 73], [90]]


def model_config(moe: bool = False) -> ModelConfig:
    cfg = ModelConfig(name="gen", arch="qwen3", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                      num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB, qk_layernorm=True,
                      init_method_std=0.2)  # peaked distributions: sampled text depends on the seed
    if moe:
        cfg.moe = MoEConfig(num_experts=4, ffn_hidden_size=32, router_topk=2, token_dispatcher="alltoall")
    return cfg


def _generate(layouts, root: str, moe: bool = False):
    from megatron.core import parallel_state as ps

    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.rollout.native import NativeEngine
    from r1mega.rollout.types import SamplingParams

    out = {}
    try:
        for name, parallel in layouts:
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            initialize(parallel, seed=3)
            chunks = build_model(model_config(moe), parallel)
            if name == "ref":
                save_model(chunks, f"{root}/init")
            else:
                load_model(chunks, f"{root}/init")
            engine = NativeEngine(chunks, eos_token_ids=[EOS], pad_token_id=PAD, max_batch_size=5)
            greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12), n=1)
            params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=10, seed=7,
                                    stop_token_ids=STOPS)
            events = {"sampled": [], "other": []}
            engine.row_done = lambda row, ids, reason: events["sampled"].append((row, list(ids), reason))
            sampled = [engine.generate(PROMPTS, params, n=3)]
            engine.row_done = None
            sampled.append(engine.generate(PROMPTS, params, n=3))
            engine.max_batch_size = 12  # all four prompts prefilled together, then 3 rows each
            engine.row_done = lambda row, ids, reason: events["other"].append((row, list(ids), reason))
            other = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, seed=8, stop_token_ids=STOPS), n=3)
            engine.row_done = None
            out[f"{name}_events"] = events
            forward = [logits(chunks, torch.tensor([p + r])) for p, r in
                       zip(greedy.prompt_ids + other.prompt_ids, greedy.response_ids + other.response_ids)]
            out[name] = (greedy, sampled, other, forward)
            stats = dict(engine.last_stats)
            engine.prefill_call_positions = 0  # a prefill forward per prompt length: 7, 4, 2, 1
            out[f"{name}_buckets"] = (
                engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12), n=1),
                engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, seed=8, stop_token_ids=STOPS), n=3),
                dict(engine.last_stats))
            if name == "ref":  # FP8's shape rule: batches padded to 16 rows (spare prompts, finished rows)
                out["stats"] = [stats]
                padded = NativeEngine(chunks, eos_token_ids=[EOS], pad_token_id=PAD, max_batch_size=5,
                                      row_multiple=16)
                padded.timed = True
                out["padded"] = [padded.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12), n=n)
                                 for n in (1, 3)]
                out["stats"].append(dict(padded.last_stats))
    finally:
        destroy()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gen"))
    ref = spawn(1, _generate, [("ref", ParallelConfig())], root)[0]
    tp = spawn(2, _generate, [("tp2", ParallelConfig(tp=2))], root)
    pp = spawn(2, _generate, [("pp2", ParallelConfig(pp=2))], root)
    return {"ref": ref["ref"], "tp2": tp[0]["tp2"], "pp2": pp[1]["pp2"], "pp2_first": pp[0]["pp2"],
            "events": ref["ref_events"],
            "padded": ref["padded"], "stats": ref["stats"],
            "buckets": {"ref": ref["ref_buckets"], "tp2": tp[0]["tp2_buckets"], "pp2": pp[1]["pp2_buckets"],
                        "pp2_first": pp[0]["pp2_buckets"]}}


def _check_logprobs(rollouts, forward) -> None:
    for prompt, resp, lps, full in zip(rollouts.prompt_ids, rollouts.response_ids, rollouts.logprobs, forward):
        logp = torch.log_softmax(full[0].double(), dim=-1)
        want = logp[len(prompt) - 1:-1].gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)
        assert len(resp) == len(lps) > 0
        assert torch.allclose(torch.tensor(lps, dtype=torch.float64), want, atol=1e-5, rtol=0)


def test_logprobs_equal_trainer_forward(runs):
    greedy, _, _, forward = runs["ref"]
    _check_logprobs(greedy, forward[:len(greedy)])
    for prompt, resp, full in zip(greedy.prompt_ids, greedy.response_ids, forward):
        # greedy: every chosen token is the forward's argmax
        assert torch.equal(full[0, len(prompt) - 1:-1].argmax(-1), torch.tensor(resp))


def test_shared_prefill_rows_equal_trainer_forward(runs):
    """n samples per prompt decode from one prefill of that prompt, copied to its rows."""
    greedy, _, other, forward = runs["ref"]
    _check_logprobs(other, forward[len(greedy):])
    assert len({tuple(r) for r in other.response_ids[:3]}) > 1  # the copies sample apart


def test_layouts_generate_the_same(runs):
    ref_greedy, ref_sampled, _, _ = runs["ref"]
    for name in ("tp2", "pp2", "pp2_first"):
        greedy, sampled, _, _ = runs[name]
        assert greedy.response_ids == ref_greedy.response_ids, name
        assert torch.allclose(torch.tensor(sum(greedy.logprobs, [])), torch.tensor(sum(ref_greedy.logprobs, [])),
                              atol=1e-5), name
        assert sampled[0].response_ids == ref_sampled[0].response_ids, name


def test_sampling_reproducible_under_seed(runs):
    _, sampled, other, _ = runs["ref"]
    assert sampled[0].response_ids == sampled[1].response_ids
    assert sampled[0].logprobs == sampled[1].logprobs
    assert other.response_ids != sampled[0].response_ids
    assert sampled[0].group_index == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert sampled[0].prompt_ids[3] == PROMPTS[1]


def test_stop_and_length(runs):
    greedy, sampled, other, _ = runs["ref"]
    for rollouts, cap in ((greedy, 12), (sampled[0], 10), (other, 10)):
        for resp, reason, lps in zip(rollouts.response_ids, rollouts.finish_reasons, rollouts.logprobs):
            assert len(resp) == len(lps) <= cap
            stops = {EOS} if rollouts is greedy else {EOS, *STOPS}
            if reason == "stop":
                assert resp[-1] in stops and not stops & set(resp[:-1])
            else:
                assert reason == "length" and len(resp) == cap and not stops & set(resp)
    reasons = sampled[0].finish_reasons + other.finish_reasons
    assert "stop" in reasons and "length" in reasons  # both ends, and the cache was compacted


def test_batches_padded_to_a_row_multiple_generate_the_same(runs):
    """Spare rows (copies of a prompt, kept-on finished rows) and extra left padding change nothing."""
    greedy = runs["ref"][0]
    one, three = runs["padded"]
    assert one.response_ids == greedy.response_ids and one.finish_reasons == greedy.finish_reasons
    assert torch.allclose(torch.tensor(sum(one.logprobs, [])), torch.tensor(sum(greedy.logprobs, [])), atol=1e-5)
    assert three.response_ids == [r for r in greedy.response_ids for _ in range(3)]
    assert three.group_index == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_prefill_statistics(runs):
    """Positions the prefill computes against the prompt tokens among them; the fill-up copies of a
    prompt count as padding. Timing only when asked for (it synchronizes the device)."""
    together, padded = runs["stats"]
    # four prompts (7, 2, 4, 1 tokens) prefilled together, left-padded to 7
    assert (together["prefill_positions"], together["prefill_tokens"]) == (28, 14)
    assert together["prefill_s"] == 0.0 and together["generate_s"] == 0.0
    # n=3 under a 16-row multiple with 5 rows per batch: one prompt per batch, 15 copies of it beside
    assert (padded["prefill_positions"], padded["prefill_tokens"]) == (16 * (7 + 2 + 4 + 1), 14)
    assert 0.0 < padded["prefill_s"] < padded["generate_s"]


def test_prefill_in_length_buckets_generates_the_same(runs):
    """Prompts prefilled a bucket per length (each right-aligned in the cache, attending to keys
    before it) decode as one left-padded prefill does, on every layout; no position is padding."""
    greedy, _, other, _ = runs["ref"]
    for name, (one, three, stats) in runs["buckets"].items():
        assert one.response_ids == greedy.response_ids and one.finish_reasons == greedy.finish_reasons, name
        assert torch.allclose(torch.tensor(sum(one.logprobs, [])), torch.tensor(sum(greedy.logprobs, [])),
                              atol=1e-5), name
        assert three.response_ids == other.response_ids and three.group_index == other.group_index, name
        assert torch.allclose(torch.tensor(sum(three.logprobs, [])), torch.tensor(sum(other.logprobs, [])),
                              atol=1e-5), name
        assert stats["prefill_positions"] == stats["prefill_tokens"] == 14, name


def _mla_decodes(parallel: ParallelConfig):
    from r1mega.config.schema import MLAConfig, YarnConfig
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.rollout.native import NativeEngine
    from r1mega.rollout.types import SamplingParams

    cfg = ModelConfig(name="mla", arch="deepseek_v3", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                      num_attention_heads=4, num_query_groups=4, vocab_size=VOCAB, init_method_std=0.2,
                      mla=MLAConfig(q_lora_rank=16, kv_lora_rank=24, qk_head_dim=16, qk_pos_emb_head_dim=8,
                                    v_head_dim=12, yarn=YarnConfig(factor=4.0, original_max_position_embeddings=8,
                                                                   mscale_all_dim=1.0)))
    initialize(parallel, seed=3)
    try:
        chunks = build_model(cfg, parallel)
        engine = NativeEngine(chunks, eos_token_ids=[EOS], pad_token_id=PAD, max_batch_size=5)
        greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12), n=1)
        sampled = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, seed=8, stop_token_ids=STOPS), n=3)
        rows = greedy.prompt_ids + sampled.prompt_ids
        forward = [logits(chunks, torch.tensor([p + r])) for p, r in
                   zip(rows, greedy.response_ids + sampled.response_ids)]
        return greedy, sampled, forward
    finally:
        destroy()


@pytest.mark.parametrize("tp", [1, 2])
def test_multi_latent_attention_decodes_as_its_forward(tp):
    """DeepSeek-V3's attention (query and KV latents, YaRN past its original length of 8): left-padded
    prompts in one KV cache, then decoding, give each token the log-prob a whole-sequence forward does."""
    greedy, sampled, forward = spawn(tp, _mla_decodes, ParallelConfig(tp=tp))[0]
    _check_logprobs(greedy, forward[:len(greedy)])
    _check_logprobs(sampled, forward[len(greedy):])
    assert max(len(p) + len(r) for p, r in zip(greedy.prompt_ids, greedy.response_ids)) > 8


def test_rows_are_reported_as_they_finish(runs):
    """row_done (what streams rows to the reward workers) hears of every row once, with its final tokens
    and reason and its index in the Rollouts, at the step it finishes: over several decoding batches
    (max_batch_size=5: one prompt's 3 rows each) and in one batch with compaction."""
    _, sampled, other, _ = runs["ref"]
    for events, rollouts in ((runs["events"]["sampled"], sampled[0]), (runs["events"]["other"], other)):
        assert sorted(e[0] for e in events) == list(range(len(rollouts)))
        for row, ids, reason in events:
            assert (ids, reason) == (rollouts.response_ids[row], rollouts.finish_reasons[row])
    events = runs["events"]["other"]  # one decoding batch: stopped rows in the order they stopped, then the capped
    lengths = [len(ids) for _, ids, reason in events if reason == "stop"]
    assert lengths == sorted(lengths) and len(set(lengths)) > 1
    assert [reason for *_, reason in events] == sorted((reason for *_, reason in events), key=lambda r: r == "length")
    assert "length" in {reason for *_, reason in events}
