"""GRPO end to end on gloo ranks: TP=2, PP=2, CP=2, PP=2 x CP=2 and (MoE) EP=2 x CP=2 take the
single-rank steps; resume is exact.

All runs start from one set of weights (saved once, resharded on load). Two steps each:
generation, rewards, advantages, log-probs, reference KL, a clipped update with two
minibatches (so old log-probs are recomputed and the ratio moves off 1), metrics.
"""

from __future__ import annotations

import pytest

from rl_helpers import config, run
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

ALGO = ["algorithm.minibatches=2", "algorithm.kl_beta=0.05", "algorithm.entropy_coeff=0.01"]
COMPARED = ("loss", "pg_loss", "kl", "entropy", "grad_norm", "reward/mean", "reward/digits", "clip_fraction",
            "response/length_mean", "logprob_gap")


def _save_init(folder: str, extra=(), seed: int = 11, with_tokenizer: bool = False) -> None:
    """Randomly initialised weights of the SMALL model (+ extra) saved as an r1mega model folder; with its
    tokenizer where a test reads one from it (a distillation teacher's)."""
    from r1mega.checkpoint.mcore import save_model
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.model_setup import run_tokenizer

    cfg = config(folder + ".unused", extra)
    initialize(cfg.parallel, seed=seed)
    try:
        tokenizer = run_tokenizer(cfg) if with_tokenizer else None
        save_model(build_model(cfg.model, cfg.parallel), cfg.model, folder, tokenizer)
    finally:
        destroy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    init = str(root / "init")
    spawn(1, _save_init, init)
    common = [*ALGO, f"model.mcore_path={init}", "trainer.steps=2"]
    # the reference scores its rewards in a worker process, the others in-process (tests only): the same steps
    out = {"ref": spawn(1, run, [*common, "reward.num_workers=1"], str(root / "ref"), 1)[0]}
    out["tp2"] = spawn(2, run, [*common, "parallel.tp=2"], str(root / "tp2"), 2)[0]
    out["pp2"] = spawn(2, run, [*common, "parallel.pp=2"], str(root / "pp2"), 2)[0]
    out["cp2"] = spawn(2, run, [*common, "parallel.cp=2"], str(root / "cp2"), 2)[0]
    out["pp2cp2"] = spawn(4, run, [*common, "parallel.pp=2", "parallel.cp=2"], str(root / "pp2cp2"), 4)[0]
    # MoE with its load-balancing loss, experts split over the context-parallel pair. That loss is
    # a micro-batch's (megatron's), and a CP pair's micro-batch holds twice the tokens, so the
    # single rank's micro-batches are made as large
    moe = ["model=tiny_moe", "model.moe.aux_loss_coeff=0.05"]
    spawn(1, _save_init, str(root / "moe_init"), moe)
    moe += [*ALGO, f"model.mcore_path={root / 'moe_init'}", "trainer.steps=2"]
    out["moe_ref"] = spawn(1, run, [*moe, "trainer.micro_batch_tokens=192"], str(root / "moe_ref"), 1)[0]
    out["moe_ep2cp2"] = spawn(2, run, [*moe, "parallel.ep=2", "parallel.cp=2"], str(root / "moe_ep2cp2"), 2)[0]
    # resume: 4 steps straight vs 2 steps, a checkpoint, and 2 more from it
    four = [*ALGO, f"model.mcore_path={init}", "trainer.steps=4"]
    out["whole"] = spawn(1, run, four, str(root / "whole"), 1)[0]
    spawn(1, run, [*four, "trainer.steps=2"], str(root / "split"), 1)
    out["rest"] = spawn(1, run, [*four, "trainer.load=auto"], str(root / "split"), 1)[0]
    return out


def _close(a: float, b: float, tol: float, key: str = "") -> bool:
    # logprob_gap is |engine log-prob - trainer log-prob|: the same numbers computed twice in float32,
    # so its value (~1e-7) is rounding, and rounding differs with the layout and the packing
    floor = 1e-6 if key == "logprob_gap" else 0.0
    return abs(a - b) <= max(tol * max(abs(b), 1e-3), floor)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "cp2", "pp2cp2", "moe_ep2cp2"])
def test_model_parallel_steps_match_single_rank(runs, layout):
    ref, got = runs["moe_ref" if layout.startswith("moe") else "ref"], runs[layout]
    assert [m["step"] for m in got] == [1, 2]
    for a, b in zip(got, ref):
        for key in COMPARED:
            assert _close(a[key], b[key], 1e-4, key), f"{layout} step {a['step']} {key}: {a[key]} vs {b[key]}"
    assert ref[1]["clip_fraction"] >= 0 and ref[0]["kl"] >= 0
    assert any(m["grad_norm"] > 0 for m in ref) and any(m["advantage/abs_mean"] > 0 for m in ref)


