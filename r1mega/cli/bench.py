"""`r1mega-bench`: throughput of the GRPO step, training, rollout and a side-by-side run against
TRL, configured like training (every knob a Hydra override), e.g.

    r1mega-bench                                  # every suite, CPU-sized (conf/bench/default.yaml)
    r1mega-bench bench.suites=[peer] bench.peer.steps=10
    r1mega-bench bench=gpu                        # one GPU node: 1.5B bf16 training MFU
"""

from __future__ import annotations

import logging
import sys
from typing import Dict

from r1mega.bench import asynchronous, packing, peer, rollout, step, training
from r1mega.bench.measure import environment
from r1mega.bench.report import markdown, write_results
from r1mega.cli.exit import fail
from r1mega.config.bench_rules import check_bench
from r1mega.config.loader import compose_config, to_config
from r1mega.config.schema import R1Config
from r1mega.config.validate import ConfigError, check_installed, validate
from r1mega.platform.logs import setup_logging

log = logging.getLogger("r1mega")


def load(argv) -> R1Config:
    cfg = to_config(compose_config(argv))
    validate(cfg, cfg.parallel.nproc or 1, check_bench)
    check_installed(cfg.model)
    return cfg


def run(cfg: R1Config, command: str) -> Dict:
    """Every configured suite in order; the results files are rewritten after each one."""
    from dataclasses import asdict


    suites = {"step": step.run, "train": training.run, "rollout": rollout.run, "packing": packing.run,
              "peer": peer.run, "async": asynchronous.run}
    results = {"command": command, "environment": environment(), "bench": asdict(cfg.bench), "suites": {}}
    for name in cfg.bench.suites:
        log.info("bench: %s", name)
        results["suites"][name] = suites[name](cfg)
        files = write_results(results, cfg.bench.output_dir)
    log.info("bench: results in %s", ", ".join(map(str, files)))
    return results


def main() -> None:
    argv = sys.argv[1:]
    try:
        cfg = load(argv)
    except ConfigError as e:
        fail(str(e))
    setup_logging()

    print(markdown(run(cfg, " ".join(["r1mega-bench", *argv]))))


if __name__ == "__main__":
    main()
