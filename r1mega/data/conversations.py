"""SFT conversations: loading (`messages` rows) and tokenising with a mask of the assistant's tokens.

A conversation becomes one token sequence. Each turn is rendered and tokenised on its own,
in order, so the tokens before an assistant turn are exactly the prompt the model would be
given at inference, and the assistant tokens are what it would generate. Only assistant
tokens (including the end-of-turn marker that teaches the model to stop) carry loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from jinja2.exceptions import TemplateError  # what chat templates raise (e.g. "roles must alternate")

from r1mega.config.schema import RowLimits
from r1mega.data.prompts import DataError, _messages, _optional_str, load_rows
from r1mega.data.templates import R1_ZERO_TEMPLATE

log = logging.getLogger("r1mega.data")
SFT_TEMPLATES = ("chat", "r1_zero")


@dataclass
class Conversation:
    prompt_id: str  # the row's id (unique within its file)
    messages: List[Dict[str, str]]
    data_source: str
    metadata: Dict[str, Any] = field(default_factory=dict)
    where: str = field(default="", compare=False)  # file:line (or file row N) it came from


@dataclass
class SFTSample:
    """Token ids of a whole conversation and, per token, whether it is the assistant's."""

    tokens: List[int]
    assistant: List[bool]
    source: str = ""  # file:id, for messages

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def target_tokens(self) -> int:
        """Tokens that carry loss (a target is never the first token)."""
        return sum(self.assistant[1:])


def parse_conversation(row: Any, default_id: str, source: str) -> Conversation:
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, got {type(row).__name__}")
    if row.get("messages") is None:
        raise ValueError("missing 'messages'")
    messages = _messages(row["messages"])
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to learn from")
    metadata = {k: v for k, v in row.items() if k not in ("id", "messages", "data_source")}
    return Conversation(_optional_str(row, "id", default_id), messages,
                        _optional_str(row, "data_source", source), metadata)


def load_conversations(paths: Sequence[str | Path], on_bad_row: str = "skip",
                       limits: Optional[RowLimits] = None) -> List[Conversation]:
    """Conversations of several JSONL/Parquet files, in file order (ids made unique by file)."""
    out: List[Conversation] = []
    for path in paths:
        for conv in load_rows(path, on_bad_row, parse=parse_conversation, limits=limits, columns=(("messages",),)):
            conv.metadata.setdefault("file", str(path))
            out.append(conv)
    return out


def _chat_segments(messages: List[Dict[str, str]], tokenizer) -> List[Tuple[str, bool]]:
    """(text, is_assistant) pieces whose concatenation is the chat template's rendering."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("sft.template=chat: the tokenizer has no chat template (use r1_zero)")
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=gen)
    pieces, done = [], ""
    for i, m in enumerate(messages):
        full = render(messages[:i + 1])
        if m["role"] == "assistant":
            head = render(messages[:i], gen=True) if i else render([], gen=True)
            if not (head.startswith(done) and full.startswith(head)):
                raise ValueError("the chat template does not render turn by turn (a later turn changes "
                                 "earlier text); assistant tokens cannot be located")
            mine = full[len(head):]
            if m["content"].strip() not in mine:
                # e.g. DeepSeek-R1's template keeps only the text after </think> of past turns
                raise ValueError("the chat template rewrites the assistant's content (reasoning dropped?); use "
                                 "sft.template=r1_zero or a template that renders assistant turns verbatim")
            pieces += [(head[len(done):], False), (mine, True)]
        else:
            if not full.startswith(done):
                raise ValueError("the chat template does not render turn by turn; assistant tokens "
                                 "cannot be located")
            pieces.append((full[len(done):], False))
        done = full
    return [(text, mine) for text, mine in pieces if text]


def _r1_zero_segments(messages: List[Dict[str, str]], eos: str) -> List[Tuple[str, bool]]:
    turns = [m for m in messages if m["role"] != "system"]
    if [m["role"] for m in turns] != ["user", "assistant"]:
        raise ValueError("sft.template=r1_zero takes one user and one assistant message")
    return [(R1_ZERO_TEMPLATE.format(prompt=turns[0]["content"]), False), (turns[1]["content"] + eos, True)]


def tokenize_conversation(conv: Conversation, tokenizer, template: str) -> SFTSample:
    """Token ids and the assistant mask; ValueError when the conversation cannot be rendered."""
    if template == "chat":
        pieces = _chat_segments(conv.messages, tokenizer)
    elif template == "r1_zero":
        if tokenizer.eos_token is None:
            raise ValueError("sft.template=r1_zero needs a tokenizer with an EOS token")
        pieces = _r1_zero_segments(conv.messages, tokenizer.eos_token)
    else:
        raise ValueError(f"unknown SFT template {template!r}; known: {', '.join(SFT_TEMPLATES)}")
    tokens: List[int] = []
    assistant: List[bool] = []
    for text, mine in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens += ids
        assistant += [mine] * len(ids)
    return SFTSample(tokens, assistant, f"{conv.metadata.get('file', '')}:{conv.prompt_id}")


def tokenize_all(convs: Sequence[Conversation], tokenizer, template: str, max_seq_length: int,
                 on_bad_row: str = "skip", split: str = "train") -> List[SFTSample]:
    """Samples that fit max_seq_length and have assistant targets; the others warn (or raise)."""
    out: List[SFTSample] = []
    problems: Dict[str, List[str]] = {}
    for conv in convs:
        try:
            sample = tokenize_conversation(conv, tokenizer, template)
        except (ValueError, TemplateError) as e:
            reason = str(e)
        else:
            if len(sample) > max_seq_length:
                reason = f"longer than sft.max_seq_length={max_seq_length}"
            elif sample.target_tokens == 0:
                reason = "no assistant tokens after tokenisation"
            else:
                out.append(sample)
                continue
        where = f"{conv.metadata.get('file', '?')} id {conv.prompt_id}"
        if on_bad_row == "error":
            raise DataError(f"{where}: {reason}")
        problems.setdefault(reason, []).append(where)
    for reason, where in problems.items():
        log.warning("%s split: %d conversations skipped (%s%s): %s", split, len(where), ", ".join(where[:3]),
                    ", ..." if len(where) > 3 else "", reason)
    if convs and not out:
        raise ValueError(f"{split} split: none of the {len(convs)} conversations is usable")
    return out


def conversation_row(prompt_id: str, prompt: str, response: str, data_source: str,
                     provenance: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A JSONL row of a one-turn SFT conversation (what rejection sampling and the built-in data write)."""
    row: Dict[str, Any] = {"id": prompt_id, "messages": [{"role": "user", "content": prompt},
                                                        {"role": "assistant", "content": response}],
                           "data_source": data_source}
    if provenance is not None:
        row["provenance"] = provenance
    return row
