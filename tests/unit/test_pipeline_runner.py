"""Pipeline runner pieces: stage folders in overrides, what reaches each stage, the results table."""

import json
import subprocess
import sys

import pytest

from r1mega.cli.pipeline import stage_extra
from r1mega.config.errors import ConfigError
from r1mega.config.loader import load_config
from r1mega.config.schema import PipelineConfig, StageConfig
from r1mega.recipe.runner import (eval_overrides, expand, format_table, stage_dirs, stage_overrides, summary,
                                    validate_stages)


def pipeline(tmp_path):
    return PipelineConfig(output_dir=str(tmp_path), common=["trainer.progress=false"], stages=[
        StageConfig(name="data", kind="cold_start_data"),
        StageConfig(name="sft", kind="sft", evaluate=True, overrides=["sft.train_files=[{data}/a.jsonl]"])])


def test_placeholders_become_stage_folders(tmp_path):
    p = pipeline(tmp_path)
    dirs = stage_dirs(p)
    args = stage_overrides(p, p.stages[1], dirs, ["optimizer.lr=1e-5"])
    assert args == ["trainer.progress=false", f"sft.train_files=[{tmp_path}/data/a.jsonl]", "optimizer.lr=1e-5",
                    f"trainer.output_dir={tmp_path}/sft", "trainer.load=auto"]
    assert eval_overrides(args, dirs["sft"])[-2:] == [f"model.mcore_path={tmp_path}/sft/model",
                                                      f"trainer.output_dir={tmp_path}/sft/eval"]
    assert expand(["reward.components={accuracy: 1}"], dirs, "x") == ["reward.components={accuracy: 1}"]
    assert expand(["sft.max_seq_length=${rollout.max_new_tokens}"], dirs, "x")[0].endswith("${rollout.max_new_tokens}")
    with pytest.raises(ConfigError, match=r"stage 'x': \{rl\} names no stage \(stages: data, sft\)"):
        expand(["model.mcore_path={rl}/model"], dirs, "stage 'x'")


def test_command_line_overrides_reach_the_stages_but_not_the_pipeline_keys():
    argv = ["experiment=r1_tiny", "pipeline.output_dir=/x", "+pipeline.extra=1", "trainer.progress=false",
            "parallel.nproc=2"]
    assert stage_extra(argv) == ["trainer.progress=false", "parallel.nproc=2"]


