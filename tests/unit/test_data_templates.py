"""Prompt templates: R1-Zero's exact text, the tokenizer's chat template, plain prompts."""

import pytest

from r1mega.data.prompts import PromptRecord
from r1mega.data.templates import R1_ZERO_TEMPLATE, render_prompt
from r1mega.data.tokenizer import build_tiny_tokenizer, load_tokenizer

PLAIN = PromptRecord("p1", "What is 2 + 2?", None, "4", "arithmetic", {})
TURNS = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "2 + 2?")]
CHAT = PromptRecord("c1", None, [{"role": r, "content": c} for r, c in TURNS], "4", "chat", {})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny"))


def test_r1_zero_text_is_the_papers():
    assert R1_ZERO_TEMPLATE.format(prompt="What is 2 + 2?") == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user "
        "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
        "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> "
        "answer here </answer>. User: What is 2 + 2?. Assistant:")


def test_r1_zero_and_plain(tok):
    assert render_prompt(PLAIN, tok, "r1_zero") == R1_ZERO_TEMPLATE.format(prompt="What is 2 + 2?")
    assert render_prompt(CHAT, tok, "r1_zero").endswith("User: 2 + 2?. Assistant:")  # the last user message
    assert render_prompt(PLAIN, tok, "plain") == "What is 2 + 2?"
    assert render_prompt(CHAT, None, "plain") == "2 + 2?"
    braces = PromptRecord("b", "Solve {x}", None, "1", "s", {})
    assert render_prompt(braces, None, "r1_zero").endswith("User: Solve {x}. Assistant:")


def test_chat_template_of_the_tiny_tokenizer(tok):
    assert render_prompt(PLAIN, tok, "chat") == (
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(CHAT, tok, "chat") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n")


def test_errors(tok):
    with pytest.raises(ValueError, match="unknown template 'r1'; known: r1_zero, chat, plain"):
        render_prompt(PLAIN, tok, "r1")

    class NoChat:
        chat_template = None
        name_or_path = "/models/base"

    with pytest.raises(ValueError, match="/models/base has no chat template"):
        render_prompt(PLAIN, NoChat(), "chat")
    system_only = PromptRecord("s", None, [{"role": "system", "content": "x"}], "1", "s", {})
    with pytest.raises(ValueError, match="no user message"):
        render_prompt(system_only, tok, "r1_zero")


def test_rows_the_chat_template_refuses_are_bad_rows(tmp_path, caplog):
    """RL prompts: a row the chat template raises on (as real templates do on roles they reject) is a bad
    row named by its file and line, skipped or raised as data.on_bad_row says; a tokenizer without a chat
    template is said once."""
    import copy
    import logging

    from r1mega.data.prompts import DataError
    from r1mega.data.templates import rendered

    tok = load_tokenizer(build_tiny_tokenizer(tmp_path / "tiny"))
    strict = copy.deepcopy(tok)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    good = PromptRecord("g", "2 + 2?", None, "4", "s", {}, where="data.jsonl:1")
    bad = PromptRecord("c", None, CHAT.messages, "4", "s", {}, where="data.jsonl:2")
    with caplog.at_level(logging.WARNING, logger="r1mega.data"):
        kept, texts = rendered([good, bad], strict, "chat", "skip")
    assert kept == [good] and texts == ["2 + 2?"]
    assert any("data.jsonl:2: bad row: cannot render the prompt (System role not supported)" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(DataError, match=r"data\.jsonl:2: bad row: cannot render the prompt"):
        rendered([good, bad], strict, "chat", "error")
    strict.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        rendered([good, bad], strict, "chat", "skip")