def test_resume_continues_exactly(runs):
    whole, rest = runs["whole"], runs["rest"]
    assert [m["step"] for m in rest] == [3, 4]
    for a, b in zip(rest, whole[2:]):
        for key in COMPARED:
            assert _close(a[key], b[key], 1e-6), f"step {a['step']} {key}: {a[key]} vs {b[key]}"


def test_a_reward_worker_killed_mid_step_is_replaced(tmp_path):
    """A reward worker killed while it scores (SIGKILL, as the OOM killer would): its sample scores 0 and
    counts as a failure, a new worker scores the rest, and the run goes on."""
    marker = tmp_path / "killed-once"
    kill = ["reward.num_workers=1", "+reward.custom.kill._target_=rl_helpers.KillAfter",
            "+reward.custom.kill.weight=0.0", "+reward.custom.kill.after=5", f"+reward.custom.kill.marker={marker}"]
    steps = [*ALGO, "trainer.steps=2", "trainer.eval_at_ends=false"]  # the 5th sample scored is step 1's
    history = spawn(1, run, [*steps, *kill], str(tmp_path / "run"), 1)[0]
    assert [m["step"] for m in history] == [1, 2] and marker.exists()
    assert history[0]["reward/failures"] == 1 and history[1]["reward/failures"] == 0


def test_metrics_cover_the_step(runs):
    first = runs["ref"][0]
    for key in ("reward/mean", "reward/accuracy", "response/length_mean", "response/length_max",
                "response/truncated_share", "kl", "clip_fraction", "entropy", "grad_norm", "logprob_gap",
                "perf/tokens_per_s", "time/generate", "time/score", "time/update", "lr", "reward/failures",
                "off_policy/ratio_p01", "off_policy/ratio_p50", "off_policy/ratio_p99", "off_policy/rejected_share"):
        assert key in first, key
    # the native engine samples with the trainer's own weights: rho = pi_prox / pi_rollout is 1 within a bin
    assert abs(first["off_policy/ratio_p01"] - 1) < 0.003 and abs(first["off_policy/ratio_p99"] - 1) < 0.003
    last = runs["ref"][-1]
    assert {"eval/greedy_accuracy", "eval/pass_at_k"} <= set(last)


VARIANTS = {
    # DAPO with nothing to learn from (accuracy only, random weights): every group is equal, so
    # dynamic sampling draws the maximum extra rounds and then fills up with equal groups
    "dapo": ["algorithm=dapo", "algorithm.max_extra_rounds=2", "reward.custom.digits.weight=0.0"],
    "gspo_tis": ["algorithm=gspo", "correction=tis", "algorithm.ppo_epochs=2"],
    "drgrpo_dual": ["algorithm=drgrpo", "algorithm.dual_clip=3.0", "algorithm.minibatches=2",
                    "algorithm.use_rollout_logprobs=true"],
    "rloo_entropy_icepop": ["algorithm=rloo", "algorithm.entropy_coeff=0.01", "algorithm.kl_beta=0.01",
                            "algorithm.kl_estimator=k2", "algorithm.ref_reset_every=1", "correction=icepop"],
}


def _variants(root: str):
    return {name: run([*extra, "trainer.steps=2", "trainer.eval_at_ends=false"], f"{root}/{name}", 1)
            for name, extra in VARIANTS.items()}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    return spawn(1, _variants, str(tmp_path_factory.mktemp("variants")))[0]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_algorithm_variants_run(variants, name):
    steps = variants[name]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert all(v == v for v in m.values() if isinstance(v, float)), m  # no NaN anywhere
    if name == "dapo":
        assert all(m["rollout/rounds"] == 3 and m["rollout/varied_group_share"] == 0 for m in steps)
        assert all(m["grad_norm"] == 0 for m in steps)  # equal rewards, no KL: nothing to learn
    else:
        assert any(m["grad_norm"] > 0 for m in steps)
    if name == "gspo_tis":
        assert steps[1]["ratio_max"] > 1.0  # the second epoch moved the sequence ratios
    if name == "rloo_entropy_icepop":
        # the reference was reset to the policy after step 1: step 2's KL starts from zero
        # (without the reset it would measure step 1's update, as grad_norm > 0 shows)
        assert steps[0]["grad_norm"] > 0 and steps[1]["kl"] == pytest.approx(0.0, abs=1e-7)
