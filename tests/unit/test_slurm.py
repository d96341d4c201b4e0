"""r1mega-submit without a cluster: the sbatch script, the cluster rules, sinfo checks, requeue."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from r1mega.config.cluster_rules import check_cluster, time_minutes, world_size
from r1mega.config.errors import ConfigError
from r1mega.config.loader import CONF_DIR, load_config
from r1mega.config.schema import ClusterConfig, register
from r1mega.platform.signals import StopRequest
from r1mega.slurm.partitions import check_fits, gpus_in_gres, parse_sinfo
from r1mega.cli.sweep import sweep_points
from r1mega.slurm.requeue import leave_requeue_file, requeue_if_warned
from r1mega.slurm.submit import prepare
from r1mega.slurm.submitit import register_resolver, submitit_params

GPU = ["cluster=gpu_site", "pretrain.enabled=false"]  # a GPU site starts from an HF model, not the built-in base
SITE = [*GPU, "cluster.nodes=4", "cluster.partition=h100", "cluster.account=proj",
        "cluster.qos=high", "+cluster.sbatch.constraint=ib", "+cluster.sbatch.overcommit=true",
        "+cluster.sbatch.reservation=null",
        "data.prompts_per_step=32"]  # a multiple of the 32 data-parallel ranks


def _directives(script: str) -> list:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def _bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("text,minutes", [("90", 90), ("0:30", 1), ("1:30:00", 90), ("2-00:00:00", 2880),
                                          ("1-12", 2160), ("1-0:01", 1441), ("00:00:59", 1)])
def test_time_minutes(text, minutes):
    assert time_minutes(text) == minutes


def test_torchrun_script(tmp_path):
    job = prepare([*SITE, "optimizer.lr=1e-6", "trainer.output_dir=runs/a"], workdir=tmp_path)
    run = tmp_path / "runs" / "a"
    assert job.run_dir == run and job.cfg.trainer.output_dir == str(run) and job.cfg.trainer.load == "auto"
    assert job.overrides[-2:] == [f"trainer.output_dir={run}", "trainer.load=auto"]
    assert sum(o.startswith("trainer.output_dir=") for o in job.overrides) == 1
    d = _directives(job.script)
    for expected in ["--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64", "--mem=0",
                     "--time=04:00:00", "--partition=h100", "--account=proj", "--qos=high", "--exclusive",
                     "--signal=USR1@600", "--requeue", "--open-mode=append", f"--output={run}/slurm/%j.out",
                     f"--chdir={tmp_path}", "--constraint=ib", "--overcommit"]:
        assert expected in d, expected
    assert not any(o.startswith("--reservation") for o in d)  # null: left out
    s = job.script
    assert "export NCCL_SOCKET_IFNAME='^lo,docker'" in s and "export OMP_NUM_THREADS=8" in s
    assert "-m r1mega.slurm.torchrun --stop-signal=SIGUSR1 " in s and "--nproc-per-node=8" in s
    assert "--rdzv-backend=c10d" in s
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=600" in s
    assert "-m r1mega.cli.train cluster=gpu_site " in s
    assert f"optimizer.lr=1e-6 trainer.output_dir={run} trainer.load=auto || rc=$?" in s
    assert f"export R1MEGA_REQUEUE_FILE={run}/slurm/requeue-$SLURM_JOB_ID" in s
    assert "mkdir" not in s  # r1mega-submit makes <run>/slurm before sbatch
    assert sys.executable in s  # the interpreter r1mega-submit runs under, on a shared filesystem
    _bash_syntax_ok(s, tmp_path)


def test_srun_script_with_container(tmp_path):
    job = prepare([*SITE, "cluster.launcher=srun", "cluster.cpus_per_rank=8", "cluster.exclusive=false",
                   "cluster.container_image=\"nvcr.io#nvidia/pytorch:25.10-py3\"",
                   "cluster.container_mounts=[/lustre:/lustre,/home:/home]", "cluster/network=efa",
                   "+cluster.env.FI_PROVIDER=verbs", "cluster.setup=[module load cuda]",
                   "trainer.output_dir=run"], workdir=tmp_path)
    d = _directives(job.script)
    assert "--ntasks-per-node=8" in d and "--cpus-per-task=8" in d and "--exclusive" not in d
    s = job.script
    assert "srun --kill-on-bad-exit=1 --label --ntasks-per-node=8 --cpus-per-task=8" in s
    assert "'--container-image=nvcr.io#nvidia/pytorch:25.10-py3' --container-mounts=/lustre:/lustre,/home:/home" in s
    assert "\n    python -m r1mega.cli.train " in s  # inside a container: its own interpreter
    assert "torchrun" not in s
    assert "export FI_PROVIDER=verbs" in s and "FI_EFA_USE_DEVICE_RDMA=1" in s  # site env wins over the preset
    assert "\nmodule load cuda\n" in s
    _bash_syntax_ok(s, tmp_path)


def test_r1_zero_7b_experiment_validates_on_four_nodes(tmp_path):
    job = prepare(["experiment=r1_zero_qwen2.5_7b", "model.hf_path=/ckpt/Qwen2.5-7B", "data.train_path=/d/t.jsonl",
                   "data.test_path=/d/e.jsonl", "trainer.output_dir=r"], workdir=tmp_path)
    assert (job.cfg.cluster.nodes, job.cfg.cluster.gpus_per_node, job.cfg.parallel.tp) == (4, 8, 4)
    assert "#SBATCH --nodes=4" in job.script and "--nproc-per-node=8" in job.script
    with pytest.raises(ConfigError, match="set model.hf_path to your base model"):
        prepare(["experiment=r1_zero_qwen2.5_7b", "data.train_path=/d/t.jsonl"], workdir=tmp_path)


@pytest.mark.parametrize("override,message", [
    ("trainer.output_dir=runs/a b", "paths without spaces or %"),
    ("trainer.output_dir=runs/100%", "paths without spaces or %"),
    ("cluster.partition='h100 --wrap=x'", "cluster.partition='h100 --wrap=x' must be one word"),
    ("+cluster.sbatch.comment='two words'", "cluster.sbatch.comment='two words' must be one word"),
])
def test_words_that_would_break_the_script_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        prepare([*GPU, override], workdir=tmp_path)


def test_sft_entry_and_its_checks(tmp_path):
    with pytest.raises(ConfigError, match="sft.train_files"):
        prepare(GPU, entry="sft", workdir=tmp_path)
    job = prepare([*GPU, "sft.train_files=[d.jsonl]", "trainer.output_dir=s"], entry="sft",
                  workdir=tmp_path)
    assert "-m r1mega.cli.sft " in job.script


def test_job_config_validated_at_cluster_world_size(tmp_path):
    # 1 node x 8 GPUs = 8 ranks: tp=3 does not divide it (nor the tiny model's 4 heads)
    with pytest.raises(ConfigError, match="parallel.tp=3"):
        prepare([*GPU, "parallel.tp=3"], workdir=tmp_path)
    with pytest.raises(ConfigError, match="trainer.load=auto"):
        prepare([*GPU, "trainer.load=/elsewhere/checkpoints"], workdir=tmp_path)
    with pytest.raises(ConfigError, match="--entry"):
        prepare([], entry="pipeline", workdir=tmp_path)


@pytest.mark.parametrize("key,value,message", [
    ("nodes", 0, "cluster.nodes"),
    ("ranks_per_node", 4, "one rank per GPU"),
    ("launcher", "mpirun", "cluster.launcher"),
    ("signal", "TERM", "cluster.signal"),
    ("signal_lead_s", 4 * 3600, "cluster.signal_lead_s"),
    ("time", "4 hours", "not a Slurm time"),
    ("env", {"NCCL-DEBUG": "INFO"}, "not an environment variable"),
    ("container_mounts", ["/lustre"], "src:dst"),
])
def test_cluster_rules(key, value, message):
    c = ClusterConfig(gpus_per_node=8, time="04:00:00")
    check_cluster(c)
    setattr(c, key, value)
    with pytest.raises(ConfigError, match=message):
        check_cluster(c)


def test_world_size():
    assert world_size(ClusterConfig(nodes=4, gpus_per_node=8)) == 32
    assert world_size(ClusterConfig(nodes=2, ranks_per_node=3)) == 6
    assert world_size(ClusterConfig()) == 1


SINFO = """gpu*|128|gpu:h100:8(S:0-1)|6|2-00:00:00
gpu*|128|gpu:h100:4(S:0),nvme:1|2|2-00:00:00
cpu|64+|(null)|10|infinite
short|8|(null)|1|10:00
"""


def test_parse_sinfo():
    parts = parse_sinfo(SINFO)
    assert list(parts) == ["gpu", "cpu", "short"]
    assert parts["gpu"].default and not parts["cpu"].default
    assert [(g.nodes, g.gpus) for g in parts["gpu"].groups] == [(6, 8), (2, 4)]
    assert parts["gpu"].max_minutes == 2880 and parts["cpu"].max_minutes is None and parts["short"].max_minutes == 10
    assert parts["cpu"].groups[0].cpus == 64
    assert gpus_in_gres("gpu:a100:4,gpu:h100:4") == 8 and gpus_in_gres("(null)") == 0 and gpus_in_gres("gpu:2") == 2


@pytest.mark.parametrize("overrides,message", [
    (dict(partition="h100"), "no such partition; sinfo lists: gpu \\(default\\), cpu, short"),
    (dict(gpus_per_node=16), "at most 8 GPUs"),
    (dict(partition="cpu", gpus_per_node=1), "partition 'cpu' have at most 0 GPUs"),
    (dict(nodes=7), "has 6 node\\(s\\) with 8 GPUs"),
    (dict(cpus_per_rank=32), "needs 256 CPUs, but the nodes of partition 'gpu' have at most 128"),
    (dict(time="3-00:00:00"), "over the time limit"),
])
def test_check_fits_refuses(overrides, message):
    c = ClusterConfig(gpus_per_node=8, cpus_per_rank=12, time="1-00:00:00", nodes=6)
    assert check_fits(c, parse_sinfo(SINFO)).name == "gpu"
    for key, value in overrides.items():
        setattr(c, key, value)
    with pytest.raises(ConfigError, match=message):
        check_fits(c, parse_sinfo(SINFO))


def test_no_default_partition():
    with pytest.raises(ConfigError, match="no default partition"):
        check_fits(ClusterConfig(), parse_sinfo("cpu|4|(null)|1|infinite\n"))


def test_cli_dry_run_and_missing_sbatch(tmp_path):
    bare = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no Slurm commands on PATH
    args = [sys.executable, "-m", "r1mega.cli.submit"]
    dry = subprocess.run([*args, "--dry-run", *GPU, "trainer.output_dir=r"], cwd=tmp_path, env=bare,
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("#!/bin/bash") and "partition not checked" in dry.stderr
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    real = subprocess.run([*args, *GPU], cwd=tmp_path, env=bare, capture_output=True, text=True)
    assert real.returncode == 2 and "r1mega: error: sbatch not found" in real.stderr
    bad = subprocess.run([*args, "--dry-run", "cluster.nodes=0"], cwd=tmp_path, env=bare, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "r1mega: error: cluster.nodes must be >= 1" in bad.stderr


def test_submitit_launcher_config():
    register()
    register_resolver()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *SITE, "cluster.time=2:00:00"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["timeout_min"], launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (
        120, 4, 8, 8)
    assert (launcher["partition"], launcher["account"], launcher["qos"], launcher["signal_delay_s"]) == (
        "h100", "proj", "high", 600)
    assert launcher["additional_parameters"] == {"requeue": True, "mem": "0", "exclusive": True, "constraint": "ib",
                                                 "overcommit": True}
    assert launcher["cpus_per_task"] == 8  # one task per rank
    assert "export NCCL_IB_DISABLE=0" in launcher["setup"][0]
    assert submitit_params(ClusterConfig())["gpus_per_node"] is None  # CPU jobs ask for no GPUs


class _Stop(StopRequest):
    def __init__(self, signum, stopped_early=True, previous=None):
        super().__init__()
        self._handle(signum, None)
        self.stopped_early = stopped_early
        if previous is not None:
            self._previous[signum] = previous


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A stand-in `scontrol` on PATH that records its arguments."""
    calls = tmp_path / "calls"
    tool = tmp_path / "bin" / "scontrol"
    tool.parent.mkdir()
    tool.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("R1MEGA_REQUEUE_FILE", raising=False)
    return calls


