"""BLIP's tokenizer: bert-base-uncased WordPiece plus ``[DEC]`` and ``[ENC]``.

BLIP (``init_tokenizer`` in the original code) takes BERT's WordPiece
vocabulary (30522 ids) and appends two special tokens: ``[DEC]`` as the
bos token (id 30522), which starts every decoder input (LM), and ``[ENC]``
(id 30523), which starts every image-grounded encoder input (ITM). ``[CLS]``
(101) starts the unimodal text encoder's input (ITC), ``[SEP]`` (102) ends a
caption and ``[PAD]`` is 0.

Nothing here touches the network: the tokenizer comes from a checkpoint
folder (``tokenizer.json`` / ``tokenizer_config.json`` / ``vocab.txt``) or
from a ``vocab.txt`` path, and a missing one is a clear error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

# transformers is imported where a tokenizer is built or loaded: the trainer's --help needs none.
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


class TokenizerNotFoundError(FileNotFoundError):
    """No tokenizer files where one was expected."""


@dataclass(frozen=True)
class SpecialIds:
    """The ids that name each role of the MED's text transformer (paper §3.1)."""

    pad: int
    cls: int  # unimodal text encoder (ITC)
    sep: int  # end of caption
    dec: int  # image-grounded text decoder (LM), the bos token
    enc: int  # image-grounded text encoder (ITM)


def add_blip_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Append ``[DEC]`` (bos) and ``[ENC]`` as BLIP does, unless already there."""
    vocab = tokenizer.get_vocab()
    if DEC_TOKEN not in vocab:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    elif tokenizer.bos_token != DEC_TOKEN:
        tokenizer.bos_token = DEC_TOKEN
    if ENC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    return tokenizer


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    """The role tokens' ids; an error if the tokenizer lacks any of them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in ("[PAD]", "[CLS]", "[SEP]", DEC_TOKEN, ENC_TOKEN) if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks BLIP's special tokens {missing}; load it with load_tokenizer()")
    return SpecialIds(
        pad=vocab["[PAD]"], cls=vocab["[CLS]"], sep=vocab["[SEP]"], dec=vocab[DEC_TOKEN], enc=vocab[ENC_TOKEN]
    )


def build_tokenizer(vocab_file: str | Path) -> PreTrainedTokenizerBase:
    """BLIP's tokenizer from a WordPiece ``vocab.txt`` (lower-casing, as bert-base-uncased)."""
    vocab_file = Path(vocab_file)
    if not vocab_file.is_file():
        raise TokenizerNotFoundError(f"no WordPiece vocabulary at {vocab_file}")
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert import load_vocab

    tokenizer = BertTokenizer(vocab=load_vocab(str(vocab_file)), do_lower_case=True)
    return add_blip_tokens(tokenizer)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load BLIP's tokenizer from a folder or a ``vocab.txt`` file, offline.

    A folder written by ``save_pretrained`` (or a Salesforce/HF BLIP folder)
    is read as it is; ``[DEC]`` and ``[ENC]`` are added if it lacks them.
    """
    path = Path(path)
    if path.is_file():
        return build_tokenizer(path)
    if not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerNotFoundError(
            f"no tokenizer at {path}: expected one of {', '.join(TOKENIZER_FILES)}. "
            "capfilt never downloads one; copy bert-base-uncased's vocab.txt (or a BLIP "
            "checkpoint's tokenizer files) there, or pass tokenizer=PATH."
        )
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    return add_blip_tokens(tokenizer)


# BLIP's ``pre_caption``: lower-case, drop the punctuation it strips, fold
# white space, keep at most ``max_words`` words (30 in pre-training).
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int = 30) -> str:
    """Normalise a caption as BLIP's data loaders do before tokenising."""
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text
