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


def _coarse_kl(ps: torch.Tensor, pt: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """KL(p_s || p_t) of the two distributions over {ids..., the rest}, from whole distributions [V]."""
    a, b = ps[ids], pt[ids]
    a, b = torch.cat([a, (1 - a.sum()).reshape(1)]), torch.cat([b, (1 - b.sum()).reshape(1)])
    return (a * (a.log() - b.log())).sum()


def _with_rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[..., k + 1]: logp at ids, then the log of every other token's mass (summed where it lies)."""
    others = logp.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([logp.gather(-1, ids), others], dim=-1)


def test_top_k_reverse_kl_is_the_coarsened_and_with_every_token_the_full_reverse_kl():
    from r1mega.algorithms.distill import topk_reverse_kl

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 12, generator=g, dtype=torch.float64).log_softmax(-1).unbind(0)
    mask = torch.tensor([[True, True, False]])
    student, teacher = student[None], teacher[None]
    ids = teacher.topk(4, dim=-1).indices
    kl = topk_reverse_kl(_with_rest(student, ids), _with_rest(teacher, ids), mask)
    for t in range(2):
        assert abs(kl[0, t] - _coarse_kl(student[0, t].exp(), teacher[0, t].exp(), ids[0, t])) < 1e-12
        full = (student[0, t].exp() * (student[0, t] - teacher[0, t])).sum()
        assert 0 <= kl[0, t] <= full  # coarsening never raises a divergence
    assert kl[0, 2] == 0
    every = torch.arange(12).expand(1, 3, 12)  # every token a candidate: the rest is empty (log-prob -inf)
    whole = topk_reverse_kl(_with_rest(student, every), _with_rest(teacher, every), mask)
    assert torch.allclose(whole[0, :2], (student.exp() * (student - teacher)).sum(-1)[0, :2], atol=1e-12)


def test_a_candidate_the_student_cannot_produce_adds_nothing():
    """A teacher candidate past the student's vocabulary has student log-prob -inf: no term, no NaN gradient."""
    from r1mega.algorithms.distill import topk_reverse_kl

    rest_s, rest_t = 1 - torch.tensor([-0.5, -1.5]).exp().sum(), 1 - torch.tensor([-0.7, -1.0, -3.0]).exp().sum()
    student = torch.tensor([[[-0.5, -1.5, float("-inf"), float(rest_s.log())]]], requires_grad=True)
    teacher = torch.tensor([[[-0.7, -1.0, -3.0, float(rest_t.log())]]])
    kl = topk_reverse_kl(student, teacher, torch.tensor([[True]]))
    kl.sum().backward()
    s, t = student.detach()[0, 0, :2], teacher[0, 0]
    want = (s.exp() * (s - t[:2])).sum() + rest_s * (rest_s.log() - rest_t.log())
    assert torch.isclose(kl[0, 0], want) and torch.isfinite(student.grad).all() and student.grad[0, 0, 2] == 0
