"""Tokenizers: HF tokenizers from local folders, and the built-in tiny model's own.

The tiny tokenizer is a small BPE over printable ASCII, trained on the built-in tasks'
prompts rendered with the R1-Zero template, with single-digit number tokens and the
think/answer tags as single tokens. It is saved in HF format, so one loading path serves it
and real models.
"""

from __future__ import annotations

import re
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any, Iterator

from r1mega.data.tasks import make_task
from r1mega.data.templates import R1_ZERO_TEMPLATE
from r1mega.platform.atomic import publish

EOS = "<|endoftext|>"
UNK = "<|unk|>"
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
SPACE = "\u2581"  # stands for a space inside tokens, as in SentencePiece
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
CORPUS_PROBLEMS = 300  # per built-in task


def load_tokenizer(path: str | Path) -> Any:
    """An HF tokenizer from a local folder (no download); pad defaults to EOS."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)})")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _training_text() -> Iterator[str]:
    """Rendered task prompts and answers: what the tiny model reads, so merges go where they pay."""
    # the tags become single added tokens; merges spent on their letters would be wasted
    tags = re.compile("|".join(map(re.escape, TAGS)))
    for name in ("arithmetic", "countdown"):
        for r in make_task(name, "train", CORPUS_PROBLEMS, seed=0):
            yield tags.sub("", R1_ZERO_TEMPLATE.format(prompt=r.prompt))
            yield r.answer


def _train(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOS, UNK, *CHAT_SPECIALS]
    alphabet = sorted(set(string.printable) - {" "} | {SPACE})  # any printable ASCII text round-trips
    floor = len(alphabet) + len(specials) + len(TAGS)
    if vocab_size < floor:
        raise ValueError(f"tiny tokenizer: vocab_size={vocab_size} is below its {floor} base tokens")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Spaces become SPACE attached to the next word and come back exactly on decoding;
    # digits are split off one by one so numbers are always spelled digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(TAGS), special_tokens=specials,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  show_progress=False)
    tok.train_from_iterator(_training_text(), trainer=trainer)
    tok.add_tokens(TAGS)  # plain added tokens: decoding with skip_special_tokens keeps them
    return tok


def tiny_vocabulary(vocab_size: int) -> dict:
    """token -> id of the built-in tiny tokenizer of this size (trained here, deterministically, not saved)."""
    return _train(vocab_size).get_vocab(with_added_tokens=True)


def build_tiny_tokenizer(folder: str | Path, vocab_size: int = 256) -> Path:
    """Train (deterministically) and save the built-in tiny tokenizer in HF format; returns the folder."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=_train(vocab_size), eos_token=EOS, pad_token=EOS,
                                      unk_token=UNK, additional_special_tokens=CHAT_SPECIALS,
                                      clean_up_tokenization_spaces=False)
    wrapped.chat_template = CHAT_TEMPLATE

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and moved in, so a reader never sees a half-written folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        wrapped.save_pretrained(str(staging))
        publish(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
