"""`r1mega-bench`: GRPO step, training, rollout and peer (TRL) throughput; results in benchmarks/results."""