def test_requeue_after_warning(scontrol, monkeypatch):
    c = ClusterConfig(max_requeues=2)
    assert not requeue_if_warned(c, _Stop(signal.SIGTERM))  # scancel or preemption: stop only
    assert not requeue_if_warned(c, _Stop(signal.SIGUSR1, stopped_early=False))  # it had finished anyway
    assert not requeue_if_warned(ClusterConfig(requeue=False), _Stop(signal.SIGUSR1))
    assert not scontrol.exists()
    assert requeue_if_warned(c, _Stop(signal.SIGUSR1))
    assert scontrol.read_text() == "requeue 77\n"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert not requeue_if_warned(c, _Stop(signal.SIGUSR2))  # max_requeues reached
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert not requeue_if_warned(c, _Stop(signal.SIGUSR1))  # not a Slurm job


def test_requeue_through_the_batch_script(scontrol, tmp_path, monkeypatch):
    marker = tmp_path / "requeue-77"
    monkeypatch.setenv("R1MEGA_REQUEUE_FILE", str(marker))
    stop = _Stop(signal.SIGUSR1)
    assert leave_requeue_file(ClusterConfig(), stop) and stop.requeued
    assert marker.read_text() == "77\n" and not scontrol.exists()  # the script runs scontrol, on the host
    assert requeue_if_warned(ClusterConfig(), stop) and not scontrol.exists()  # asked once only
    assert not leave_requeue_file(ClusterConfig(), _Stop(signal.SIGTERM))


