"""The per-token GRPO math of the CUDA loss kernel (kernels/csrc/grpo_loss_math.cuh), compiled
for the CPU with g++, against the PyTorch definitions it follows (clipped_surrogate, the TIS
weight, kl_penalty) and their autograd gradients: values and d/dlogp, with clipping on both
sides, dual clip, log-ratios past the +-20 clamps (and exactly on them), zero advantages, and
masked positions holding NaN and inf."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from r1mega.algorithms.kl import kl_penalty
from r1mega.algorithms.policy_loss import clipped_surrogate, log_ratio

ROOT = Path(__file__).resolve().parents[2]
KL_MODES = {0: None, 1: "k1", 2: "k2", 3: "k3"}


@pytest.fixture(scope="module")
def host_binary(tmp_path_factory) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    out = tmp_path_factory.mktemp("grpo_math") / "grpo_loss_host"
    subprocess.run(["g++", "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'kernels/csrc'}",
                    str(ROOT / "tests/unit/csrc/grpo_loss_host.cpp"), "-o", str(out)], check=True)
    return out


def _inputs(seed: int, n: int = 4000):
    g = torch.Generator().manual_seed(seed)
    logp = -8 * torch.rand(n, generator=g)
    old = logp + 0.3 * torch.randn(n, generator=g)  # ratios on both sides of the clip range
    ref = logp + 0.5 * torch.randn(n, generator=g)
    adv = torch.randn(n, generator=g)
    adv[::17] = 0.0
    tis = 2 * torch.rand(n, generator=g)
    far = torch.arange(0, n, 53)
    old[far] = logp[far] + torch.where(torch.rand(len(far), generator=g) < 0.5, -25.0, 25.0)  # past the clamp
    ref[far + 1] = logp[far + 1] + torch.where(torch.rand(len(far), generator=g) < 0.5, -30.0, 30.0)
    logp[far + 2], old[far + 2], ref[far + 2] = -1.0, -21.0, 19.0  # exactly on the bounds: gradient passes
    logp[far + 3], old[far + 3], ref[far + 3] = -1.0, 19.0, -21.0
    mask = torch.rand(n, generator=g) < 0.85
    mask[far + 2] = mask[far + 3] = True
    off = (~mask).nonzero().flatten()
    logp[off[::3]], old[off[1::3]], ref[off[2::3]] = float("nan"), float("inf"), -float("inf")
    return mask, logp, old, ref, adv, tis


def _host(binary: Path, tmp_path: Path, params, arrays):
    mask, logp, old, ref, adv, tis = arrays
    n = len(mask)
    eps_low, eps_high, dual_clip, kl_mode = params
    data = struct.pack("<qddfi", n, eps_low, eps_high, dual_clip or 0.0, kl_mode)
    data += mask.numpy().astype(np.uint8).tobytes()
    data += b"".join(t.numpy().astype(np.float32).tobytes() for t in (logp, old, ref, adv, tis))
    (tmp_path / "in.bin").write_bytes(data)
    subprocess.run([str(binary), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    out = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float32).reshape(5, n))
    return dict(zip(("pg", "kl", "ratio", "g_pg", "g_kl"), out))


def _reference(params, arrays):
    eps_low, eps_high, dual_clip, kl_mode = params
    mask, logp, old, ref, adv, tis = (t[None] for t in arrays)
    lp = logp.clone().requires_grad_(True)
    pg, _ = clipped_surrogate(lp, old, adv, mask, eps_low, eps_high, dual_clip)
    pg = pg * torch.where(mask, tis, 0.0)  # policy_loss multiplies by the (0 off-mask) TIS weights
    g_pg, = torch.autograd.grad(pg.sum(), lp)
    out = {"pg": pg.detach()[0], "g_pg": g_pg[0], "ratio": log_ratio(logp, old, mask).exp()[0]}
    if KL_MODES[kl_mode] is None:
        out["kl"] = out["g_kl"] = torch.zeros_like(out["pg"])
    else:
        lp = logp.clone().requires_grad_(True)
        kl = kl_penalty(lp, ref, KL_MODES[kl_mode], mask)
        g_kl, = torch.autograd.grad(kl.sum(), lp)
        out["kl"], out["g_kl"] = kl.detach()[0], g_kl[0]
    return out


@pytest.mark.parametrize("kl_mode", [0, 1, 2, 3])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_host_math_equals_the_pytorch_definitions(host_binary, tmp_path, kl_mode, dual_clip):
    params = (0.2, 0.28, dual_clip, kl_mode)
    arrays = _inputs(seed=kl_mode * 10 + (dual_clip is not None))
    got, want = _host(host_binary, tmp_path, params, arrays), _reference(params, arrays)
    mask = arrays[0]
    for name in ("pg", "kl", "ratio", "g_pg", "g_kl"):
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], want[name].float(), rtol=1e-5, atol=2e-6, msg=name)
        off = 1.0 if name == "ratio" else 0.0
        assert torch.all(got[name][~mask] == off), name  # exactly, whatever padding holds
    ratio = want["ratio"][mask]
    assert (ratio > 1.28).sum() > 50 and (ratio < 0.8).sum() > 50  # both clips are exercised
    clipped = mask & (got["g_pg"] == 0) & (arrays[4] > 0) & (arrays[3] != 0)
    assert clipped.sum() > 50  # and cut the gradient
