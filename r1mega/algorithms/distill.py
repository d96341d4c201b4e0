"""On-policy distillation: the student samples, a teacher scores each sampled token.

The per-token reverse KL, KL(pi_student || pi_teacher), has the sampled-token estimate
log pi_student(t) - log pi_teacher(t) (GKD with lambda = 1: the divergence on the student's own
samples). Minimising it by policy gradient gives each token the advantage

    A_t = -(log pi_student(t) - log pi_teacher(t)),

a dense signal: the teacher says, token by token, where the student's choice was worse than its own
would have been. Only the token's own term enters (no discounted sum of later ones): the advantage
of a token does not depend on what the student sampled after it. The student's log-probs are the
proximal policy's (pi_old, the one the PPO ratio is taken against), so with one update per batch
they are the current policy's, detached.
"""

from __future__ import annotations

from typing import Optional

import torch

from r1mega.algorithms.policy_loss import token_advantages


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] sampled-token estimate of KL(student || teacher): log pi_s - log pi_t, 0 off the mask."""
    return torch.where(mask.bool(), student_logp - teacher_logp, torch.zeros_like(student_logp))


def opd_advantages(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float = 1.0, kl_clip: Optional[float] = None,
                   reward_advantages: Optional[torch.Tensor] = None, reward_weight: float = 0.0) -> torch.Tensor:
    """[B, T] per-token advantages, 0 off the mask (detached):

        -kl_coef * clip(log pi_s - log pi_t, -kl_clip, kl_clip) + reward_weight * A_reward

    where A_reward is the row's group advantage of the task reward ([B] or [B, T]). The clip bounds
    what one token can contribute where the teacher finds the student's token almost impossible
    (log-ratios of tens of nats on a token the teacher's tokenizer never produces there)."""
    m = mask.bool()
    gap = reverse_kl(student_logp.detach(), teacher_logp, m)
    if kl_clip is not None:
        gap = gap.clamp(-kl_clip, kl_clip)
    adv = -kl_coef * gap
    if reward_weight and reward_advantages is not None:
        adv = adv + reward_weight * token_advantages(reward_advantages, m, adv)
    return torch.where(m, adv, torch.zeros_like(adv))


def topk_reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] reverse KL over the teacher's top-k tokens at each position plus one bucket for all other tokens:
    KL(p_s || p_t) of the two distributions coarsened onto {v_1 .. v_k, rest}. student_logp, teacher_logp
    [B, T, k + 1] are full-vocabulary log-probs of the same k tokens (the teacher's most likely), then of the
    rest (summed where it lies: 1 minus the k's mass would lose it to rounding once they hold nearly all).
    Exact when the k tokens hold all of both distributions' mass, a lower bound of the full KL otherwise
    (coarsening never raises a divergence); 0 off the mask. Differentiable in student_logp."""
    m = mask.bool()
    p = student_logp.exp()  # a bucket the student gives no mass (log-prob -inf) adds nothing, nor a NaN gradient
    finite = torch.where(p > 0, student_logp, torch.zeros_like(student_logp))
    kl = torch.where(p > 0, p * (finite - teacher_logp), torch.zeros_like(p)).sum(-1)
    return torch.where(m, kl, torch.zeros_like(kl))
