"""On-policy distillation on gloo ranks: the student samples, a frozen teacher in its own parallel layout
scores every token, and the student learns from the per-token reverse KL.

A teacher equal to the student gives every token advantage 0, so the step leaves the weights exactly as
they were; teachers under TP=2, PP=2 and (MoE) EP=2 beside students of other layouts score the same as
on one rank, and so does an SGLang server (the stand-in) serving the teacher's HF export; a resumed run
takes the uninterrupted run's steps; a teacher with another tokenizer is
refused before any rank starts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl_helpers import SMALL, config, run
from test_rl_run import _close, _save_init
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

TEACHER = ["model.num_layers=4", "model.hidden_size=96", "model.ffn_hidden_size=192"]  # larger than the student
OPD = ["algorithm=opd", "optimizer.lr=3e-3"]
COMPARED = ("loss", "pg_loss", "grad_norm", "opd/reverse_kl", "opd/teacher_tokens", "reward/mean",
            "response/length_mean")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd")
    spawn(1, _save_init, str(root / "student"), (), 11, True)
    spawn(1, _save_init, str(root / "teacher"), TEACHER, 7, True)
    return root


def _weights(folder: str) -> dict:
    from r1mega.checkpoint.mcore import load_model, read_model_config
    from r1mega.config.schema import ParallelConfig
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize

    initialize(ParallelConfig(), seed=0)
    try:
        chunks = build_model(read_model_config(folder), ParallelConfig())
        load_model(chunks, folder)
        return {k: v.clone() for k, v in chunks[0].state_dict().items() if v is not None and hasattr(v, "shape")}
    finally:
        destroy()


@pytest.mark.parametrize("kl", ["sampled", "top4"])
def test_a_teacher_equal_to_the_student_leaves_the_weights_unchanged(models, tmp_path, kl):
    """Sampled tokens: every advantage is 0, the gradient exactly 0, and Adam takes a zero step. Top-k: the
    coarsened distributions are equal, the KL exactly 0, its gradient 0 up to rounding (the buckets' masses,
    each summed where it lies, add up to 1 within an ulp)."""
    student = str(models / "student")
    top = ["algorithm.opd.top_k=4"] if kl == "top4" else []
    steps = 1 if kl == "top4" else 2
    metrics = spawn(1, run, [*OPD, *top, f"model.mcore_path={student}", f"algorithm.opd.teacher.path={student}",
                             f"trainer.steps={steps}", "trainer.eval_at_ends=false"], str(tmp_path / "same"), 1)[0]
    if kl == "top4":  # Adam normalises a rounding-sized gradient into a real step: the first step only
        m = metrics[0]
        assert m["opd/reverse_kl"] == 0.0 and m["loss"] == 0.0 and 0 <= m["grad_norm"] < 1e-6
        return
    for m in metrics:
        assert m["opd/reverse_kl"] == 0.0 and m["loss"] == 0.0 and m["grad_norm"] == 0.0
        assert m["opd/teacher_tokens"] == m["response/tokens"] > 0
    before, after = spawn(1, _weights, student)[0], spawn(1, _weights, str(tmp_path / "same" / "model"))[0]
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].equal(after[name]), name


def _score(teacher: str, layouts: list, student_parallel: list, world: int) -> dict:
    """Every rank's rows (different on each data-parallel rank of the student) scored by a teacher under
    each layout; the log-probs by layout, gathered from every rank."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.rl.batch import StepBatch
    from r1mega.trainer.rl.teacher import Teacher

    base = [*OPD, f"algorithm.opd.teacher.path={teacher}", *student_parallel]
    cfg = config("/tmp/unused-opd", base, world_size=world)
    initialize(cfg.parallel, seed=0)
    try:
        g = torch.Generator().manual_seed(100 + ps.get_data_parallel_rank())
        vocab = 384
        rows = [torch.randint(1, vocab, (int(n),), generator=g) for n in torch.randint(8, 30, (5,), generator=g)]
        batch = StepBatch(rows, [4, 6, 3, 5, 7], torch.zeros(5), [torch.zeros(len(r) - n) for r, n in
                                                                  zip(rows, [4, 6, 3, 5, 7])])
        out = {}
        for name, extra in layouts:
            teacher_cfg = config("/tmp/unused-opd", [*base, *extra], world_size=world)
            scores = Teacher(teacher_cfg).score(batch)
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, [v.tolist() for v in scores.logp])
            out[name] = every
            if scores.topk_logp is not None:
                tops: list = [None] * dist.get_world_size()
                dist.all_gather_object(tops, [(v.tolist(), i.tolist()) for v, i in zip(scores.topk_logp,
                                                                                       scores.topk_ids)])
                out[name + "/top"] = tops
        return out
    finally:
        destroy()


