"""What an export carries besides weights (r1mega.checkpoint.hf_files), and each step once in a
resumed run's metrics (r1mega.trainer.metrics)."""

from __future__ import annotations

import json
import time

from r1mega.checkpoint.hf_files import carried_files, carry, has_tokenizer, write_generation_config
from r1mega.trainer.metrics import METRICS_FILE, MetricsLog, keep_through, read_rows


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(name)


def test_carried_files_leave_weights_config_and_checkpoint_files_out(tmp_path):
    _touch(tmp_path, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
           "LICENSE", "tokenization_custom.py", "special_tokens_map.json", "tokenizer.model",
           # regenerated, or megatron's and r1mega's own
           "config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
           "pytorch_model.bin", "__0_0.distcp", ".metadata", "metadata.json", "common.pt", "model.yaml",
           # about weights the export does not hold
           "hf_quant_config.json", "adapter_config.json", "trainer_state.json")
    _touch(tmp_path / "original", "consolidated.00.pth")
    _touch(tmp_path / "additional_chat_templates", "tool_use.jinja")
    assert [f.name for f in carried_files(tmp_path)] == [
        "LICENSE", "additional_chat_templates", "chat_template.jinja", "generation_config.json",
        "special_tokens_map.json", "tokenization_custom.py", "tokenizer.json", "tokenizer.model",
        "tokenizer_config.json"]
    assert carried_files(tmp_path / "missing") == []


def test_carry_copies_in_order_bytes_unchanged(tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _touch(a, "LICENSE", "README.md", "tokenizer.json")
    (a / "LICENSE").write_bytes(b"\x00first\xff")
    _touch(b, "LICENSE")
    out.mkdir()
    assert sorted(carry([None, "", a, tmp_path / "missing", b], out)) == ["LICENSE", "README.md", "tokenizer.json"]
    assert (out / "LICENSE").read_text() == "LICENSE" and (out / "tokenizer.json").read_text() == "tokenizer.json"
    assert has_tokenizer(out) and not has_tokenizer(a / "nothing")


def test_a_tokenizer_comes_whole_from_one_folder(tmp_path):
    """The weights' source had one tokenizer (with a chat template and a SentencePiece model), the run
    trained with another: the export holds the second alone, nothing of the first mixed in."""
    weights, tokenizer, out = tmp_path / "weights", tmp_path / "tokenizer", tmp_path / "out"
    _touch(weights, "LICENSE", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja")
    _touch(weights / "additional_chat_templates", "tool_use.jinja")
    _touch(tokenizer, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    (tokenizer / "tokenizer.json").write_text("the run's")
    out.mkdir()
    assert sorted(carry([weights, tokenizer], out)) == [
        "LICENSE", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert (out / "tokenizer.json").read_text() == "the run's"
    assert not (out / "chat_template.jinja").exists() and not (out / "additional_chat_templates").exists()


class _Tokenizer:
    bos_token_id, eos_token_id, pad_token_id = None, 7, None


def test_generation_config_from_the_tokenizer_unless_carried(tmp_path, caplog):
    path = write_generation_config(tmp_path, _Tokenizer())
    config = json.loads(path.read_text())
    assert config["eos_token_id"] == 7 and config["pad_token_id"] == 7 and "bos_token_id" not in config
    path.write_text('{"temperature": 0.6, "eos_token_id": [5, 7]}')
    assert write_generation_config(tmp_path, _Tokenizer()) is None  # the model's own is kept
    assert json.loads(path.read_text()) == {"temperature": 0.6, "eos_token_id": [5, 7]} and not caplog.records
    path.write_text('{"eos_token_id": 5}')
    assert write_generation_config(tmp_path, _Tokenizer()) is None
    assert "is not the tokenizer's eos" in caplog.text


def _write(file, steps):
    file.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in steps))


def test_resume_keeps_the_rows_through_its_checkpoint(tmp_path):
    file = tmp_path / METRICS_FILE
    _write(file, [0, 1, 2, 3])
    file.write_text(file.read_text() + '{"step": 4, "lo')  # killed mid-row
    keep_through(file, 2)
    assert [r["step"] for r in read_rows(file)] == [0, 1, 2]
    assert file.read_text().endswith("\n") and list(tmp_path.iterdir()) == [file]  # no temporary left
    keep_through(file, 2)  # nothing more to drop: left as it is
    assert [r["step"] for r in read_rows(file)] == [0, 1, 2]
    keep_through(file, 0)  # a fresh start into the folder: the old run's rows go
    assert file.read_text() == ""


def test_metrics_log_and_tensorboard_hold_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLog(tmp_path, 5, tensorboard=True, progress=False)
    for step in range(0, 4):
        first.write(step, {"loss": float(step)})
    first.close()  # killed after step 3; its checkpoint is step 2
    # event files are named by the second they were opened in, then a counter compared as text:
    # the resumed run's file must sort after the killed run's, as it does between two processes
    time.sleep(1.1)
    second = MetricsLog(tmp_path, 5, tensorboard=True, progress=False, start_step=2)
    for step in (3, 4):
        second.write(step, {"loss": 10.0 + step})
    second.close()
    rows = read_rows(tmp_path / METRICS_FILE)
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0),
                                                                    (4, 14.0)]
