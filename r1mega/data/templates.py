"""Prompt templates: DeepSeek-R1-Zero's, the tokenizer's chat template, or the prompt as is."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Tuple

from jinja2.exceptions import TemplateError  # what chat templates raise (e.g. "roles must alternate")

from r1mega.data.prompts import MAX_WARNINGS, PromptRecord, bad_row

log = logging.getLogger("r1mega.data")

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. "
    "User: {prompt}. Assistant:"
)
TEMPLATES = ("r1_zero", "chat", "plain")  # the names render_prompt knows


def _messages(record: PromptRecord) -> List[Dict[str, str]]:
    return record.messages if record.messages is not None else [{"role": "user", "content": record.prompt}]


def user_text(record: PromptRecord) -> str:
    """The prompt text; for a conversation, its last user message."""
    if record.prompt is not None:
        return record.prompt
    users = [m["content"] for m in record.messages if m.get("role") == "user"]
    if not users:
        raise ValueError(f"prompt {record.prompt_id}: the conversation has no user message")
    return users[-1]


def rendered(records: List[PromptRecord], tokenizer: Any, template: str,
             on_bad_row: str) -> Tuple[List[PromptRecord], List[str]]:
    """(the records that render, their texts). A record the template refuses (a chat template raising
    on its roles, a conversation without user text) is a bad row: warned about and left out, or, with
    on_bad_row=error, a DataError naming its file and line. A tokenizer without the template refuses
    them all: that is said once."""
    if template == "chat":
        _check_chat_template(tokenizer)
    kept, texts, bad = [], [], 0
    for record in records:
        try:
            texts.append(render_prompt(record, tokenizer, template))
        except (ValueError, TemplateError) as e:
            where = record.where or record.prompt_id
            bad = bad_row(f"{where}: bad row: cannot render the prompt ({e})", on_bad_row, bad)
            continue
        kept.append(record)
    if bad > MAX_WARNINGS:
        log.warning("%d prompts the template refuses skipped in all", bad)
    return kept, texts


def _check_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"template 'chat': tokenizer {name} has no chat template (use r1_zero or plain)")


def render_prompt(record: PromptRecord, tokenizer: Any, template: str) -> str:
    """The text the model continues for this record under `template`."""
    if template == "r1_zero":
        return R1_ZERO_TEMPLATE.format(prompt=user_text(record))
    if template == "chat":
        _check_chat_template(tokenizer)
        return tokenizer.apply_chat_template(_messages(record), tokenize=False, add_generation_prompt=True)
    if template == "plain":
        return user_text(record)
    raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
