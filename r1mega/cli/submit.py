"""`r1mega-submit`: run r1mega-train (or r1mega-sft) as a Slurm batch job, from the same Hydra
config and overrides:

    r1mega-submit cluster=gpu_site cluster.nodes=4 cluster.partition=h100 optimizer.lr=1e-6
    r1mega-submit --dry-run experiment=r1_tiny ...   # print the sbatch script, submit nothing

The run folder (trainer.output_dir, pinned at submission) gets slurm/job.sbatch, the resolved
slurm/config.yaml, slurm/submissions.jsonl (job ids) and Slurm's output, slurm/<job id>.out.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from r1mega.cli.exit import fail
from r1mega.config.errors import ConfigError
from r1mega.slurm.partitions import SlurmUnavailable
from r1mega.slurm.script import ENTRIES
from r1mega.slurm.submit import SubmitError, check_cluster_has_room, prepare, submit


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="r1mega-submit", description="Submit an r1mega job to Slurm.")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    parser.add_argument("--entry", choices=sorted(ENTRIES), default="train", help="the job to run (default train)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for r1mega-train")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        job = prepare(args.overrides, args.entry)
        if args.dry_run:
            try:  # check the partition too where a cluster answers
                check_cluster_has_room(job)
            except SlurmUnavailable as e:
                print(f"r1mega-submit: partition not checked: {e}", file=sys.stderr)
            print(job.script, end="")
            return
        if (job.run_dir / "checkpoints").is_dir():
            print(f"r1mega-submit: {job.run_dir} has checkpoints: the job resumes from the latest", file=sys.stderr)
        job_id = submit(job, args.overrides, args.entry)
    except (ConfigError, SubmitError) as e:
        fail(str(e))
    print(f"submitted job {job_id}: run folder {job.run_dir}, log {job.log_dir / (job_id + '.out')}")


if __name__ == "__main__":
    main()
