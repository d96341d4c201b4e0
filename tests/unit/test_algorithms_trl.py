"""Cross-check against TRL 1.16's own GRPO/RLOO code where the definitions coincide.

TRL's methods are called unbound on a stand-in `self` carrying only the attributes they read:
`GRPOTrainer._compute_loss` (its model hook returns our fixed log-probs) and the reward-to-
advantage part of `GRPOTrainer/RLOOTrainer._generate_and_score_completions` (generation and
reward hooks return fixed completions and rewards). Mapping: TRL "bnpo"/"dapo" = token-mean,
"grpo" = seq-mean-token-mean, "dr_grpo" = seq-mean-token-sum-norm with norm_length =
max_completion_length; beta > 0 adds the k3 KL per token; importance_sampling_level
"sequence" = GSPO; scale_rewards "group"/"batch"/"none" = grpo/batch_std/drgrpo with the
sample std and eps = 1e-4; RLOO without normalisation = rloo.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from r1mega.algorithms.advantages import group_advantages
from r1mega.algorithms.policy_loss import surrogate_stats
from r1mega.trainer.rl.loss import Surrogate, policy_terms

grpo_module = pytest.importorskip("trl.trainer.grpo_trainer", reason="cross-check needs trl (dev extra)")
rloo_module = pytest.importorskip("trl.trainer.rloo_trainer", reason="cross-check needs trl (dev extra)")

B, T, MAX_COMPLETION = 6, 9, 12
AGGREGATION = {"bnpo": "token-mean", "dapo": "token-mean", "grpo": "seq-mean-token-mean",
               "dr_grpo": "seq-mean-token-sum-norm"}


class _Accelerator:
    """Single-process stand-in for accelerate.Accelerator."""

    device = torch.device("cpu")
    process_index, num_processes, sync_gradients = 0, 1, True

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def _batch(level: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random old/new/ref log-probs, advantages and right-padded masks (garbage but finite off-mask)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).long()
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    # token level: spread ratios across both clip edges; GSPO: deviations around its tiny range
    scale = 0.3 if level == "token" else 1e-3
    logp = old + scale * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    return {"mask": mask, "old": old, "logp": logp, "ref": ref,
            "adv": torch.randn(B, generator=gen, dtype=torch.float64),
            "entropy": torch.rand(B, T, generator=gen, dtype=torch.float64)}


def _trl_loss(batch, loss_type, level, eps_low, eps_high, beta):
    """TRL's _compute_loss on the batch: (loss, gradient w.r.t. logp, logged metrics)."""
    logp = batch["logp"].clone().requires_grad_(True)
    metrics = defaultdict(lambda: defaultdict(list))
    self = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp * 1.0, batch["entropy"], None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION, accelerator=_Accelerator(), _entropy_bonus_enabled=False,
        _metrics=metrics, args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": batch["mask"],
              "advantages": batch["adv"], "old_per_token_logps": batch["old"],
              "ref_per_token_logps": batch["ref"], "num_items_in_batch": batch["mask"].sum()}
    loss = grpo_module.GRPOTrainer._compute_loss(self, None, inputs)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics["train"]


def _our_loss(batch, loss_type, level, eps_low, eps_high, beta):
    """The same loss from the trainer's loss, r1mega.trainer.rl.loss (its PyTorch path):
    (loss, gradient w.r.t. logp, stats, mean k3)."""
    logp = batch["logp"].clone().requires_grad_(True)
    mask = batch["mask"].bool()
    terms = policy_terms(logp, batch["old"], batch["ref"], batch["adv"], mask, None,
                         Surrogate(eps_low, eps_high, None, level, beta, "k3"), mode=AGGREGATION[loss_type],
                         norm_length=MAX_COMPLETION)
    stats = surrogate_stats(terms.ratio, batch["adv"], mask, eps_low, eps_high, None)
    (grad,) = torch.autograd.grad(terms.loss, logp)
    return terms.loss.detach(), grad, stats, (terms.kl.sum() / mask.sum()).item()


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level,eps_low,eps_high", [("token", 0.2, 0.28), ("sequence", 3e-4, 4e-4)])
@pytest.mark.parametrize("loss_type", list(AGGREGATION))
def test_policy_loss_matches_trl(loss_type, level, eps_low, eps_high, beta):
    batch = _batch(level)
    trl_loss, trl_grad, metrics = _trl_loss(batch, loss_type, level, eps_low, eps_high, beta)
    loss, grad, stats, kl_mean = _our_loss(batch, loss_type, level, eps_low, eps_high, beta)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-10, atol=1e-14)
    assert 0 < stats["clip_fraction"].item() < 1  # both clipped and unclipped tokens took part
    if level == "token":  # TRL averages sequence-level clip flags per sequence, not per token
        assert stats["clip_fraction"].item() == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
    if beta:
        assert kl_mean == pytest.approx(metrics["kl"][0], rel=1e-6)


