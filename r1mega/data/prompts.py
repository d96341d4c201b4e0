"""Prompt records from JSONL or Parquet: `prompt` or chat `messages`, ground-truth `answer`.

Bad rows (invalid JSON, non-UTF-8 bytes, numbers Python will not convert, nesting deeper than the
parser goes, rows or fields over the size limits, missing or mistyped fields, a conversation
without a user turn, repeated ids) are reported with the file and line (JSONL) or row (Parquet,
1-based), then skipped with a warning or raised as DataError, as the caller chooses. Nothing a
row holds stops the load of the others. A Parquet file without a column every row needs is
refused whole, naming the column.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from r1mega.config.schema import RowLimits

log = logging.getLogger("r1mega.data")
MAX_WARNINGS = 10  # individual bad-row warnings per file; the rest are only counted
_KNOWN = {"id", "prompt", "messages", "answer", "data_source", "metadata"}


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and line."""


@dataclass
class PromptRecord:
    """One prompt with its ground truth; exactly one of `prompt` and `messages` is set."""

    prompt_id: str
    prompt: Optional[str]
    messages: Optional[List[Dict[str, str]]]
    answer: str
    data_source: str
    metadata: Dict[str, Any] = field(default_factory=dict)
    token_ids: Optional[List[int]] = None  # the rendered prompt's tokens, set once at a run's set-up
    where: str = field(default="", compare=False)  # file:line (or file row N) it came from, for messages


def _messages(value: Any) -> List[Dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"'messages' must be a non-empty list of {{role, content}}, got {value!r:.40}")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}] needs string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(value: Any) -> str:
    if value is None:
        raise ValueError("missing 'answer'")
    # bool is an int subclass, but `true` as a ground truth is almost surely a mistake
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"'answer' must be a string or a number, got {type(value).__name__}")
    return str(value)


