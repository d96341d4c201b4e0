"""Pre-training documents of the built-in tasks: the corpus the built-in base model learns from.

A document is a rendered prompt followed by a worked response in the R1 format,
` <think> 47 + 385 = 432 </think> <answer> 432 </answer>` and the end-of-text token. Like
text on the web, the corpus is not all correct: a share of the worked answers carry the
slips people make (a digit off by one, as from a dropped carry; a countdown expression that
misses its target; a program that forgets to convert its input). The base model therefore knows
the format and both right and wrong answers; reinforcement learning with a correctness reward
has to pick out the right ones.
Documents are packed back to back into rows of seq_length + 1 tokens, as in pre-training.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from r1mega.data.code_task import worked_program
from r1mega.data.templates import render_prompt
from r1mega.rewards.arith import ExpressionError, evaluate


def _slip(value: int, rng: np.random.Generator) -> int:
    """A near miss of an integer: one digit one off (never the value itself, never negative)."""
    digits = list(str(abs(value)))
    for _ in range(10):
        i = int(rng.integers(len(digits)))
        d = int(digits[i]) + int(rng.choice([-1, 1]))
        if 0 <= d <= 9 and not (i == 0 and d == 0 and len(digits) > 1):
            out = digits.copy()
            out[i] = str(d)
            return int("".join(out)) * (-1 if value < 0 else 1)
    return value + 1


def column_addition(a: int, b: int, drop_carry_at: int = -1) -> tuple[str, int]:
    """Digit-by-digit addition from the right, each step `x + y (+ carry) = s`; the result.

    drop_carry_at = i forgets the carry into column i (the classic slip)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, digits, carry = [], [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        c = 0 if i == drop_carry_at else carry
        total = x + y + c
        steps.append(f"{x} + {y} + {c} = {total}" if c else f"{x} + {y} = {total}")
        digits.append(total % 10)
        carry = total // 10
    if carry:
        digits.append(carry)
    return " , ".join(steps), int("".join(map(str, digits[::-1])))


def carry_columns(a: int, b: int) -> list:
    """Columns that receive a carry."""
    cols, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        if carry:
            cols.append(i)
        carry = (int(da[i]) if i < len(da) else 0) + (int(db[i]) if i < len(db) else 0) + carry >= 10
    return cols


def worked_response(record, correct: bool, rng: np.random.Generator) -> str:
    """The response text of a corpus document for a built-in task record."""
    m = record.metadata
    if record.data_source == "code":
        return worked_program(record, correct, rng)
    if record.data_source == "arithmetic" and m["op"] == "+":
        cols = carry_columns(m["a"], m["b"])
        slip = -1 if correct or not cols else int(rng.choice(cols))
        work, answer = column_addition(m["a"], m["b"], slip)
        return f" <think> {work} </think> <answer> {answer} </answer>"
    if record.data_source == "arithmetic":
        answer = int(record.answer) if correct else _slip(int(record.answer), rng)
        return f" <think> {m['a']} {m['op']} {m['b']} = {answer} </think> <answer> {answer} </answer>"
    if record.data_source == "countdown":
        expression = record.answer if correct else _wrong_expression(record.answer, rng)
        return f" <think> {expression} = {m['target']} </think> <answer> {expression} </answer>"
    raise ValueError(f"no worked responses for data source {record.data_source!r}")


def _wrong_expression(expression: str, rng: np.random.Generator) -> str:
    """The expression with one operator swapped so that it misses its value (same numbers);
    the expression itself when no single swap changes the value."""
    target = evaluate(expression)
    ops = [i for i, c in enumerate(expression) if c in "+-*/"]
    for i in rng.permutation(ops).tolist():
        for swap in "+-*/":
            if swap == expression[i]:
                continue
            wrong = expression[:i] + swap + expression[i + 1:]
            try:
                if evaluate(wrong) != target:
                    return wrong
            except ExpressionError:  # a swap that divides by zero
                continue
    return expression


def corpus_tokens(records: list, tokenizer, template: str, correct_fraction: float, seed: int) -> List[int]:
    """All documents, tokenized and joined with the end-of-text token."""
    rng = np.random.default_rng([seed, 7])
    texts = [render_prompt(r, tokenizer, template) + worked_response(r, rng.random() < correct_fraction, rng)
             for r in records]
    eos = tokenizer.eos_token_id
    stream: List[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids
        stream.append(eos)
    return stream


class TaskCorpus:
    """Global batches [global_batch_size, seq_length + 1] cut from the packed stream, in order
    (wrapping around); this data-parallel rank's micro-batches of each. Resumable by position."""

    def __init__(self, stream: List[int], seq_length: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1):
        width = seq_length + 1
        if len(stream) < width:
            raise ValueError(f"corpus of {len(stream)} tokens is shorter than one row of {width}")
        self.rows = torch.tensor(stream[: len(stream) // width * width], dtype=torch.long).view(-1, width)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.position = 0

    def next_micro_batches(self) -> List[torch.Tensor]:
        start = self.position * self.global_batch_size
        index = torch.arange(start, start + self.global_batch_size) % len(self.rows)
        self.position += 1
        per_rank = self.global_batch_size // self.dp_size
        mine = self.rows[index[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]]
        return list(mine.split(self.micro_batch_size))

    def state_dict(self) -> Dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.position = int(state["position"])
