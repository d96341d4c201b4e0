"""Pieces of the RL trainer that need no process group: batches, the warm-up corpus, metrics files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from r1mega.data.corpus import TaskCorpus, carry_columns, column_addition, worked_response
from r1mega.data.tasks import make_task
from r1mega.rewards.accuracy import accuracy
from r1mega.rewards.format import format_reward
from r1mega.rewards.stack import RewardInput
from r1mega.rollout.types import Rollouts, SamplingParams
from r1mega.trainer.metrics import plot_curves, read_rows
from r1mega.data.packing import split_rows
from r1mega.trainer.rl.batch import StepBatch, collate, response_values


def _batch():
    rollouts = Rollouts(prompt_ids=[[1, 2, 3], [4, 5], [6]], response_ids=[[7, 8], [9, 10, 11, 12], [13]],
                        logprobs=[[-0.1, -0.2], [-0.3, -0.4, -0.5, -0.6], [-0.7]], finish_reasons=["stop"] * 3,
                        group_index=[0, 0, 1])
    return StepBatch.from_rollouts(rollouts, torch.tensor([1.0, -1.0, 0.5]))


def test_collate_aligns_targets_mask_and_logprobs():
    batch = _batch()
    m = collate(batch, [0, 1, 2])
    # row 0: tokens 1 2 3 | 7 8 -> inputs 1 2 3 7, targets 2 3 7 8, response targets at positions 2, 3
    assert m.tokens[0].tolist() == [1, 2, 3, 7, 0] and m.targets[0].tolist() == [2, 3, 7, 8, 0]
    assert m.mask[0].tolist() == [False, False, True, True, False]
    assert m.targets[0][m.mask[0]].tolist() == [7, 8]
    assert m.targets[1][m.mask[1]].tolist() == [9, 10, 11, 12]
    assert m.targets[2][m.mask[2]].tolist() == [13]
    assert torch.allclose(m.rollout_logp[1][m.mask[1]], torch.tensor([-0.3, -0.4, -0.5, -0.6]))
    assert m.advantages.tolist() == [1.0, -1.0, 0.5]
    back = response_values(m, m.rollout_logp)
    assert [len(v) for v in back] == [2, 4, 1]
    assert collate(batch, [0, 1], multiple=4).tokens.shape[1] == 8  # padded for sequence parallelism


def test_collate_windows_per_token_fields_from_the_first_response_position():
    batch = _batch()
    m = collate(batch, [0, 1])  # prompts of 3 and 2 tokens: row 1's response is predicted from position 1
    assert m.logits_from == 1 and m.tokens.shape == (2, 5) and m.targets.shape == m.mask.shape == (2, 4)
    assert m.targets[0].tolist() == [3, 7, 8, 0] and m.mask[0].tolist() == [False, True, True, False]
    assert m.targets[1].tolist() == [9, 10, 11, 12] and m.mask[1].all()
    back = response_values(m, m.rollout_logp)
    assert torch.allclose(back[0], torch.tensor([-0.1, -0.2])) and torch.allclose(back[1], torch.tensor([-0.3, -0.4,
                                                                                                          -0.5, -0.6]))


def test_split_rows_respects_the_budget_and_min_parts():
    lengths = [10, 3, 7, 7, 2, 9]
    groups = split_rows(lengths, range(6), token_budget=20)
    assert sorted(sum(groups, [])) == list(range(6))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 20 or len(g) == 1
    assert len(split_rows(lengths, range(6), token_budget=1000, min_parts=3)) == 3


@pytest.mark.parametrize("seed", range(5))
def test_column_addition_is_right_and_the_slip_is_wrong(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        a, b = (int(x) for x in rng.integers(0, 10_000, size=2))
        work, total = column_addition(a, b)
        assert total == a + b and work.count("=") == max(len(str(a)), len(str(b)))
        for column in carry_columns(a, b):  # dropping a carry always changes the sum
            assert column_addition(a, b, drop_carry_at=column)[1] != a + b


def test_worked_responses_score_as_intended():
    rng = np.random.default_rng(0)
    for name in ("arithmetic", "countdown"):
        for record in make_task(name, "train", 50, seed=3):
            right = worked_response(record, True, rng)
            sample = RewardInput(right, record.answer, record.data_source, record.metadata)
            assert format_reward(right) == 1.0 and accuracy(sample) == 1.0, right
            wrong = worked_response(record, False, rng)
            assert format_reward(wrong) == 1.0
            if wrong != right:
                assert accuracy(RewardInput(wrong, record.answer, record.data_source, record.metadata)) == 0.0


def test_task_corpus_rows_split_over_ranks_and_resume():
    stream = list(range(1000))
    full = TaskCorpus(stream, seq_length=9, global_batch_size=4, micro_batch_size=2)
    halves = [TaskCorpus(stream, 9, 4, 2, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(30):  # wraps around the 100 rows
        whole = torch.cat(full.next_micro_batches())
        parts = torch.cat([torch.cat(h.next_micro_batches()) for h in halves])
        assert torch.equal(whole, parts) and whole.shape == (4, 10)
    again = TaskCorpus(stream, 9, 4, 2)
    again.load_state_dict(full.state_dict())
    assert torch.equal(torch.cat(again.next_micro_batches()), torch.cat(full.next_micro_batches()))


def test_metrics_file_and_plot(tmp_path):
    file = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "reward/mean": i / 10, "reward/accuracy": i / 20, "response/length_mean": 30 - i}
            for i in range(1, 6)]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "rew')  # torn last line
    assert read_rows(file) == rows
    png = plot_curves(file)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sampling_params_refuse_bad_values():
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=0), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=0).logprob_temperature == 1.0
