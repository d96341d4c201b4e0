"""Loading prompt records from JSONL and Parquet, and reporting bad rows with file and line."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1mega.data.prompts import MAX_WARNINGS, DataError, PromptRecord, load_prompts

GOOD = {"prompt": "What is 1 + 1?", "answer": "2"}
USER = {"role": "user", "content": "x"}


def write_jsonl(path, rows):
    """Rows are dicts (dumped as JSON) or raw bytes (written as they are)."""
    with open(path, "wb") as f:
        for row in rows:
            f.write((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n")
    return path


def test_jsonl_plain_and_chat_rows(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", [
        {"prompt": "What is 1 + 1?", "answer": 2, "level": 3},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pi?"}],
         "answer": 3.14, "data_source": "gsm", "id": "q7", "metadata": {"level": 5, "topic": "geometry"}},
    ])
    plain, chat = load_prompts(path)
    assert plain == PromptRecord("math:1", "What is 1 + 1?", None, "2", "math", {"level": 3})
    assert (plain.where, chat.where) == (f"{path}:1", f"{path}:2")
    assert chat.prompt is None and chat.messages[1] == {"role": "user", "content": "Pi?"}
    assert (chat.prompt_id, chat.answer, chat.data_source) == ("q7", "3.14", "gsm")
    assert chat.metadata == {"level": 5, "topic": "geometry"}  # the explicit metadata field wins


def test_default_source_blank_lines_and_bom(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n\n   \n" + json.dumps(GOOD).encode())
    records = load_prompts(path, default_source="mine")
    assert [r.prompt_id for r in records] == ["train:1", "train:4"]  # ids keep the file's line numbers
    assert {r.data_source for r in records} == {"mine"}


def test_parquet_rows(tmp_path):
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.table({
        "prompt": pa.array(["What is 2 + 3?", None, None], pa.string()),
        "messages": pa.array([None, [{"role": "user", "content": "Hi?"}], None], pa.list_(message)),
        "answer": pa.array(["5", "hello", "x"]),
        "data_source": pa.array([None, "chat", None], pa.string()),
        "difficulty": pa.array([1, 2, 3]),
    })
    path = tmp_path / "mixed.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"mixed\.parquet row 3: bad row: missing 'prompt'"):
        load_prompts(path, on_bad_row="error")
    plain, chat = load_prompts(path)
    assert plain == PromptRecord("mixed:1", "What is 2 + 3?", None, "5", "mixed", {"difficulty": 1})
    assert plain.where == f"{path} row 1"
    assert chat.messages == [{"role": "user", "content": "Hi?"}] and chat.data_source == "chat"
    assert chat.metadata == {"difficulty": 2}


BAD_ROWS = {
    "invalid JSON": (b'{"prompt": "x", "answer": ', "invalid JSON"),
    "not UTF-8": (b'{"prompt": "caf\xe9", "answer": "1"}', "not UTF-8"),
    "not an object": (b"[1, 2]", "must be an object"),
    "no prompt": ({"answer": "1"}, "missing 'prompt'"),
    "no answer": ({"prompt": "x"}, "missing 'answer'"),
    "prompt is a list": ({"prompt": ["x"], "answer": "1"}, "'prompt' must be a string, got list"),
    "answer is a dict": (
        {"prompt": "x", "answer": {"v": 1}}, "'answer' must be a string or a number, got dict"),
    "answer is a bool": ({"prompt": "x", "answer": True}, "'answer' must be a string or a number"),
    "both prompt and messages": ({"prompt": "x", "messages": [USER], "answer": "1"}, "both 'prompt' and"),
    "messages not a list": ({"messages": "hi", "answer": "1"}, "'messages' must be a non-empty list"),
    "messages empty": ({"messages": [], "answer": "1"}, "'messages' must be a non-empty list"),
    "message without content": ({"messages": [USER, {"role": "user"}], "answer": "1"}, r"messages\[1\] need"),
    "message content not text": ({"messages": [{"role": "user", "content": 5}], "answer": "1"},
                                 r"messages\[0\] needs string"),
    "metadata not an object": ({"prompt": "x", "answer": "1", "metadata": [1]}, "'metadata' must be an obj"),
    "data_source not text": ({"prompt": "x", "answer": "1", "data_source": 3}, "'data_source' must be a str"),
    "repeated id": ({"id": "a", "prompt": "x", "answer": "1"}, r"id 'a' repeats the one at .*data\.jsonl:1"),
    # what json.loads raises outside JSONDecodeError: each used to stop the whole load
    "integer of 5000 digits": (b'{"prompt": "x", "answer": ' + b"9" * 5000 + b"}", "unreadable JSON"),
    "nesting 100000 deep": (b'{"prompt": "x", "answer": "1", "m": ' + b"[" * 100000 + b"]" * 100000 + b"}",
                            "nested deeper than the parser goes"),
    "no user turn": ({"messages": [{"role": "system", "content": "Be brief."}], "answer": "1"}, "no user turn"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_row_error_mode_names_file_and_line(tmp_path, kind):
    row, reason = BAD_ROWS[kind]
    path = write_jsonl(tmp_path / "data.jsonl", [{"id": "a", **GOOD}, GOOD, row, GOOD])
    with pytest.raises(DataError, match=rf"data\.jsonl:3: bad row: .*{reason}"):
        load_prompts(path, on_bad_row="error")


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_row_skip_mode_warns_and_keeps_the_rest(tmp_path, kind, caplog):
    row, _ = BAD_ROWS[kind]
    path = write_jsonl(tmp_path / "data.jsonl", [{"id": "a", **GOOD}, GOOD, row, GOOD])
    with caplog.at_level(logging.WARNING, logger="r1mega.data"):
        records = load_prompts(path)
    assert [r.prompt_id for r in records] == ["a", "data:2", "data:4"]
    warnings = [r for r in caplog.records if r.name == "r1mega.data"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert f"{path}:3: bad row" in warnings[0].getMessage()


def test_warnings_are_capped_then_summarised(tmp_path, caplog):
    path = write_jsonl(tmp_path / "noisy.jsonl", [GOOD] + [{"prompt": "x"}] * (MAX_WARNINGS + 15))
    with caplog.at_level(logging.WARNING, logger="r1mega.data"):
        assert len(load_prompts(path)) == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "r1mega.data"]
    assert len(messages) == MAX_WARNINGS + 1
    assert f"{MAX_WARNINGS + 15} bad rows skipped" in messages[-1]


def test_empty_and_all_bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jsonl: no valid rows"):
        load_prompts(empty)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}, b"{oops"])
    with pytest.raises(DataError, match=r"bad\.jsonl: no valid rows \(2 bad rows\)"):
        load_prompts(bad)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such data file"):
        load_prompts(tmp_path / "missing.jsonl")
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown data format '\.csv'"):
        load_prompts(csv)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot read Parquet"):
        load_prompts(broken)
    with pytest.raises(ValueError, match="on_bad_row"):
        load_prompts(csv, on_bad_row="ignore")


def test_rows_and_fields_over_the_limits(tmp_path):
    """A line over max_row_bytes is not even decoded; a prompt, answer or message content over
    max_field_chars is named; both are bad rows like any other, the rest load."""
    from r1mega.config.schema import RowLimits

    limits = RowLimits(max_row_bytes=200, max_field_chars=20)
    path = write_jsonl(tmp_path / "big.jsonl", [
        GOOD, {"prompt": "x" * 300, "answer": "1"}, {"prompt": "y" * 21, "answer": "1"},
        {"messages": [{"role": "user", "content": "z" * 25}], "answer": "1"}, {"prompt": "ok", "answer": "2" * 30}])
    with pytest.raises(DataError, match=r"big\.jsonl:2: bad row: \d+ bytes, over the limit of 200 "
                                        r"\(limits\.max_row_bytes\)"):
        load_prompts(path, on_bad_row="error", limits=limits)
    records = load_prompts(path, limits=limits)
    assert [r.prompt_id for r in records] == ["big:1"]
    for line, field in ((3, "'prompt'"), (4, r"messages\[0\]\.content"), (5, "'answer'")):
        rows = [GOOD] * (line - 1) + [json.loads(path.read_text().splitlines()[line - 1])]
        one = write_jsonl(tmp_path / f"one{line}.jsonl", [{**r, "id": str(i)} for i, r in enumerate(rows)])
        with pytest.raises(DataError, match=rf":{line}: bad row: {field} has \d+ characters, over the limit of 20"):
            load_prompts(one, on_bad_row="error", limits=limits)


def test_parquet_missing_a_column_is_refused_whole(tmp_path):
    for columns, named in (({"prompt": ["a", "b"], "id": ["1", "2"]}, "no 'answer' column"),
                           ({"answer": ["1"]}, "no 'prompt' or 'messages' column")):
        path = tmp_path / f"{len(columns)}.parquet"
        pq.write_table(pa.table(columns), path)
        with pytest.raises(DataError, match=rf"{path.name}: {named} \(columns: "):
            load_prompts(path)


def test_a_line_far_over_the_limit_is_skipped_without_being_held(tmp_path):
    """A 3 MB line against a 1 KB limit is read past in pieces (never whole), reported with its size, and
    the lines after it keep their numbers."""
    from r1mega.config.schema import RowLimits

    path = write_jsonl(tmp_path / "huge.jsonl", [GOOD, {"prompt": "x" * (3 << 20), "answer": "1"}, GOOD])
    with pytest.raises(DataError, match=r"huge\.jsonl:2: bad row: 31457\d\d bytes, over the limit of 1024"):
        load_prompts(path, on_bad_row="error", limits=RowLimits(max_row_bytes=1024))
    records = load_prompts(path, limits=RowLimits(max_row_bytes=1024))
    assert [(r.prompt_id, r.where) for r in records] == [("huge:1", f"{path}:1"), ("huge:3", f"{path}:3")]