def test_summary_table_lists_finished_stages(tmp_path):
    p = pipeline(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stage.json").write_text(json.dumps({"seconds": 3.0}))
    (tmp_path / "sft" / "eval").mkdir(parents=True)
    (tmp_path / "sft" / "stage.json").write_text(json.dumps({"seconds": 75.0, "eval_seconds": 12.0}))
    (tmp_path / "sft" / "eval" / "eval.json").write_text(json.dumps(
        {"eval/greedy_accuracy": 0.925, "eval/mean_at_k": 0.8125, "eval/pass_at_k": 0.98, "eval/k": 4.0}))
    rows = summary(p)
    table = format_table(rows)
    assert "| data | cold_start_data |  |  |  |  |  | 0m03s |" in table
    assert "| sft | sft | 92.5% | 81.2% | 98.0% (k=4) |  |  | 1m15s + 0m12s |" in table


def test_summary_counts_the_tokens_of_sampling_and_distillation(tmp_path):
    p = PipelineConfig(output_dir=str(tmp_path), stages=[StageConfig(name="traces", kind="sample"),
                                                         StageConfig(name="sft", kind="sft"),
                                                         StageConfig(name="opd", kind="opd")])
    for name in ("traces", "sft", "opd"):
        (tmp_path / name).mkdir()
        record = {"seconds": 61.0}
        if name == "sft":  # SFT on the sampling stage's traces: what the teacher generated for them
            record["overrides"] = [f"sft.train_files=[{tmp_path / 'traces' / 'data.jsonl'}]"]
        (tmp_path / name / "stage.json").write_text(json.dumps(record))
    (tmp_path / "traces" / "stats.json").write_text(json.dumps({"all": {"response_tokens": 1_234_567}}))
    rows = [{"step": 1, "response/tokens": 900.0, "opd/teacher_tokens": 900.0},
            {"step": 2, "response/tokens": 700.0, "opd/teacher_tokens": 700.0},
            {"step": 2, "response/tokens": 800.0, "opd/teacher_tokens": 800.0},  # a resumed run's repeat counts once
            {"step": 2, "eval/greedy_accuracy": 0.5}]
    (tmp_path / "opd" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = format_table(summary(p))
    assert "| traces | sample |  |  |  | 1.23M |  | 1m01s |" in table
    assert "| sft | sft |  |  |  |  | 1.23M | 1m01s |" in table
    assert "| opd | opd |  |  |  | 1.7k | 1.7k | 1m01s |" in table


def test_a_distillation_stage_runs_train_with_the_opd_preset(tmp_path):
    p = PipelineConfig(output_dir=str(tmp_path), stages=[
        StageConfig(name="teacher", kind="rl"),
        StageConfig(name="opd", kind="opd", overrides=["algorithm.opd.teacher.path={teacher}/model"])])
    dirs = stage_dirs(p)
    args = stage_overrides(p, p.stages[1], dirs, [])
    assert args[0] == "algorithm=opd" and args[-1] == "trainer.load=auto"
    cfg = load_config(args)
    assert cfg.algorithm.name == "opd" and cfg.algorithm.opd.teacher.path == f"{tmp_path}/teacher/model"
    validate_stages(p, [])  # the teacher's model and tokenizer: those the teacher stage will export
    p.stages[1].overrides.append("model.vocab_size=320")  # a student of another built-in tokenizer
    with pytest.raises(ConfigError, match="stage 'opd': algorithm.opd.teacher.path=.*the teacher's tokenizer"):
        validate_stages(p, [])


def test_experiment_r1_tiny_composes_and_validates():
    cfg = load_config(["experiment=r1_tiny"])
    kinds = [s.kind for s in cfg.pipeline.stages]
    assert kinds == ["eval", "cold_start_data", "sft", "rl", "sample", "sft", "rl", "sample", "eval", "sft", "eval",
                     "sft", "opd"]
    assert cfg.pipeline.stages[9].overrides[0] == "model=tiny_student"
    assert [s.overrides[0] for s in cfg.pipeline.stages[10:]] == ["model=tiny_small"] * 3
    validate_stages(cfg.pipeline, [])  # every stage's own config composes and validates


def test_sft_entry_point_needs_train_files(tmp_path):
    result = subprocess.run([sys.executable, "-m", "r1mega.cli.sft", f"trainer.output_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "r1mega-sft needs sft.train_files" in result.stderr


def test_stage_rules_are_checked_before_anything_runs(tmp_path):
    p = pipeline(tmp_path)
    p.stages[0].evaluate = True
    with pytest.raises(ConfigError, match="stage 'data': evaluate: true needs a stage that exports a model"):
        validate_stages(p, [])
    p = pipeline(tmp_path)
    p.stages[1].overrides = []
    with pytest.raises(ConfigError, match="stage 'sft': r1mega-sft needs sft.train_files"):
        validate_stages(p, [])


def test_sft_batch_rule_applies_to_sft_runs_only():
    from r1mega.config.stage_rules import check_sft_run
    from r1mega.config.validate import validate

    cfg = load_config(["sft.train_files=[a.jsonl]", "data.prompts_per_step=24", "model.mcore_path=/m"])
    validate(cfg, 6)  # RL, evaluation and sampling at dp = 6 do not care about sft.samples_per_step=32
    with pytest.raises(ConfigError, match="sft.samples_per_step=32 must be a multiple of the data-parallel size 6"):
        check_sft_run(cfg, 6)
    cfg.parallel.cp = 2
    with pytest.raises(ConfigError, match="parallel.cp > 1"):
        check_sft_run(cfg)


VARS = ["pipeline.vars.base_model=/ckpt/b", "pipeline.vars.student_model=/ckpt/s", "pipeline.vars.prompts=/d/p.jsonl",
        "pipeline.vars.test_prompts=/d/t.jsonl", "pipeline.vars.cold_start_data=/d/c.jsonl",
        "pipeline.vars.general_data=/d/g.jsonl"]


def test_full_scale_experiment_needs_its_paths_and_then_validates():
    with pytest.raises(ConfigError, match="pipeline.vars.base_model: Missing mandatory value"):
        load_config(["experiment=r1_qwen2.5_7b"])
    p = load_config(["experiment=r1_qwen2.5_7b", *VARS]).pipeline
    validate_stages(p, [])
    dirs = stage_dirs(p)
    rl = load_config(stage_overrides(p, p.stages[2], dirs, []))
    assert (rl.model.name, rl.model.mcore_path, rl.model.hf_path) == ("qwen2.5-7b", f"{dirs['cold_start']}/model",
                                                                      "/ckpt/b")
    assert (rl.algorithm.group_size, rl.algorithm.kl_beta, rl.optimizer.lr, rl.data.train_path) == (
        16, 0.001, 3e-6, "/d/p.jsonl")
    student = load_config(stage_overrides(p, p.stages[-1], dirs, []))
    assert (student.model.name, student.model.hf_path, student.parallel.tp) == ("qwen2.5-1.5b", "/ckpt/s", 2)
    assert student.sft.train_files == [f"{dirs['distill_data']}/data.jsonl"]


def test_context_parallelism_is_refused_where_sequences_are_not_split(tmp_path):
    """The rules each entry point checks at its world size (test_config: the command line's one-line exit)."""
    from r1mega.config.stage_rules import check_sft_run

    def refused(*overrides, rules=None):
        with pytest.raises(ConfigError) as err:
            load_config(["parallel.cp=2", f"trainer.output_dir={tmp_path}", *overrides], world_size=2,
                        entry_rules=rules)
        return str(err.value)

    assert "parallel.cp > 1 splits THD packs" in refused("trainer.pack=false", "model.mcore_path=/m")  # RL: packs
    assert "parallel.cp > 1: SFT, rejection sampling and evaluation" in refused(
        "sft.train_files=[a.jsonl]", "model.mcore_path=/m", rules=check_sft_run)
    # the built-in base model's pre-training runs whole sequences
    assert "pre-training does not split its sequences" in refused()
    assert "te or sdpa attention backend, not flash" in refused("model.attention_backend=flash", "model.mcore_path=/m")
