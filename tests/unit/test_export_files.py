"""What an export carries besides weights (r1mega.checkpoint.hf_files), and each step once in a
resumed run's metrics (r1mega.trainer.metrics)."""

from __future__ import annotations

import json

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
           "pytorch_model.bin", "__0_0.distcp", ".metadata", "metadata.json", "common.pt", "model.yaml")
    (tmp_path / "original").mkdir()
    _touch(tmp_path / "original", "consolidated.00.pth")
    assert [f.name for f in carried_files(tmp_path)] == [
        "LICENSE", "chat_template.jinja", "generation_config.json", "special_tokens_map.json",
        "tokenization_custom.py", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert carried_files(tmp_path / "missing") == []


def test_carry_copies_in_order_bytes_unchanged(tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _touch(a, "LICENSE", "tokenizer.json")
    (a / "tokenizer.json").write_bytes(b"\x00first\xff")
    b.mkdir()
    (b / "tokenizer.json").write_bytes(b"second")
    out.mkdir()
    assert sorted(carry([None, a, tmp_path / "missing", b], out)) == ["LICENSE", "tokenizer.json"]
    assert (out / "tokenizer.json").read_bytes() == b"second" and (out / "LICENSE").read_text() == "LICENSE"
    assert has_tokenizer(out) and not has_tokenizer(a / "nothing")


class _Tokenizer:
    bos_token_id, eos_token_id, pad_token_id = None, 7, None


def test_generation_config_from_the_tokenizer_unless_carried(tmp_path):
    path = write_generation_config(tmp_path, _Tokenizer())
    config = json.loads(path.read_text())
    assert config["eos_token_id"] == 7 and config["pad_token_id"] == 7 and "bos_token_id" not in config
    path.write_text('{"temperature": 0.6}')
    assert write_generation_config(tmp_path, _Tokenizer()) is None  # the model's own is kept
    assert json.loads(path.read_text()) == {"temperature": 0.6}


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
