"""The distillation teacher is checked before any rank starts: its tokenizer against the student's, its
vocabulary size, its folder (model folders here are written by hand: a model.yaml and a tokenizer)."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from r1mega.checkpoint.mcore import MODEL_YAML
from r1mega.config.errors import ConfigError
from r1mega.config.loader import load_config
from r1mega.data.tokenizer import build_tiny_tokenizer
from r1mega.trainer.rl.teacher_check import check_teacher


def _teacher(folder: Path, *overrides: str, tokenizer_vocab: int | None = 384) -> Path:
    model = load_config(list(overrides)).model
    if tokenizer_vocab is not None:
        build_tiny_tokenizer(folder, vocab_size=tokenizer_vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_YAML).write_text(OmegaConf.to_yaml(OmegaConf.structured(model)))
    return folder


def _check(tmp_path: Path, teacher: Path, *student: str):
    cfg = load_config(["algorithm=opd", f"algorithm.opd.teacher.path={teacher}",
                       f"pretrain.cache_dir={tmp_path / 'cache'}", *student])
    check_teacher(cfg, world_size=2)


def test_a_teacher_of_the_students_tokenizer_passes(tmp_path):
    # the student's built-in tokenizer is not built yet: its vocabulary is trained in memory to compare
    _check(tmp_path, _teacher(tmp_path / "t", "model.num_layers=8"))
    _check(tmp_path, _teacher(tmp_path / "t2", "model.vocab_size=512"))  # padded further: the teacher scores all


@pytest.mark.parametrize("case,needle", [
    ("other_tokenizer", "the teacher's tokenizer"),
    ("no_tokenizer", "holds no tokenizer"),
    ("missing", "does not exist"),
    ("smaller_vocab", "is below the student's 512"),
    ("layout", "algorithm.opd.teacher.parallel: parallel.tp=2 must divide model.num_attention_heads=3"),
])
def test_a_teacher_that_cannot_score_the_student_is_refused(tmp_path, case, needle):
    student = []
    if case == "other_tokenizer":
        teacher = _teacher(tmp_path / "t", "model.vocab_size=320", tokenizer_vocab=320)
    elif case == "no_tokenizer":
        teacher = _teacher(tmp_path / "t", tokenizer_vocab=None)
    elif case == "missing":
        teacher = tmp_path / "nowhere"
    elif case == "smaller_vocab":
        teacher, student = _teacher(tmp_path / "t"), ["model.vocab_size=512"]
    else:
        teacher = _teacher(tmp_path / "t", "model.num_attention_heads=3", "model.num_query_groups=1")
        student = ["algorithm.opd.teacher.parallel.tp=2"]
    with pytest.raises(ConfigError, match=None) as err:
        _check(tmp_path, teacher, *student)
    assert needle in str(err.value)
