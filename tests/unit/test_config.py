"""Config composition, overrides and the cross-field rules, plus the CLI's one-line errors."""

import subprocess
import sys

import pytest

from r1mega.config.loader import load_config
from r1mega.config.validate import ConfigError


def test_default_and_overrides():
    cfg = load_config(["model=qwen2.5-1.5b", "parallel.tp=2", "optimizer.lr=1e-6"], world_size=2)
    assert (cfg.model.name, cfg.model.num_layers, cfg.parallel.tp, cfg.optimizer.lr) == ("qwen2.5-1.5b", 28, 2, 1e-6)
    assert cfg.model.moe is None


def test_every_model_preset_composes():
    from r1mega.config.loader import CONF_DIR

    for preset in sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")):
        cfg = load_config([f"model={preset}"])
        assert cfg.model.name == preset


def test_moe_preset_is_typed():
    cfg = load_config(["model=qwen3-moe-30b-a3b", "parallel.ep=8", "parallel.tp=2",
                       "parallel.sequence_parallel=true", "data.prompts_per_step=64",
                       "pretrain.enabled=false"], world_size=16)
    assert cfg.model.moe.num_experts == 128 and cfg.model.moe.router_topk == 8


@pytest.mark.parametrize("overrides,world,needle", [
    (["parallel.tp=3"], 3, "parallel.tp=3 must divide model.num_attention_heads=4"),
    (["parallel.tp=4"], 4, "model.num_query_groups=2"),
    (["model=tiny_moe", "parallel.ep=3"], 3, "parallel.ep=3 must divide model.moe.num_experts=8"),
    (["parallel.pp=3"], 3, "parallel.pp=3 must divide model.num_layers=4"),
    (["parallel.tp=2"], 3, "world size 3"),
    (["parallel.tpp=2"], None, "Key 'tpp' not in 'ParallelConfig'"),
    (["optimizer.lr=fast"], None, "optimizer.lr"),
    (["model=nope"], None, "model/nope"),
    (["parallel.ep=2"], 2, "needs an MoE model"),
    (["model=tiny_moe", "parallel.tp=2"], 2, "sequence_parallel"),
    (["pretrain.global_batch_size=12"], 1, "pretrain.global_batch_size=12"),
    (["data.prompts_per_step=3"], 2, "data.prompts_per_step=3 must be a multiple"),
    (["algorithm.advantage=ppo"], None, "algorithm.advantage='ppo' is not one of"),
    (["algorithm.loss_agg=mean"], None, "algorithm.loss_agg"),
    (["algorithm.group_size=1"], None, "algorithm.group_size=1"),
    (["algorithm.dual_clip=0.5"], None, "algorithm.dual_clip=0.5"),
    (["algorithm.correction.weight_cap=2"], None, "algorithm.correction.weight_cap is set but"),
    (["algorithm.correction.weight=sequence"], None, "algorithm.correction.weight=sequence needs a weight_cap"),
    (["algorithm.correction.reject=token"], None, "needs reject_low, reject_high or both"),
    (["correction=icepop", "algorithm.correction.reject_high=0"], None, "reject_high=0.0 must be in"),
    (["correction=icepop", "algorithm.correction.reject_low=6"], None, "reject_low=6.0 must be below"),
    (["correction=tis", "algorithm.correction.veto=1e-12"], None, "veto=1e-12 must be in"),
    (["correction=tis", "algorithm.use_rollout_logprobs=true"], None, "has no trainer log-probs"),
    (["rollout.max_new_tokens=400"], None, "exceeds model.max_position_embeddings=512"),
    (["rollout.temperature=0"], None, "rollout.temperature=0"),
    (["data=files"], None, "data.train_path"),
    (["reward.timeout_s=0"], None, "reward.timeout_s=0"),
    (["+reward.components.speed=1.0"], None, "reward.components.speed is not a built-in reward"),
    (["+reward.custom.mine={weight: 1}"], None, "reward.custom.mine needs a _target_"),
    (["pretrain.optimizer.lr=0"], None, "pretrain.optimizer.lr must be positive"),
    (["algorithm.max_staleness=1"], None, "algorithm.max_staleness=1 bounds rollout.mode=async"),
    (["rollout.mode=async", "rollout=sglang"], None, "algorithm.max_staleness=0: with colocated engines"),
    (["rollout.mode=async", "rollout=sglang", "algorithm.max_staleness=1", "rollout.asynchronous.partial=true"],
     None, "never takes weights while it generates"),
    (["rollout.mode=async", "rollout=sglang", "algorithm.max_staleness=1", "rollout.asynchronous.workers=2"],
     None, "rollout.asynchronous.workers=2: with colocated engines"),
    (["rollout.mode=async", "rollout=sglang", "algorithm.max_staleness=1", "algorithm.dynamic_sampling=true"],
     None, "generated ahead of time"),
    (["rollout.mode=async", "rollout=sglang", "rollout.sglang.mode=disaggregated", "rollout.sglang.num_gpus=1",
      "rollout.sglang.base_gpu_id=1", "rollout.asynchronous.workers=2"], None, "the engines are the rollout workers"),
    (["rollout.mode=async", "rollout=sglang", "rollout.sglang.mode=disaggregated", "rollout.sglang.num_gpus=1",
      "rollout.sglang.base_gpu_id=1", "rollout.asynchronous.on_worker_failure=continue"], None,
     "cannot drop a member"),
    (["rollout.mode=async", "rollout=sglang", "rollout.sglang.mode=disaggregated", "rollout.sglang.num_gpus=1",
      "rollout.sglang.base_gpu_id=1", "rollout.asynchronous.partial=true", "rollout.asynchronous.partial_kv=keep"],
     None, "use partial_kv=recompute"),
    (["rollout.mode=async", "rollout.asynchronous.weight_sync_every=2"], None, "weight_sync_every=2 must be in"),
    (["rollout.mode=async", "rollout.asynchronous.prompts_per_request=3"], None, "prompts_per_request=3 must"),
    (["rollout.mode=async", "algorithm.dynamic_sampling=true"], None, "algorithm.dynamic_sampling with rollout"),
    (["rollout.mode=async", "rollout.asynchronous.workers=0"], None, "rollout.asynchronous.workers=0"),
    (["rollout.mode=asap"], None, "rollout.mode='asap' is not one of"),
    (["model=tiny_dsv3", "model.moe=null", "parallel.tp=2"], 2, "multi-latent attention (model.mla) with "
                                                                  "parallel.tp > 1 needs parallel.sequence_parallel"),
    (["model=tiny_dsv3", "model.mtp.num_layers=0"], None, "model.mtp.num_layers=0 must be >= 1"),
    (["model=tiny_dsv3", "model.mtp.loss_scale=-1"], None, "model.mtp.loss_scale=-1.0 must be >= 0"),
    (["model=tiny_dsv3", "parallel.cp=2", "model.attention_backend=te"], 2,
     "model.mtp (multi-token prediction) with parallel.cp > 1 is not supported"),
    (["algorithm=opd"], None, "algorithm.opd.teacher.path is not set"),
    (["algorithm=opd", "algorithm.opd.teacher.path=t", "algorithm.ratio_level=sequence"], None,
     "algorithm.ratio_level=sequence (GSPO)"),
    (["algorithm=opd", "algorithm.opd.teacher.path=t", "algorithm.opd.teacher.parallel.cp=2"], None,
     "algorithm.opd.teacher.parallel.cp=2"),
    (["algorithm=opd", "algorithm.opd.teacher.path=t", "algorithm.opd.teacher.parallel.tp=4"], 2,
     "tp x pp = 4 x 1 must divide the 2 ranks"),
    (["algorithm=opd", "algorithm.opd.teacher.path=t", "algorithm.opd.kl_coef=0"], None, "nothing to learn from"),
    (["algorithm=opd", "algorithm.opd.teacher.path=t", "algorithm.opd.kl_clip=0"], None, "kl_clip=0.0 must be > 0"),
    (["algorithm=opd", "algorithm.opd.teacher.path=t", "algorithm.opd.reward_weight=1",
      "algorithm.group_size=1"], None, "algorithm.group_size=1"),
    (["algorithm=opd", "algorithm.opd.teacher.path=t", "algorithm.dynamic_sampling=true"], None,
     "carry the teacher's signal"),
    (["algorithm=opd", "algorithm.opd.teacher.path=t", "algorithm.opd.top_k=4", "algorithm.opd.kl_clip=1"], None,
     "set one of them"),
])
def test_bad_configs_are_refused(overrides, world, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(overrides, world_size=world)
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_pipeline_layout_rules():
    cfg = load_config(["parallel.pp=3", "parallel.pipeline_layout=[2,1,1]"], world_size=3)
    assert cfg.parallel.pipeline_layout == [2, 1, 1]
    with pytest.raises(ConfigError, match="sums to 5"):
        load_config(["parallel.pp=3", "parallel.pipeline_layout=[2,2,1]"], world_size=3)


@pytest.mark.parametrize("args,needle", [
    (["parallel.tp=3", "parallel.nproc=3"], "parallel.tp=3 must divide"),
    (["parallel.tpp=2"], "Key 'tpp' not in 'ParallelConfig'"),
    (["model=tiny_moe", "parallel.ep=3", "parallel.nproc=3"], "parallel.ep=3 must divide"),
])
def test_cli_exits_with_one_line(args, needle):
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli.train", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("r1mega: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]