def _same(got: dict, name: str, ref: str = "one", atol: float = 1e-5) -> None:
    """Every rank's rows under layout `name` as under `ref`: as many rows, as many tokens, the same values."""
    assert len(got[name]) == len(got[ref])
    for rank_rows, ref_rows in zip(got[name], got[ref]):
        assert len(rank_rows) == len(ref_rows) > 0
        for a, b in zip(rank_rows, ref_rows):
            assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < atol, name


STUDENTS = {"tp1": [], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"],
            "cp2": ["parallel.cp=2", "model.attention_backend=sdpa"]}


@pytest.mark.parametrize("student", list(STUDENTS))
def test_teacher_layouts_score_as_one_rank(models, student):
    """A TP=2 teacher beside TP=1 students (two data-parallel ranks holding different rows), and beside TP=2,
    PP=2 and CP=2 students (one replica over both ranks: its rows scored once, for both): the same log-probs
    as the teacher on one rank; a PP=2 teacher as well; and the same top-k tokens (gathered over the vocab
    slices of a TP=2 teacher)."""
    t = "algorithm.opd.teacher.parallel"
    top = ["algorithm.opd.top_k=4"] if student == "tp1" else []
    layouts = [("one", top), ("tp2", [f"{t}.tp=2", *top])] + ([("pp2", [f"{t}.pp=2", *top])] if top else [])
    got = spawn(2, _score, str(models / "teacher"), layouts, STUDENTS[student], 2)[0]
    for name, _ in layouts[1:]:
        _same(got, name)
    if student == "tp1":  # the two ranks' rows differ, and each got its own back
        assert got["one"][0] != got["one"][1]
        for name in ("tp2", "pp2"):
            assert len(got[name + "/top"]) == len(got["one/top"]) == 2
            for rank_rows, ref_rows in zip(got[name + "/top"], got["one/top"]):
                assert len(rank_rows) == len(ref_rows) == 5
                for (va, ia), (vb, ib) in zip(rank_rows, ref_rows):
                    assert ia == ib and torch.allclose(torch.tensor(va), torch.tensor(vb), atol=1e-5), name
                    assert torch.tensor(va).shape[1] == 5 and torch.tensor(ia).shape[1] == 4  # k + the rest
    else:  # one replica: both ranks hold its rows
        assert got["one"][0] == got["one"][1]


def test_an_expert_parallel_teacher_scores_as_one_rank(tmp_path):
    moe = ["model=tiny_moe", "model.num_layers=2"]
    spawn(1, _save_init, str(tmp_path / "moe"), moe, 5, True)
    t = "algorithm.opd.teacher.parallel"
    got = spawn(2, _score, str(tmp_path / "moe"), [("one", []), ("ep2", [f"{t}.ep=2"])], [], 2)[0]
    _same(got, "ep2")


def _export_hf(folder: str, out: str) -> None:
    from r1mega.checkpoint.hf_convert import save_hf
    from r1mega.checkpoint.mcore import load_model, read_model_config
    from r1mega.config.schema import ParallelConfig
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize

    initialize(ParallelConfig(), seed=0)
    try:
        model = read_model_config(folder)
        chunks = build_model(model, ParallelConfig())
        load_model(chunks, folder)
        save_hf(chunks, model, out, carry_from=[folder])
    finally:
        destroy()


