"""The log-prob kernels' first-use check, on the CPU with the kernels emulated in their own fp32
order (logprob_kernel_emulation.py): a sound kernel passes on peaked rows of a Qwen-sized
vocabulary, where its reduction order alone moves a confident row's log-prob and entropy by a
few 1e-6 (a norm-relative 1e-6 bound fails it), and the dispatch then takes the kernel; a wrong
kernel fails the check and the reference runs instead, in this process from then on."""

from __future__ import annotations

import logging

import pytest
import torch

import logprob_kernel_emulation as emulation
from r1mega.ops import kernels, logprobs, logprobs_kernel

VOCAB = 151_936


@pytest.fixture
def emulated(monkeypatch, fresh_kernel_checks):
    def use(**kw):
        seen: list = []
        monkeypatch.setattr(logprobs_kernel, "load", lambda: emulation.kernels(rows_seen=seen, **kw))
        monkeypatch.setattr(logprobs, "available", lambda *tensors: True)
        return seen
    return use


def _confident_batch(dtype, rows=24, seed=0):
    """A policy's rows after some training: most of the mass on the sampled token."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(rows, VOCAB, generator=g)
    targets = torch.randint(0, VOCAB, (rows,), generator=g)
    logits.scatter_(1, targets[:, None], 14.0 + 4 * torch.rand(rows, 1, generator=g))
    return logits.to(dtype), targets


def _float64(logits, targets, temperature):
    logp, entropy = logprobs.token_logprobs(logits.double(), targets, temperature=temperature, with_entropy=True)
    return logp, entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sound_kernel_passes_on_confident_rows_and_runs(emulated, dtype):
    seen = emulated()
    logits, targets = _confident_batch(dtype)
    logp, entropy = logprobs.token_logprobs(logits, targets, temperature=0.7, with_entropy=True)
    assert seen[-1] == len(targets)  # the batch went through the kernel
    assert not kernels.failed(f"logprobs[{dtype}]") and not kernels.failed(f"logprobs[{dtype}] backward")
    want_logp, want_entropy = _float64(logits, targets, 0.7)
    got, want = torch.cat([logp, entropy]).double(), torch.cat([want_logp, want_entropy])
    assert float((got - want).abs().max()) < 1e-4
    assert float((got - want).norm() / want.norm()) > 1e-6  # what a norm-relative 1e-6 check refused


def test_wrong_kernel_gives_way_to_the_reference(emulated, caplog):
    seen = emulated(wrong_temperature=True)
    logits, targets = _confident_batch(torch.float32, seed=1)
    with caplog.at_level(logging.ERROR, logger="r1mega.ops.kernels"):
        logp, entropy = logprobs.token_logprobs(logits, targets, temperature=0.7, with_entropy=True)
    assert kernels.failed("logprobs[torch.float32]")
    assert "disagrees with its reference" in caplog.text and "reference runs instead" in caplog.text
    assert len(targets) not in seen  # only the check's rows reached the kernel
    want_logp, want_entropy = logprobs.token_logprobs(logits, targets, temperature=0.7, with_entropy=True)
    assert torch.equal(logp, want_logp) and torch.equal(entropy, want_entropy)
    before = len(seen)
    logprobs.token_logprobs(logits, targets, temperature=1.0)
    assert len(seen) == before  # checked once per process: the kernel is not tried again
