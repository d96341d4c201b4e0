"""Before any process starts: the distillation teacher must read and write text as the student does
(the same tokenizer: the teacher scores the student's token ids as they are), and its model must fit
its parallel layout on the job's ranks.

Cross-tokenizer distillation (aligning two vocabularies' tokens, as GOLD does) is not done: a teacher
with another tokenizer is refused here, naming both tokenizers and how their vocabularies differ.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional

from r1mega.config.errors import ConfigError
from r1mega.config.schema import ModelConfig, R1Config
from r1mega.config.validate import check_layout
from r1mega.data.tokenizer import TOKENIZER_FILES, load_tokenizer, tiny_vocabulary
from r1mega.trainer.model_setup import builtin_tokenizer_dir, tokenizer_source
from r1mega.trainer.rl.teacher import teacher_model_config

KEY = "algorithm.opd.teacher"


def check_teacher(cfg: R1Config, world_size: Optional[int] = None,
                  promised: Optional[Dict[Path, R1Config]] = None) -> None:
    """Refuse (ConfigError) a teacher whose tokenizer differs from the student's, or whose model does not
    fit its layout. `promised`: model folders of pipeline stages not run yet, with their configs."""
    if cfg.algorithm.opd is None:
        return
    t = cfg.algorithm.opd.teacher
    folder = Path(t.path)
    stage = (promised or {}).get(folder.resolve()) if not folder.exists() else None
    model = stage.model if stage is not None else _model(folder)
    try:
        if not t.server:  # a served teacher is laid out by its server
            check_layout(replace(model, mtp=None), t.parallel, world_size)
    except ConfigError as e:
        raise ConfigError(f"{KEY} (model {model.name} from {t.path}), in {KEY}.parallel: {e}") from None
    student = tokenizer_source(cfg, promised)
    teacher = tokenizer_source(stage, promised) if stage is not None else _tokenizer_folder(folder)
    if student.resolve() != teacher.resolve():
        ours, theirs = _vocabulary(student, cfg), _vocabulary(teacher, stage or cfg)
        if ours != theirs:
            raise ConfigError(f"{KEY}.path={t.path}: the teacher's tokenizer ({teacher}) is not the student's "
                              f"({student}): {_difference(ours, theirs)}. On-policy distillation scores the "
                              "student's token ids with the teacher, so both must share one tokenizer; pick a "
                              "student of the teacher's family (distilling across tokenizers is not supported)")
    if model.vocab_size < cfg.model.vocab_size:  # the student may sample ids the teacher has no row for
        raise ConfigError(f"{KEY}.path={t.path}: the teacher's model.vocab_size={model.vocab_size} is below the "
                          f"student's {cfg.model.vocab_size} (the same tokenizer, padded otherwise): the student can "
                          "sample ids the teacher cannot score; pad the student's vocabulary to at most the teacher's")


def _model(folder: Path) -> ModelConfig:
    if not folder.exists():
        raise ConfigError(f"{KEY}.path={folder} does not exist")
    try:
        return teacher_model_config(folder)
    except Exception as e:  # noqa: BLE001 - any unreadable folder is the user's to fix: one line
        raise ConfigError(str(e)) from None


def _tokenizer_folder(folder: Path) -> Path:
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{KEY}.path={folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): the "
                          "student's tokenizer must be checked against it")
    return folder


def _vocabulary(folder: Path, cfg: R1Config) -> dict:
    builtin = builtin_tokenizer_dir(cfg.pretrain.cache_dir, cfg.model.vocab_size)
    if folder == builtin and not (folder / "tokenizer.json").is_file():
        return tiny_vocabulary(cfg.model.vocab_size)  # not built yet: what it will be
    return load_tokenizer(folder).get_vocab()


def _difference(ours: dict, theirs: dict) -> str:
    only_ours, only_theirs = set(ours) - set(theirs), set(theirs) - set(ours)
    if only_ours or only_theirs:
        return (f"{len(ours)} tokens against {len(theirs)}; {len(only_ours)} only the student's (e.g. "
                f"{sorted(only_ours)[:3]}), {len(only_theirs)} only the teacher's (e.g. {sorted(only_theirs)[:3]})")
    moved = sorted(k for k in ours if ours[k] != theirs[k])
    return f"the same {len(ours)} tokens under other ids ({len(moved)} differ, e.g. {moved[:3]})"