def _served(teacher: str, hf: str, student_parallel: list) -> tuple:
    """The teacher's log-probs of every rank's rows from an SGLang server (the stand-in, on the teacher's HF
    export, in rank 0) and from the teacher in the job."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from r1mega.checkpoint.mcore import read_model_config
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.rl.batch import StepBatch
    from r1mega.trainer.rl.teacher import ServedTeacher, Teacher, make_teacher
    from sglang_standin import StandIn, serve

    box = [None]
    base = [*OPD, f"algorithm.opd.teacher.path={teacher}", *student_parallel]
    cfg = config("/tmp/unused-opd", base, world_size=2)
    initialize(cfg.parallel, seed=0)
    try:
        if dist.get_rank() == 0:
            server = serve(StandIn(read_model_config(teacher), 1, seed=0, hf_path=hf))
            box = [f"http://127.0.0.1:{server.server_address[1]}"]
        dist.broadcast_object_list(box, src=0)
        g = torch.Generator().manual_seed(200 + ps.get_data_parallel_rank())
        lens = [3, 5, 4, 6]
        rows = [torch.randint(1, 384, (n + int(r),), generator=g)
                for n, r in zip(lens, torch.randint(1, 12, (4,), generator=g))]
        batch = StepBatch(rows, lens, torch.zeros(4), [torch.zeros(len(r) - n) for r, n in zip(rows, lens)])
        served = make_teacher(config("/tmp/unused-opd", [*base, f"algorithm.opd.teacher.server={box[0]}"],
                                     world_size=2))
        assert isinstance(served, ServedTeacher)
        a, b = served.score(batch), Teacher(cfg).score(batch)
        listed = lambda xs: [x.tolist() for x in xs or []]  # noqa: E731
        return [(listed(x), listed(y)) for x, y in
                ((a.logp, b.logp), (a.topk_logp, b.topk_logp), (a.topk_ids, b.topk_ids))]
    finally:
        destroy()


@pytest.fixture(scope="module")
def teacher_hf(models):
    spawn(1, _export_hf, str(models / "teacher"), str(models / "teacher-hf"))
    return models / "teacher-hf"


@pytest.mark.parametrize("student", ["tp1", "tp2"])
def test_an_sglang_teacher_returns_the_teachers_logprobs(models, teacher_hf, student):
    """The served route (prefill only, prompt log-probs from one before the response, the first None) gives
    the in-job teacher's log-probs, to each data-parallel rank its own rows (tp1), and to every rank of a
    replica the first's answer (tp2)."""
    for (logp, top, ids) in spawn(2, _served, str(models / "teacher"), str(teacher_hf),
                                  ["parallel.tp=2" if student == "tp2" else "algorithm.opd.top_k=5"]):
        assert len(logp[0]) == len(logp[1]) == 4
        for a, b in zip(*logp):
            assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
        if student == "tp1":  # the teacher's 5 most likely tokens at each position, most likely first, the rest
            assert ids[0] == ids[1] and len(ids[0]) == 4 and all(len(p) == 5 for row in ids[0] for p in row)
            assert len(top[0]) == len(top[1]) == 4
            for a, b in zip(*top):
                assert torch.tensor(a).shape == torch.tensor(b).shape and torch.tensor(a).shape[1] == 6
                assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("opd-runs")
    common = [*OPD, f"model.mcore_path={models / 'student'}", f"algorithm.opd.teacher.path={models / 'teacher'}",
              "trainer.eval_at_ends=false", "algorithm.opd.teacher.parallel.tp=2"]
    out = {"whole": spawn(2, run, [*common, "trainer.steps=3"], str(root / "whole"), 2)[0]}
    spawn(2, run, [*common, "trainer.steps=1"], str(root / "split"), 2)
    out["rest"] = spawn(2, run, [*common, "trainer.steps=3", "trainer.load=auto"], str(root / "split"), 2)[0]
    return out


def test_a_resumed_run_takes_the_same_steps(runs):
    whole, rest = runs["whole"], runs["rest"]
    assert [m["step"] for m in rest] == [2, 3]
    assert all(m["opd/reverse_kl"] > 0 for m in whole)
    for a, b in zip(rest, whole[1:]):
        for key in COMPARED:
            assert _close(a[key], b[key], 1e-6), f"step {a['step']} {key}: {a[key]} vs {b[key]}"


def test_a_teacher_with_another_tokenizer_is_refused_before_any_rank_starts(tmp_path):
    from omegaconf import OmegaConf

    from r1mega.checkpoint.mcore import MODEL_YAML
    from r1mega.data.tokenizer import build_tiny_tokenizer

    other = tmp_path / "other"  # the built-in tokenizer of another size: other tokens under other ids
    model = config(str(tmp_path / "unused"), ["model.vocab_size=320"]).model
    build_tiny_tokenizer(other, vocab_size=320)  # what the check reads: the model's config and its tokenizer
    (other / MODEL_YAML).write_text(OmegaConf.to_yaml(OmegaConf.structured(model)))
    out = tmp_path / "run"
    args = [*SMALL, *OPD, f"algorithm.opd.teacher.path={other}", f"trainer.output_dir={out}", "parallel.nproc=2"]
    done = subprocess.run([sys.executable, "-m", "r1mega.cli.train", *args], capture_output=True, text=True,
                          cwd=Path(__file__).parent, timeout=300)
    assert done.returncode != 0
    assert "the teacher's tokenizer" in done.stderr and "not the student's" in done.stderr
    assert not out.exists()  # no rank started (a rank makes the output folder first)