def test_unwritable_requeue_file_falls_back_to_scontrol(scontrol, tmp_path, monkeypatch):
    monkeypatch.setenv("R1MEGA_REQUEUE_FILE", str(tmp_path / "missing" / "requeue-77"))
    stop = _Stop(signal.SIGUSR1)
    assert not leave_requeue_file(ClusterConfig(), stop)
    assert requeue_if_warned(ClusterConfig(), stop) and scontrol.read_text() == "requeue 77\n"


def test_requeue_reports_a_missing_scontrol(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.delenv("R1MEGA_REQUEUE_FILE", raising=False)
    assert not requeue_if_warned(ClusterConfig(), _Stop(signal.SIGUSR1))
    assert "scontrol requeue 5 failed" in caplog.text


def test_requeue_hands_over_to_previous_handler(scontrol):
    seen = []
    assert requeue_if_warned(ClusterConfig(), _Stop(signal.SIGUSR2, previous=lambda s, f: seen.append(s)))
    assert seen == [signal.SIGUSR2] and not scontrol.exists()  # submitit's handler requeues, not scontrol
    assert not requeue_if_warned(ClusterConfig(requeue=False), _Stop(signal.SIGUSR2, previous=seen.append))
    assert seen == [signal.SIGUSR2]


def test_stop_request_catches_and_remembers():
    stop = StopRequest()
    stop.install()
    try:
        assert stop.received is None and stop.warning is None and not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1 and stop.warning == signal.SIGUSR1 and stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)  # caught too: the process lives on to save
        assert stop.received == signal.SIGTERM and stop.warning == signal.SIGUSR1  # the warning is kept
    finally:
        for sig, handler in stop._previous.items():
            signal.signal(sig, handler)


