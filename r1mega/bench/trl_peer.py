"""The TRL side of the time-to-accuracy race: TRL's GRPOTrainer on the shared base model, prompts
and settings, with r1mega's rule-based rewards, evaluated greedy on the held-out prompts before the
first step and every `eval_every` steps. Run as `python -m r1mega.bench.trl_peer SPEC.json`; writes
per-step wall times, rewards and the accuracy curve to the spec's `result` path."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from transformers import TrainerCallback

from r1mega.platform.atomic import write_text_atomic
from r1mega.rewards.stack import RewardInput, RewardStack

# r1mega's loss aggregation modes under TRL's names
LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}


class RaceClock(TrainerCallback):
    """Wall time of every optimizer step (generation, rewards, log-probs and update inside it), and
    held-out greedy accuracy at step 0 and every `every` steps, outside the timed steps."""

    def __init__(self, evaluate, every: int, steps: int):
        self.evaluate, self.every, self.steps = evaluate, every, steps
        self.seconds: List[float] = []
        self.curve: List[List[float]] = []
        self.logs: List[Dict[str, float]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.curve.append([0, 0.0, self.evaluate(model)])

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)
        step = state.global_step
        if step % self.every == 0 or step == self.steps:
            self.curve.append([step, sum(self.seconds), self.evaluate(model)])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.logs.append({"step": state.global_step, **logs})


def greedy_accuracy(tokenizer, rows: List[dict], max_new_tokens: int, batch: int = 64):
    """model -> mean accuracy of greedy answers to `rows` (r1mega's accuracy reward)."""
    stack = RewardStack(components={"accuracy": 1.0}, num_workers=0)

    def evaluate(model) -> float:
        training = model.training
        model.eval()
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        correct = 0.0
        try:
            with torch.no_grad():
                for i in range(0, len(rows), batch):
                    part = rows[i:i + batch]
                    enc = tokenizer([r["prompt"] for r in part], return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(model.device)
                    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                    texts = tokenizer.batch_decode(out[:, enc["input_ids"].size(1):], skip_special_tokens=True)
                    scores = stack.score([RewardInput(response=t, answer=r["answer"], data_source=r["data_source"])
                                          for t, r in zip(texts, part)])
                    correct += sum(scores.components["accuracy"])
        finally:
            tokenizer.padding_side = side
            model.train(training)
        return correct / max(len(rows), 1)

    return evaluate


def reward_function(stack: RewardStack):
    def r1mega_rewards(prompts, completions, answer, data_source, completion_ids=None, **kwargs) -> List[float]:
        ids = completion_ids or [[]] * len(completions)
        return stack.score([RewardInput(response=c, answer=a, data_source=s, response_tokens=len(t))
                            for c, a, s, t in zip(completions, answer, data_source, ids)]).total
    return r1mega_rewards


def main(spec_path: str) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    rows = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines()]
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"], "data_source": r["data_source"]}
                              for r in rows])
    stack = RewardStack(components=spec["rewards"], num_workers=0, timeout_s=spec["reward_timeout_s"])
    test = [json.loads(line) for line in Path(spec["test_prompts"]).read_text().splitlines()]
    batch = spec["prompts_per_step"] * spec["group_size"]
    args = GRPOConfig(
        output_dir=spec["work_dir"], per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=spec["group_size"], max_completion_length=spec["max_new_tokens"], temperature=1.0,
        top_p=1.0, top_k=0, beta=spec["kl_beta"], epsilon=spec["eps_low"], epsilon_high=spec["eps_high"],
        loss_type=LOSS_TYPES[spec["loss_agg"]], scale_rewards="group" if spec["std_scaled"] else "none",
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, max_steps=spec["steps"],
        max_grad_norm=spec["clip_grad"], weight_decay=spec["weight_decay"], adam_beta1=spec["adam_beta1"],
        adam_beta2=spec["adam_beta2"], adam_epsilon=spec["adam_eps"], optim="adamw_torch",
        use_cpu=not torch.cuda.is_available(), bf16=False, logging_steps=1, save_strategy="no", report_to="none",
        seed=spec["seed"], dataloader_pin_memory=False, disable_dropout=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    clock = RaceClock(greedy_accuracy(tokenizer, test, spec["max_new_tokens"]), spec["eval_every"], spec["steps"])
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=[reward_function(stack)], args=args,
                          train_dataset=data, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    result = {"step_s": clock.seconds, "curve": clock.curve, "reward": [log["reward"] for log in clock.logs]}
    write_text_atomic(spec["result"], json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
