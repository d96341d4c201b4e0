"""Running r1mega on Slurm: the sbatch script, checks against the cluster, submission, requeue."""