def test_load_config_accepts_cluster_presets():
    cfg = load_config(["cluster=gpu_site", "cluster/network=ethernet"])
    assert cfg.cluster.network["NCCL_IB_DISABLE"] == "1" and cfg.cluster.gpus_per_node == 8


def test_sweep_points():
    points = sweep_points(["a=1,2", "b=x", "+c.d=3,4"])
    assert [p for p, _ in points] == [["a=1", "b=x", "+c.d=3"], ["a=1", "b=x", "+c.d=4"],
                                      ["a=2", "b=x", "+c.d=3"], ["a=2", "b=x", "+c.d=4"]]
    assert points[1][1] == "a=1 +c.d=4" and sweep_points(["b=x"]) == [(["b=x"], "(no swept keys)")]


def test_sweep_refuses_a_bad_point_before_launching(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli.train", "-m", "trainer.steps=1", "parallel.tp=1,3",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "r1mega: error: sweep point parallel.tp=3: parallel.tp=3 must divide" in proc.stderr
    assert not (tmp_path / "sweep").exists()  # not even the valid point ran


def test_torchrun_wrapper_exits_0_on_the_warning_only(monkeypatch):
    """torchrun raises SignalException after stopping its ranks on any signal it handles; the
    wrapper turns the time-limit warning's into exit 0 and lets every other one through."""
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException

    from r1mega.slurm import torchrun

    seen = []

    def fake(sig):
        def run(argv):
            seen.append(argv)
            raise SignalException(f"Process 1 got signal: {int(sig)}", sigval=sig)
        return run

    monkeypatch.setattr(torchrun, "torchrun_main", fake(signal.SIGUSR1))
    assert torchrun.main(["--stop-signal=SIGUSR1", "--nnodes=2", "-m", "r1mega.cli.train"]) == 0
    assert seen == [["--nnodes=2", "-m", "r1mega.cli.train"]]
    monkeypatch.setattr(torchrun, "torchrun_main", fake(signal.SIGTERM))
    with pytest.raises(SignalException):
        torchrun.main(["--stop-signal=SIGUSR1", "-m", "r1mega.cli.train"])
    with pytest.raises(SystemExit, match="--stop-signal="):
        torchrun.main(["-m", "r1mega.cli.train"])