def _optional_str(row: Dict[str, Any], key: str, default: str) -> str:
    value = row.get(key)
    if value is None:  # Parquet gives null where a row lacks a column other rows have
        return default
    if key == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def parse_row(row: Any, prompt_id: str, source: str) -> PromptRecord:
    """One record from a decoded row; ValueError says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, got {type(row).__name__}")
    prompt, messages = row.get("prompt"), row.get("messages")
    if prompt is None and messages is None:
        raise ValueError("missing 'prompt' (or 'messages')")
    if prompt is not None and messages is not None:
        raise ValueError("has both 'prompt' and 'messages'; give one")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
    answer = _answer(row.get("answer"))
    if messages is not None:
        messages = _messages(messages)
        if not any(m["role"] == "user" for m in messages):
            raise ValueError("'messages' has no user turn to answer")
    metadata = row.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"'metadata' must be an object, got {type(metadata).__name__}")
    extra = {k: v for k, v in row.items() if k not in _KNOWN}
    return PromptRecord(_optional_str(row, "id", prompt_id), prompt, messages, answer,
                        _optional_str(row, "data_source", source), {**extra, **(metadata or {})})


Rows = Iterator[Tuple[str, int, Any]]  # (where, number, decoded row or the ValueError it raised)
# columns a row needs, each a tuple of alternatives (Parquet files missing one are refused whole)
Columns = Sequence[Tuple[str, ...]]
PROMPT_COLUMNS: Columns = (("prompt", "messages"), ("answer",))


def _too_large(size: int, limits: RowLimits) -> Optional[ValueError]:
    if size > limits.max_row_bytes:
        return ValueError(f"{size} bytes, over the limit of {limits.max_row_bytes} (limits.max_row_bytes)")
    return None


def _lines(f, limit: int) -> Iterator[Tuple[bytes, int]]:
    """(line, its size) of a binary file; a line over `limit` bytes comes as b"" with its size, never
    held whole (one hostile line of many GB must not take the memory)."""
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        if len(raw) <= limit:
            yield raw, len(raw)
            continue
        size = len(raw)
        while not raw.endswith(b"\n"):
            raw = f.readline(1 << 20)
            if not raw:
                break
            size += len(raw)
        yield b"", size


def _jsonl_rows(path: Path, limits: RowLimits, columns: Columns) -> Rows:
    with path.open("rb") as f:  # bytes: one non-UTF-8 line must not stop the others
        for number, (raw, size) in enumerate(_lines(f, limits.max_row_bytes), start=1):
            where = f"{path}:{number}"
            too_large = _too_large(size, limits)
            if too_large is not None:  # not decoded, nor held, at all
                yield where, number, too_large
                continue
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # editors on Windows start files with a BOM
            if not raw.strip():
                continue
            try:
                yield where, number, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield where, number, ValueError(f"not UTF-8 ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:
                yield where, number, ValueError(f"invalid JSON ({e.msg}, column {e.colno})")
            except ValueError as e:  # an integer of more digits than Python converts (4300 by default)
                yield where, number, ValueError(f"unreadable JSON ({str(e).splitlines()[0]})")
            except RecursionError:
                yield where, number, ValueError("JSON nested deeper than the parser goes")


def _parquet_rows(path: Path, limits: RowLimits, columns: Columns) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise DataError(f"{path}: cannot read Parquet ({e})") from None
    names = set(table.column_names)
    for alternatives in columns:
        if not names & set(alternatives):
            raise DataError(f"{path}: no {' or '.join(repr(a) for a in alternatives)} column "
                            f"(columns: {', '.join(table.column_names) or 'none'})")
    for number, row in enumerate(table.to_pylist(), start=1):
        size = len(json.dumps(row, default=str).encode())  # as a JSONL line would hold it
        yield f"{path} row {number}", number, _too_large(size, limits) or row


def _check_fields(row: Any, limits: RowLimits) -> None:
    """Text fields over limits.max_field_chars: the row's strings, and its messages' contents."""
    if not isinstance(row, dict):
        return
    texts = [(repr(k), v) for k, v in row.items()]
    messages = row.get("messages")
    if isinstance(messages, list):
        texts += [(f"messages[{i}].content", m.get("content")) for i, m in enumerate(messages) if isinstance(m, dict)]
    for name, value in texts:
        if isinstance(value, str) and len(value) > limits.max_field_chars:
            raise ValueError(f"{name} has {len(value)} characters, over the limit of {limits.max_field_chars} "
                             f"(limits.max_field_chars)")


READERS = {".jsonl": _jsonl_rows, ".parquet": _parquet_rows}


def _records(path: Path, rows: Rows, on_bad_row: str, source: str, parse, limits: RowLimits) -> Tuple[list, int]:
    """Parsed rows (parse(row, default_id, source); each record gets its `where`) and the count of bad ones."""
    records: list = []
    first_seen: Dict[str, str] = {}
    bad = 0
    for where, number, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            _check_fields(row, limits)
            record = parse(row, f"{path.stem}:{number}", source)
            record.where = where
            # ids name prompts in logs and derived datasets: a repeat would make them ambiguous
            if record.prompt_id in first_seen:
                raise ValueError(f"id {record.prompt_id!r} repeats the one at {first_seen[record.prompt_id]}")
            first_seen[record.prompt_id] = where
            records.append(record)
        except ValueError as e:
            bad = bad_row(f"{where}: bad row: {e}", on_bad_row, bad)
    return records, bad


def bad_row(message: str, on_bad_row: str, bad: int) -> int:
    """A bad row: DataError with on_bad_row=error, else a warning (the first MAX_WARNINGS); the new count."""
    if on_bad_row == "error":
        raise DataError(message) from None
    if bad < MAX_WARNINGS:
        log.warning("%s (skipped)", message)
    return bad + 1


def load_prompts(path: str | Path, on_bad_row: str = "skip", default_source: Optional[str] = None,
                 limits: Optional[RowLimits] = None) -> List[PromptRecord]:
    """Records of a .jsonl or .parquet file; bad rows warn and are skipped, or raise DataError."""
    return load_rows(path, on_bad_row, default_source, limits=limits)


def load_rows(path: str | Path, on_bad_row: str = "skip", default_source: Optional[str] = None,
              parse=None, limits: Optional[RowLimits] = None, columns: Columns = PROMPT_COLUMNS) -> list:
    """Rows of a .jsonl or .parquet file parsed by `parse` (default: prompt records, whose `columns`
    are the default); each needs a `prompt_id`, unique in the file, and a `where`. Bad rows warn and
    are skipped, or raise DataError. `limits`: RowLimits' defaults when None."""
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r} (use .jsonl or .parquet)")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    limits = limits or RowLimits()
    records, bad = _records(path, reader(path, limits, columns), on_bad_row, default_source or path.stem,
                            parse or parse_row, limits)
    if bad > MAX_WARNINGS:
        log.warning("%s: %d bad rows skipped in all (%d valid rows kept)", path, bad, len(records))
    if not records:
        raise DataError(f"{path}: no valid rows" + (f" ({bad} bad rows)" if bad else " (the file is empty)"))
    return records
