"""What r1mega asks of Transformer Engine and flash-attn before anything starts: FP8 without a usable
TE is refused (exit 2, one line), FP8 model shapes TE would refuse are named, FP8 parameters are
made on the GPU, and a package that is installed but does not import counts as absent, with one
warning line, while SDPA takes over."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
import torch

from r1mega.config.loader import load_config
from r1mega.config.validate import ConfigError
from r1mega.platform import installed


@pytest.mark.skipif(installed.transformer_engine(), reason="Transformer Engine is usable here: FP8 runs")
def test_fp8_without_transformer_engine_is_refused_before_any_process_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli.train", "model.dtype=bf16", "model.fp8.format=e4m3",
                           f"trainer.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("r1mega: error:")]
    assert len(lines) == 1 and "model.fp8.format=e4m3 needs Transformer Engine, which is not usable here" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before the run folder or any rank


@pytest.mark.parametrize("overrides,needle", [
    (["model.fp8.param=true"], "model.fp8.param=true needs model.fp8.format"),
    (["model.dtype=bf16", "model.fp8.format=e4m3", "model.ffn_hidden_size=200"],
     "model.ffn_hidden_size / parallel.tp = 200 to be a multiple of 16"),
    (["model.dtype=bf16", "model.fp8.format=e4m3", "model.fp8.recipe=mxfp8", "model.ffn_hidden_size=240"],
     "model.ffn_hidden_size / parallel.tp = 240 to be a multiple of 32 (recipe mxfp8)"),
    (["model.dtype=bf16", "model.fp8.format=e4m3", "pretrain.seq_length=100"],
     "pretrain.seq_length=100 must be a multiple of 16"),
])
def test_fp8_shapes_transformer_engine_refuses_are_named(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert needle in str(err.value)


def test_fp8_model_shapes_that_fit_pass():
    cfg = load_config(["model.dtype=bf16", "model.fp8.format=e4m3", "model.fp8.recipe=mxfp8"])
    assert cfg.model.fp8.recipe == "mxfp8"


def test_fp8_parameters_are_made_on_the_gpu():
    """TE quantizes FP8 parameters as they are made, into CUDA memory from a source it reads as
    CUDA memory: megatron's CPU initialization would hand it host pointers."""
    from r1mega.config.schema import FP8Config, ModelConfig, ParallelConfig
    from r1mega.models.builder import transformer_config

    base = dict(name="t", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, vocab_size=128, dtype="bf16")
    make = lambda fp8: transformer_config(ModelConfig(**base, fp8=fp8), ParallelConfig())  # noqa: E731
    assert make(FP8Config()).use_cpu_initialization
    assert make(FP8Config(format="e4m3")).use_cpu_initialization  # bf16 parameters: layout-independent init
    assert not make(FP8Config(format="e4m3", param=True)).use_cpu_initialization


@pytest.fixture
def broken_flash_attn(tmp_path, monkeypatch):
    """A flash_attn package built against another torch: found on disk, fails on import."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
        "_ZN3c105ErrorC2ENS_14SourceLocationESs')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    installed.flash_attn.cache_clear()
    yield
    installed.flash_attn.cache_clear()
    sys.modules.pop("flash_attn", None)


def test_flash_attn_that_does_not_import_falls_back_to_sdpa(broken_flash_attn, monkeypatch, caplog):
    from r1mega.models.specs import resolve_backend

    monkeypatch.setattr(installed, "transformer_engine", lambda: False)
    with caplog.at_level(logging.WARNING, logger="r1mega.platform.installed"):
        assert resolve_backend("auto") == "sdpa"
        assert resolve_backend("auto") == "sdpa"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "flash_attn is installed but does not import" in warnings[0]
    assert "undefined symbol" in warnings[0] and "using SDPA attention instead" in warnings[0]
    with pytest.raises(ConfigError, match="model.attention_backend=flash needs flash-attn"):
        from r1mega.config.validate import check_installed

        check_installed(load_config(["model.attention_backend=flash"]).model)


@pytest.mark.parametrize("te_version, fp8, refused", [
    ("2.4.0", False, ">= 2.5"),
    ("2.4.0+cu12", True, ">= 2.5"),
    ("2.5.0", True, ">= 2.6"),
    ("2.5.0", False, None),
    ("2.6.0.post1", True, None),
    ("2.10.0", True, None),
])
def test_mla_under_context_parallelism_needs_a_transformer_engine_that_serves_it(te_version, fp8, refused):
    from r1mega.models.builder import check_mla_context_parallel

    if refused is None:
        check_mla_context_parallel("deepseek-v3", te_version, fp8)
        return
    with pytest.raises(RuntimeError, match=f"deepseek-v3.*{re.escape(refused)}.*installed: {re.escape(te_version)}"):
        check_mla_context_parallel("deepseek-v3", te_version, fp8)
