"""How r1mega's CUDA extension is found and built: setup.py's ahead-of-time build where CUDA
torch and a toolkit exist (and nothing elsewhere), and the load order prebuilt -> just in time,
a prebuilt extension of other sources being passed over."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest
import torch

from r1mega.ops import kernel_sources, kernels

ROOT = Path(__file__).resolve().parents[2]


def _setup():
    return runpy.run_path(str(ROOT / "setup.py"))  # not as __main__: setup() does not run


def test_sources_are_every_cuda_file_and_the_bindings():
    names = [p.name for p in kernel_sources.sources()]
    assert names[-1] == "bindings.cpp" and set(names[:-1]) == {p.name for p in (ROOT / "kernels/csrc").glob("*.cu")}
    assert len(names) >= 3 and all(p.is_file() for p in kernel_sources.sources())


@pytest.mark.parametrize("edited", ["grpo_logprobs.cu", "grpo_loss_math.cuh", "bindings.cpp", "flags"])
def test_digest_follows_sources_headers_and_flags(tmp_path, monkeypatch, edited):
    before = kernel_sources.digest()
    assert before == kernel_sources.digest() and len(before) == 16
    for p in kernel_sources.sources() + kernel_sources.headers():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(kernel_sources, "CSRC", tmp_path)
    assert kernel_sources.digest() == before
    if edited == "flags":
        monkeypatch.setattr(kernel_sources, "NVCC_FLAGS", [*kernel_sources.NVCC_FLAGS, "-lineinfo"])
    else:
        (tmp_path / edited).write_text((tmp_path / edited).read_text() + "\n// edit\n")
    assert kernel_sources.digest() != before


def test_no_extension_without_cuda_torch_toolkit_or_target(monkeypatch):
    kernel_build = _setup()["kernel_build"]
    import torch.utils.cpp_extension as ext

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert kernel_build() == {}
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(ext, "CUDA_HOME", None)
    assert kernel_build() == {}
    monkeypatch.setattr(ext, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernel_build() == {}  # no GPU to take the archs from, and no TORCH_CUDA_ARCH_LIST
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("R1MEGA_KERNELS", "off")
    assert kernel_build() == {}


@pytest.mark.parametrize("target", ["visible_device", "arch_list"])
def test_extension_with_cuda_torch_toolkit_and_target(monkeypatch, target):
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(ext, "CUDA_HOME", "/usr/local/cuda")
    if target == "visible_device":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    made = {}
    monkeypatch.setattr(ext, "CUDAExtension", lambda name, sources, **kw: made.update(name=name, sources=sources, **kw)
                        or "ext")
    args = _setup()["kernel_build"]()
    assert args["ext_modules"] == ["ext"] and args["cmdclass"]["build_ext"] is ext.BuildExtension
    assert made["name"] == "r1mega._kernels"  # r1mega.ops.kernels.prebuilt imports this name
    assert made["sources"] == [str(p.relative_to(ROOT)) for p in kernel_sources.sources()]
    assert made["depends"] == [str(p.relative_to(ROOT)) for p in kernel_sources.headers()] and made["depends"]
    flags = made["extra_compile_args"]
    assert f"-DR1MEGA_SOURCES_DIGEST={kernel_sources.digest()}" in flags["cxx"]
    assert flags["nvcc"] == kernel_sources.NVCC_FLAGS


@pytest.fixture
def fake_prebuilt(monkeypatch):
    module = types.ModuleType("r1mega._kernels")
    monkeypatch.setitem(sys.modules, "r1mega._kernels", module)
    return module


def test_prebuilt_of_these_sources_is_used(fake_prebuilt):
    fake_prebuilt.sources_digest = kernel_sources.digest()
    assert kernels.prebuilt() is fake_prebuilt


def test_prebuilt_of_other_sources_is_passed_over(fake_prebuilt, caplog):
    fake_prebuilt.sources_digest = "0" * 16
    assert kernels.prebuilt() is None
    assert "built from other sources" in caplog.text


def test_prebuilt_without_sources_on_disk_is_used(fake_prebuilt, monkeypatch, tmp_path):
    """An install from a wheel has no kernels/csrc to compare with."""
    fake_prebuilt.sources_digest = "0" * 16
    monkeypatch.setattr(kernel_sources, "CSRC", tmp_path / "absent")
    assert kernels.prebuilt() is fake_prebuilt


def test_no_prebuilt_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "r1mega._kernels", None)  # import raises ImportError
    assert kernels.prebuilt() is None
