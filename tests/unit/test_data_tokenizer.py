"""The built-in tiny tokenizer and loading tokenizers from local folders."""

import string

import pytest

from r1mega.data.tasks import make_task
from r1mega.data.templates import R1_ZERO_TEMPLATE, render_prompt
from r1mega.data.tokenizer import CHAT_SPECIALS, EOS, TAGS, build_tiny_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny", vocab_size=256)


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder)


def texts():
    records = make_task("arithmetic", "test", 20, seed=3) + make_task("countdown", "test", 20, seed=3)
    yield R1_ZERO_TEMPLATE
    for r in records:
        yield R1_ZERO_TEMPLATE.format(prompt=r.prompt)
        yield f" <think> {r.answer} </think> <answer> {r.answer} </answer>"
    yield string.printable
    yield "  two  spaces, a trailing one \n\n and\ttabs "


def test_round_trip(tok):
    for text in texts():
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids


def test_special_tokens_and_tags_are_single_ids(tok):
    for token in [EOS, *CHAT_SPECIALS, *TAGS]:
        ids = tok(token, add_special_tokens=False).input_ids
        assert ids == [tok.convert_tokens_to_ids(token)], token
    assert tok.eos_token == tok.pad_token == EOS
    # the tags survive decoding for rewards; the chat and end-of-text tokens do not
    text = "<|im_start|><think> 1 </think><answer> 1 </answer><|endoftext|>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think> 1 </think><answer> 1 </answer>"


def test_digits_are_single_tokens(tok):
    for text in texts():
        tokens = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids)
        for t in tokens:
            assert not any(c.isdigit() for c in t) or (len(t) == 1 and t.isdigit()), t


def test_size_and_deterministic_build(folder, tmp_path):
    assert len(load_tokenizer(folder)) <= 256
    again = build_tiny_tokenizer(tmp_path / "again", vocab_size=256)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) and "tokenizer.json" in names
    for name in names:
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name
    build_tiny_tokenizer(again, vocab_size=180)  # rebuilding over an existing folder replaces it
    assert len(load_tokenizer(again)) <= 180
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no staging folder left behind
    with pytest.raises(ValueError, match="below its"):
        build_tiny_tokenizer(tmp_path / "small", vocab_size=50)


def test_task_prompts_fit_a_short_context(tok):
    for name in ("arithmetic", "countdown"):
        for r in make_task(name, "test", 20, seed=1):
            assert len(tok(render_prompt(r, tok, "r1_zero")).input_ids) < 256


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'weights'} holds no tokenizer files"):
        load_tokenizer(tmp_path / "weights")


def test_pad_defaults_to_eos(folder, tmp_path):
    from transformers import PreTrainedTokenizerFast

    raw = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token=EOS)
    assert raw.pad_token is None
    raw.save_pretrained(str(tmp_path / "nopad"))
    tok = load_tokenizer(tmp_path / "nopad")
    assert tok.pad_token == EOS and tok.pad_token_id == tok.eos_token_id