def _groups_of(rewards: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group index [B] of TRL's layout (consecutive blocks of `size`) and the scorable (non-NaN) rows."""
    return torch.arange(rewards.numel()) // size, ~torch.isnan(rewards)


def _generation_stand_in(rewards: torch.Tensor, size: int, generate_outputs: tuple, **attrs) -> SimpleNamespace:
    """`self` for _generate_and_score_completions: fixed completions, the given rewards, no reference model."""
    n = rewards.numel()
    logs = {"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
            "extra": defaultdict(list), "images": []}
    return SimpleNamespace(
        accelerator=_Accelerator(), model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        _generate=lambda prompts: generate_outputs, _tokenizer=SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None, mask_truncated_completions=False, beta=0.0, use_vllm=False,
        vllm_importance_sampling_correction=False, num_iterations=1, num_generations=size,
        args=SimpleNamespace(per_device_train_batch_size=n, steps_per_generation=1,
                             gradient_accumulation_steps=1, gradient_checkpointing_kwargs=None),
        _calculate_rewards=lambda *a: rewards.unsqueeze(-1), reward_weights=torch.ones(1),
        reward_func_names=["score"], _metrics=defaultdict(lambda: defaultdict(list)), _logs=logs,
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False, **attrs)


def _rewards(seed: int) -> torch.Tensor:
    """4 groups of 5 rewards in {0, 0.5, 1} (ties), one all-equal group, some unscorable (NaN)."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (20,), generator=gen).float() / 2
    rewards[5:10] = 1.0
    rewards[[1, 12, 13]] = float("nan")  # groups of 5, 3 and 4 scorable responses
    return rewards


def _completions(n: int) -> tuple[list, list, list]:
    return [[1, 2]] * n, [[3, 4, 5]] * n, ["text"] * n


@pytest.mark.parametrize("scale_rewards,mode", [("group", "grpo"), ("batch", "batch_std"), ("none", "drgrpo")])
def test_advantages_match_trl_scale_rewards(monkeypatch, scale_rewards, mode):
    monkeypatch.setattr(grpo_module, "gather_object", lambda x: x)
    rewards = _rewards(0)
    prompt_ids, completion_ids, texts = _completions(rewards.numel())
    self = _generation_stand_in(
        rewards, 5, (prompt_ids, completion_ids, None, texts, None, {}, None, []),
        environment_factories=None, environments=[], tools=[], scale_rewards=scale_rewards,
        multi_objective_aggregation="sum_then_normalize")
    inputs = [{"prompt": "p"}] * rewards.numel()
    expected = grpo_module.GRPOTrainer._generate_and_score_completions(self, inputs)["advantages"]
    groups, scorable = _groups_of(rewards, 5)
    ours = torch.zeros_like(rewards)
    ours[scorable] = group_advantages(rewards[scorable], groups[scorable], mode, std="sample", eps=1e-4)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_rloo_advantages_match_trl(monkeypatch):
    monkeypatch.setattr(rloo_module, "gather_object", lambda x: x)
    rewards = _rewards(1)
    self = _generation_stand_in(rewards, 5, _completions(rewards.numel()), reward_clip_range=None,
                                normalize_advantages=False,  # RLOO always scores the old policy:
                                _get_per_token_logps_and_entropies=lambda *a, **k: (torch.zeros(20, 3), None, None))
    inputs = [{"prompt": "p"}] * rewards.numel()
    expected = rloo_module.RLOOTrainer._generate_and_score_completions(self, inputs)["advantages"]
    groups, scorable = _groups_of(rewards, 5)
    ours = torch.zeros_like(rewards)
    ours[scorable] = group_advantages(rewards[scorable], groups[scorable], "rloo")
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