def test_an_optional_section_is_switched_on_from_the_command_line():
    """A section a preset leaves off (None) takes values from an override, starting from its schema
    defaults; its missing and unknown keys are named."""
    assert load_config(["model=tiny_moe", "model.mtp.num_layers=2"]).model.mtp.num_layers == 2
    mtp = load_config(["model=tiny_moe", "model.mtp={loss_scale: 0.3}"]).model.mtp
    assert (mtp.num_layers, mtp.loss_scale) == (1, 0.3)
    assert load_config(["model=tiny_dsv3", "model.mtp=null"]).model.mtp is None
    assert load_config(["model=tiny_moe", "model.mtp.num_layers=2", "model.mtp=null"]).model.mtp is None  # in order
    assert load_config(["model=tiny_dsv3", "model.mtp=null", "model.mtp.num_layers=2"]).model.mtp.num_layers == 2
    assert load_config(["model=tiny_moe", "model.moe=null"]).model.moe is None
    yarn = load_config(["model=tiny_dsv3", "model.mla.yarn.factor=4",
                        "model.mla.yarn.original_max_position_embeddings=64"]).model.mla.yarn
    assert (yarn.factor, yarn.original_max_position_embeddings, yarn.beta_fast) == (4.0, 64, 32.0)
    with pytest.raises(ConfigError, match="model.moe.ffn_hidden_size: .*missing mandatory value"):
        load_config(["model=tiny", "model.moe.num_experts=4"])
    with pytest.raises(ConfigError, match="model.mtp.nope=1: Key 'nope' not in 'MTPConfig'"):
        load_config(["model=tiny", "model.mtp.nope=1"])


def test_distillation_alone_needs_no_groups():
    cfg = load_config(["algorithm=opd", "algorithm.opd.teacher.path=t", "algorithm.group_size=1"])
    assert cfg.algorithm.opd.teacher.path == "t" and cfg.algorithm.kl_beta == 0.0
    assert load_config(["algorithm.opd.teacher.path=t"]).algorithm.opd.kl_coef == 1.0  # off by default: an override
