import importlib.util
import os
import re
import shutil
import subprocess

import pytest
import torch

# Ranks share two cores; keep each test process from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _slurm_reachable() -> bool:
    """A running cluster of slurm/local-cluster.sh: the tests submit to its partitions, never to a site's."""
    if shutil.which("scontrol") is None:
        return False
    try:
        proc = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and re.search(r"ClusterName\s*=\s*r1mega-local", proc.stdout) is not None


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA, `sglang` tests without sglang and a GPU, `slurm` tests without a cluster,
    and say so."""
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs CUDA: no GPU on this machine")
    if importlib.util.find_spec("sglang") is None or not torch.cuda.is_available():
        skips["sglang"] = pytest.mark.skip(reason="needs sglang (pip install 'r1mega[sglang]') and a CUDA GPU")
    if any("slurm" in item.keywords for item in items) and not _slurm_reachable():
        skips["slurm"] = pytest.mark.skip(reason="needs the local Slurm cluster: run `slurm/local-cluster.sh start` "
                                          "as root and export the SLURM_CONF it prints")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def fresh_kernel_checks(monkeypatch):
    """r1mega.ops.kernels with no kernel checked yet (passed or failed), restored after the test."""
    from r1mega.ops import kernels

    monkeypatch.setattr(kernels, "_VERIFIED", set())
    monkeypatch.setattr(kernels, "_FAILED", set())
    return kernels
