"""`r1mega-eval`: held-out accuracy of a model (greedy pass@1, sampled pass@k) into eval.json, e.g.

    r1mega-eval model.mcore_path=outputs/sft/model rollout.eval_samples=8
"""

from __future__ import annotations

import logging
from pathlib import Path

from r1mega.cli.common import job_main
from r1mega.config.schema import R1Config
from r1mega.config.stage_rules import check_no_cp
from r1mega.recipe.inference import inference_context
from r1mega.recipe.jsonl import write_json
from r1mega.trainer.rl.evaluate import evaluate

EVAL_FILE = "eval.json"


def evaluate_model(cfg: R1Config, runtime) -> None:
    """Held-out accuracy of cfg's model, into <trainer.output_dir>/eval.json."""
    ctx, _ = inference_context(cfg, runtime)
    try:
        metrics = evaluate(ctx)
    finally:
        ctx.close()
    if runtime.is_main:
        write_json(Path(cfg.trainer.output_dir) / EVAL_FILE, metrics)
        logging.getLogger("r1mega").info("eval: %s", {k: round(v, 4) for k, v in metrics.items()})


def main() -> None:
    job_main(evaluate_model, check_no_cp)


if __name__ == "__main__":
    main()
