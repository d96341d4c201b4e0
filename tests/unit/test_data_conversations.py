"""SFT conversations: loading, turn-by-turn tokenisation, assistant-only masks (checked against
transformers' own assistant mask of a chat template with generation markers)."""

import json

import pytest

from r1mega.data.conversations import (Conversation, load_conversations, tokenize_all, tokenize_conversation)
from r1mega.data.prompts import DataError
from r1mega.data.templates import R1_ZERO_TEMPLATE
from r1mega.data.tokenizer import build_tiny_tokenizer, load_tokenizer

TURNS = [("system", "Be brief."), ("user", "What is 12 + 5?"), ("assistant", "<think> 2 + 5 = 7 </think> 17"),
         ("user", "And 3 + 4?"), ("assistant", "7")]
# the tiny tokenizer's chat template with the assistant's part marked for transformers' mask
GENERATION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny", vocab_size=384))


def conversation(turns=TURNS, cid="c1"):
    return Conversation(cid, [{"role": r, "content": c} for r, c in turns], "test", {"file": "f.jsonl"})


def test_chat_mask_equals_transformers_assistant_mask(tok):
    tok.chat_template = GENERATION_TEMPLATE
    conv = conversation()
    ours = tokenize_conversation(conv, tok, "chat")
    theirs = tok.apply_chat_template(conv.messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    assert ours.tokens == theirs["input_ids"]
    assert ours.assistant == [bool(x) for x in theirs["assistant_masks"]]
    assert sum(ours.assistant) > 0 and not all(ours.assistant)


def test_assistant_tokens_decode_to_the_assistant_turns(tok):
    sample = tokenize_conversation(conversation(), tok, "chat")
    mine = tok.decode([t for t, a in zip(sample.tokens, sample.assistant) if a])
    assert mine == "<think> 2 + 5 = 7 </think> 17<|im_end|>\n7<|im_end|>\n"
    prompt_part = tok.decode([t for t, a in zip(sample.tokens, sample.assistant) if not a])
    assert "What is 12 + 5?" in prompt_part and "17" not in prompt_part


def test_r1_zero_prompt_is_the_rl_prompt_and_eos_is_learned(tok):
    conv = conversation([("user", "What is 12 + 5?"), ("assistant", " <think> 2 + 5 = 7 </think> "
                                                                    "<answer> 17 </answer>")])
    sample = tokenize_conversation(conv, tok, "r1_zero")
    prompt_ids = tok(R1_ZERO_TEMPLATE.format(prompt="What is 12 + 5?"), add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert sample.tokens[:n] == prompt_ids and not any(sample.assistant[:n])
    assert all(sample.assistant[n:]) and sample.tokens[-1] == tok.eos_token_id
    assert tok.decode(sample.tokens[n:-1]) == " <think> 2 + 5 = 7 </think> <answer> 17 </answer>"
    assert sample.target_tokens == len(sample) - n


def test_r1_zero_refuses_multi_turn(tok):
    with pytest.raises(ValueError, match="one user and one assistant"):
        tokenize_conversation(conversation(), tok, "r1_zero")


def test_long_and_unusable_conversations_are_skipped_or_raise(tok):
    short = conversation([("user", "Hi"), ("assistant", "Hello")], "short")
    long = conversation([("user", "Hi " * 200), ("assistant", "Hello")], "long")
    multi = conversation(cid="multi")
    kept = tokenize_all([short, long, multi], tok, "r1_zero", max_seq_length=128)
    assert [s.source for s in kept] == ["f.jsonl:short"]
    with pytest.raises(DataError, match="f.jsonl id long: longer than sft.max_seq_length=128"):
        tokenize_all([short, long], tok, "r1_zero", max_seq_length=128, on_bad_row="error")
    with pytest.raises(ValueError, match="none of the 1 conversations"):
        tokenize_all([long], tok, "r1_zero", max_seq_length=128)


def test_loading_reports_bad_rows_with_file_and_line(tmp_path):
    path = tmp_path / "conv.jsonl"
    good = {"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}
    rows = [json.dumps(good), "{not json", json.dumps({"id": "b", "messages": [{"role": "user", "content": "q"}]}),
            json.dumps({"id": "c", "prompt": "q"}), json.dumps({**good, "id": "d", "extra": 1})]
    path.write_text("\n".join(rows) + "\n")
    convs = load_conversations([path])
    assert [c.prompt_id for c in convs] == ["a", "d"]
    assert convs[1].metadata["extra"] == 1 and convs[1].metadata["file"] == str(path)
    with pytest.raises(DataError, match=rf"{path}:2: bad row: invalid JSON"):
        load_conversations([path], on_bad_row="error")
    path.write_text("\n".join(rows[2:4]) + "\n")
    with pytest.raises(DataError, match="no assistant message"):
        load_conversations([path], on_bad_row="error")


def test_templates_that_rewrite_or_refuse_turns_are_reported(tok):
    conv = conversation()
    tok.chat_template = (  # keeps only what follows </think> in assistant turns, as R1's own template does
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
        "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match="rewrites the assistant's content"):
        tokenize_conversation(conv, tok, "chat")
    tok.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(DataError, match="f.jsonl id c1: System role not supported"):
        tokenize_all([conv], tok, "chat", max_seq_length=512, on_bad_row="error")
    with pytest.raises(ValueError, match="none of the 1 conversations"):
        tokenize_all([conv], tok, "chat", max_seq_length=512)
