"""Training checkpoints: saved under TP=2, PP=2 or DP=2, resumed under TP=1 or another layout.

A resumed run must compute the logits of the saved model and take the same next step as the
run that never stopped (same data batch, same Adam moments and step count, same lr).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from layout_utils import full_params, logits, rel
from r1mega.checkpoint.state import TrainingCheckpointError, latest_checkpoint, read_marker
from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
from r1mega.platform.launch import spawn

VOCAB, SEQ, GBS, MBS = 128, 16, 8, 2
MODEL = ModelConfig(name="tiny", arch="qwen3", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                    num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB, qk_layernorm=True,
                    tie_word_embeddings=True)
OPTIMIZER = OptimizerConfig(lr=1e-3, weight_decay=0.1, warmup_steps=2, decay_style="cosine")
# On two ranks ParallelConfig() is DP=2: the distributed optimizer shards its states over both.
LAYOUTS = {"tp1": ParallelConfig(), "dp2": ParallelConfig(), "tp2": ParallelConfig(tp=2),
           "pp2": ParallelConfig(pp=2)}


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


def _phase(layout: str, root: str, seed: int, load: str | None = None):
    """Build a run under `layout`; either train 2 steps and save, or resume from `load`. Then step 3."""
    from megatron.core import parallel_state as ps

    from r1mega.checkpoint.state import load_checkpoint, save_checkpoint
    from r1mega.data.synthetic import SyntheticLM
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import initialize
    from r1mega.trainer.pretrain import train_step
    from r1mega.trainer.optimizer import build_optimizer

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    initialize(LAYOUTS[layout], seed=seed)
    ddp, optimizer, scheduler = build_optimizer(build_model(MODEL, LAYOUTS[layout]), MODEL, OPTIMIZER, 10)
    data = SyntheticLM(VOCAB, SEQ, GBS, MBS, seed=3, dp_rank=ps.get_data_parallel_rank(),
                       dp_size=ps.get_data_parallel_world_size())
    out = {}
    if load is None:
        for _ in range(2):
            train_step(ddp, optimizer, scheduler, data.next_micro_batches(), SEQ, MBS)
        with _megatron_warnings() as out["save_warnings"]:
            save_checkpoint(f"{root}/{layout}", 2, ddp, optimizer, scheduler, data.state_dict())
    else:
        state = load_checkpoint(latest_checkpoint(f"{root}/{load}"), ddp, optimizer, scheduler)
        data.load_state_dict(state["data"])
        out["step"] = state["step"]
    out["draws"] = _draws()
    probe = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(9))
    out["logits"] = logits(ddp, probe)
    out["step3"] = train_step(ddp, optimizer, scheduler, data.next_micro_batches(), SEQ, MBS)
    out["params3"] = full_params(ddp, f"{root}/params_{layout}_{load or 'fresh'}")
    return out


@contextmanager
def _megatron_warnings():
    """The messages megatron logs at WARNING or above inside the block."""
    messages: list = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("megatron").addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger("megatron").removeHandler(handler)


def _two_ranks(root: str):
    from r1mega.platform.distributed import destroy

    try:
        return {
            "tp2": _phase("tp2", root, seed=11),
            "pp2": _phase("pp2", root, seed=12),
            "dp2": _phase("dp2", root, seed=13),
            "tp2->pp2": _phase("pp2", root, seed=0, load="tp2"),
            "pp2->tp2": _phase("tp2", root, seed=0, load="pp2"),
            "tp2->tp2": _phase("tp2", root, seed=0, load="tp2"),  # same layout: RNG restored too
        }
    finally:
        destroy()


def _errors(root: str) -> dict:
    """One-line messages of the errors raised by bad checkpoint folders (1 rank)."""
    from r1mega.checkpoint.state import load_checkpoint
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import initialize
    from r1mega.trainer.optimizer import build_optimizer

    good = latest_checkpoint(f"{root}/tp2")
    bad = Path(root) / "bad"
    cases = {"missing": bad / "nope", "tmp": bad / "step_2.tmp", "truncated": bad / "truncated",
             "no_metadata": bad / "no_metadata", "bad_marker": bad / "bad_marker"}
    for name in ("tmp", "truncated", "no_metadata", "bad_marker"):
        shutil.copytree(good, cases[name])
    (cases["tmp"] / "r1mega_state.json").unlink()  # an interrupted save: never got its marker
    shard = sorted(cases["truncated"].glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    (cases["no_metadata"] / ".metadata").unlink()
    (cases["bad_marker"] / "r1mega_state.json").write_text("{not json")

    initialize(LAYOUTS["tp1"], seed=0)
    ddp, optimizer, scheduler = build_optimizer(build_model(MODEL, LAYOUTS["tp1"]), MODEL, OPTIMIZER, 10)
    messages = {}
    for name, path in cases.items():
        try:
            load_checkpoint(path, ddp, optimizer, scheduler)
            messages[name] = None
        except TrainingCheckpointError as e:
            messages[name] = (str(path), str(e))
    return messages


def _one_rank(root: str):
    from r1mega.platform.distributed import destroy

    try:
        out = {f"{saved}->tp1": _phase("tp1", root, seed=0, load=saved) for saved in ("tp2", "pp2", "dp2")}
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        out["errors"] = _errors(root)
        return out
    finally:
        destroy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    per_rank = spawn(2, _two_ranks, root)
    # Logits live on the last pipeline stage; full parameters come back from rank 0.
    merged = {k: dict(v, logits=next(r[k]["logits"] for r in per_rank if r[k]["logits"] is not None),
                      save_warnings=[m for r in per_rank for m in r[k].get("save_warnings", [])])
              for k, v in per_rank[0].items()}
    merged.update(spawn(1, _one_rank, root)[0])
    return root, merged


@pytest.mark.distributed
@pytest.mark.parametrize("resumed,saved", [("tp2->tp1", "tp2"), ("pp2->tp1", "pp2"), ("dp2->tp1", "dp2"),
                                           ("tp2->pp2", "tp2"), ("pp2->tp2", "pp2"), ("tp2->tp2", "tp2")])
def test_resume_matches_uninterrupted(runs, resumed, saved):
    _, out = runs
    a, ref = out[resumed], out[saved]
    assert a["step"] == 2
    assert rel(a["logits"], ref["logits"]) < 1e-5, rel(a["logits"], ref["logits"])
    for key in ("loss", "grad_norm"):
        assert abs(a["step3"][key] - ref["step3"][key]) / ref["step3"][key] < 1e-5, (a["step3"], ref["step3"])
    assert a["step3"]["lr"] == pytest.approx(ref["step3"]["lr"], rel=1e-12)  # the schedule resumed at step 3
    assert a["params3"].keys() == ref["params3"].keys()
    for key, tensor in ref["params3"].items():
        assert rel(a["params3"][key], tensor) < 1e-5, (key, rel(a["params3"][key], tensor))


@pytest.mark.distributed
def test_same_layout_restores_rng(runs):
    _, out = runs
    got, ref = out["tp2->tp2"]["draws"], out["tp2"]["draws"]
    assert got[:2] == ref[:2] and torch.equal(got[2], ref[2])
    assert out["tp2->tp1"]["draws"][0] != ref[0]  # another layout keeps this run's own seeds


@pytest.mark.distributed
def test_bad_checkpoints_raise_one_line_naming_the_path(runs):
    _, out = runs
    for case, result in out["errors"].items():
        assert result is not None, f"{case}: loaded without error"
        path, message = result
        assert path in message and "\n" not in message, (case, message)


def test_latest_checkpoint_skips_incomplete(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"step_{step}"
        folder.mkdir()
        (folder / "metadata.json").write_text("{}")
        if complete:
            (folder / "r1mega_state.json").write_text(json.dumps({"step": step, "layout": {}}))
    (tmp_path / "step_8.tmp").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_4"  # no `latest` file: newest complete
    (tmp_path / "latest").write_text("step_2\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_2"  # the pointer wins when it is valid
    (tmp_path / "latest").write_text("step_6\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_4"  # a pointer to an incomplete one is ignored
    assert read_marker(tmp_path / "step_4")["step"] == 4
    with pytest.raises(TrainingCheckpointError, match="step_6.*incomplete"):
        read_marker(tmp_path / "step_6")



@pytest.mark.distributed
@pytest.mark.parametrize("saved", ["tp2", "pp2", "dp2"])
def test_ranks_save_the_same_common_state(runs, saved):
    """Only rank 0's common (non-tensor) state is written; megatron compares every rank's with it.
    DP ranks > 0 hold no gathered optimizer state (fully reshardable, memory-efficient: it is
    gathered on DP rank 0), which must not show up as state only they have."""
    messages = runs[1][saved]["save_warnings"]
    assert not [m for m in messages if "common state dict differs" in m], messages
