"""On-policy distillation's advantages and loss against hand-computed values."""

import torch

from r1mega.algorithms.distill import opd_advantages, reverse_kl
from r1mega.trainer.rl.loss import Surrogate, pytorch_terms

STUDENT = torch.tensor([[-1.0, -2.0, -0.5], [-0.25, -3.0, -9.0]])
TEACHER = torch.tensor([[-1.5, -1.0, -0.5], [-0.25, -1.0, -1.0]])
MASK = torch.tensor([[True, True, False], [True, True, False]])  # the last column is padding


def test_advantage_is_the_teachers_log_prob_minus_the_students():
    adv = opd_advantages(STUDENT, TEACHER, MASK)
    assert adv.tolist() == [[-0.5, 1.0, 0.0], [0.0, 2.0, 0.0]]
    assert reverse_kl(STUDENT, TEACHER, MASK).tolist() == [[0.5, -1.0, 0.0], [0.0, -2.0, 0.0]]


def test_clip_coefficient_and_reward_advantage():
    adv = opd_advantages(STUDENT, TEACHER, MASK, kl_coef=2.0, kl_clip=0.75,
                         reward_advantages=torch.tensor([1.0, -2.0]), reward_weight=0.5)
    # -2 * clip(gap, -0.75, 0.75) + 0.5 * A_row, on the mask only
    assert adv.tolist() == [[-1.0 + 0.5, 1.5 + 0.5, 0.0], [0.0 - 1.0, 1.5 - 1.0, 0.0]]


def test_the_student_equal_to_the_teacher_gets_no_gradient():
    logp = STUDENT.clone().requires_grad_(True)
    adv = opd_advantages(logp, STUDENT, MASK)
    assert not adv.any()
    terms = pytorch_terms(logp, logp.detach(), None, adv, MASK, None, Surrogate(0.2, 0.2, None, "token", 0.0, "k3"),
                          {"mode": "token-mean"})
    (grad,) = torch.autograd.grad(terms.loss, logp)
    assert terms.loss.item() == 0.0 and not grad.any()


def test_loss_and_gradient_by_hand():
    """On-policy (ratio 1), token-mean over the 4 response tokens: loss = -sum(A_t) / 4, and the gradient of
    each token's log-prob is -A_t / 4 (the clip is inactive at ratio 1)."""
    logp = STUDENT.clone().requires_grad_(True)
    adv = opd_advantages(logp, TEACHER, MASK)  # [[-0.5, 1, 0], [0, 2, 0]]
    terms = pytorch_terms(logp, logp.detach(), None, adv, MASK, None, Surrogate(0.2, 0.2, None, "token", 0.0, "k3"),
                          {"mode": "token-mean", "num_tokens": 4.0})
    (grad,) = torch.autograd.grad(terms.loss, logp)
    assert abs(terms.loss.item() - (-(-0.5 + 1.0 + 0.0 + 2.0) / 4)) < 1e-7
    assert torch.allclose(grad, torch.tensor([[0.125, -0.25, 0.0], [0.0, -0.5, 0.0]]))
    # and the reported loss is the sampled reverse KL when the student has not moved
    assert abs(terms.loss.item() - reverse_kl(STUDENT, TEACHER, MASK).sum().item() / 4) < 1e-7
