"""The `cluster` config as the parameters of Hydra's submitit launcher (conf/hydra/launcher/slurm.yaml).

`r1mega-train -m hydra/launcher=slurm optimizer.lr=1e-6,3e-6` submits one job per sweep point;
each runs one srun task per rank, and when submitit's time-limit warning (USR2) stops it, the
trainer saves first and then hands the signal to submitit, which requeues the point.
"""

from __future__ import annotations

import shlex
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from r1mega.config.cluster_rules import ranks_per_node, time_minutes
from r1mega.config.schema import ClusterConfig
from r1mega.slurm.script import job_env


def submitit_params(c: ClusterConfig) -> Dict[str, Any]:
    """What submitit's Slurm executor needs that is not a plain copy of a cluster key."""
    extra: Dict[str, Any] = {"requeue": True} if c.requeue else {"no-requeue": True}
    if c.mem is not None:
        extra["mem"] = c.mem
    if c.exclusive:
        extra["exclusive"] = True
    extra.update({k: v for k, v in c.sbatch.items() if v is not None and v is not False})
    setup = list(c.setup) + [f"export {k}={shlex.quote(v)}" for k, v in job_env(c).items()]
    return {
        "timeout_min": time_minutes(c.time),
        "tasks_per_node": ranks_per_node(c),
        "gpus_per_node": c.gpus_per_node or None,
        "additional_parameters": extra,
        "setup": "\n".join(setup),  # one string: the launcher config holds it as a one-line list
    }


def resolve(cluster: DictConfig, key: str) -> Any:
    """OmegaConf resolver `${r1mega_submitit:${cluster},key}`."""
    c = cluster if isinstance(cluster, ClusterConfig) else OmegaConf.to_object(cluster)
    return submitit_params(c)[key]


def register_resolver() -> None:
    """Make `${r1mega_submitit:...}` resolvable. Only Hydra's launcher config uses it, and only
    where Hydra launches: `-m` sweeps (r1mega.cli.sweep), which register it before composing."""
    OmegaConf.register_new_resolver("r1mega_submitit", resolve, replace=True)
