"""DeepSeek-V3's architecture on a GPU: multi-latent attention (with YaRN) and DeepSeekMoE, converted from
transformers' model, give its logits; the tiny preset runs GRPO steps, the native engine decoding it with
the trainer's log-probs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from r1mega.platform.launch import spawn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from layout_utils import logits, rel  # noqa: E402
from rl_helpers import run  # noqa: E402
from test_hf_parity import VOCAB, _hf_model  # noqa: E402

pytestmark = pytest.mark.gpu


KINDS = ("dsv3", "dsv3_moe")


def _logits_on_gpu(paths: dict, ids: dict) -> dict:
    from r1mega.checkpoint.hf_config import model_config_from_hf
    from r1mega.checkpoint.hf_convert import load_hf_weights
    from r1mega.config.schema import ParallelConfig
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize

    initialize(ParallelConfig(), seed=7)
    try:
        out = {}
        for kind, path in paths.items():
            cfg = model_config_from_hf(path)
            chunks = build_model(cfg, ParallelConfig())
            load_hf_weights(chunks, cfg, path)
            out[kind] = logits(chunks, ids[kind].cuda()).cpu()
        return out
    finally:
        destroy()


def test_deepseek_v3_logits_match_transformers_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    paths, ids, ref = {}, {}, {}
    for i, kind in enumerate(KINDS):
        torch.manual_seed(200 + i)
        model = _hf_model(kind).eval()
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.copy_(0.5 * torch.randn_like(b))
        model.save_pretrained(tmp_path / kind)
        paths[kind] = str(tmp_path / kind)
        ids[kind] = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            ref[kind] = model(ids[kind]).logits.double()
    got = spawn(1, _logits_on_gpu, paths, ids, timeout=600.0)[0]
    for kind in KINDS:
        error = rel(got[kind], ref[kind])
        assert error < 1e-4, f"{kind}: logits relative error {error:.2e} on the GPU"


def test_tiny_dsv3_grpo_steps_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = spawn(1, run, ["model=tiny_dsv3", "model.num_query_groups=4", "trainer.steps=2",
                         "trainer.eval_at_ends=false"], str(tmp_path / "run"), 1, timeout=600.0)[0]
    assert [m["step"] for m in out] == [1, 2]
    for m in out:
        assert m["loss"] == m["loss"] and m["grad_norm"] == m["grad_norm"]
        assert m["logprob_gap_max"] < 1e-3, m["logprob_gap_max"]  # the engine's and the trainer's log-probs
