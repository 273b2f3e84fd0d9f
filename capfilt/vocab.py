"""Small WordPiece vocabularies for models that do not need bert-base's 30522 ids.

Real BLIP checkpoints use bert-base-uncased's vocabulary. The tiny test models
and the shapes-world demo models use a compact one laid out like BERT's
(``[PAD]`` 0, ``[UNK]`` 100, ``[CLS]`` 101, ``[SEP]`` 102, ``[MASK]`` 103),
so that every special id is the one BLIP uses, followed by single characters
and their ``##`` continuations (any lower-case word still tokenises, letter by
letter) and the given whole words. ``load_tokenizer`` then appends ``[DEC]``
and ``[ENC]`` as for bert-base.
"""

from __future__ import annotations

import string
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from capfilt.tokenizer import build_tokenizer

BERT_SPECIALS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
CHARACTERS = string.ascii_lowercase + string.digits


def wordpiece_vocab(words: list[str]) -> list[str]:
    """BERT-layout special tokens, characters, ``##`` characters, then ``words``."""
    vocab = [BERT_SPECIALS.get(i, f"[unused{i - 1}]") for i in range(104)]
    vocab += list(CHARACTERS) + [f"##{c}" for c in CHARACTERS]
    seen = set(vocab)
    for word in words:
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab


def write_vocab(words: list[str], path: str | Path) -> Path:
    """Write ``wordpiece_vocab(words)`` as a ``vocab.txt``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(wordpiece_vocab(words)) + "\n", encoding="utf-8")
    return path


def compact_tokenizer(words: list[str], folder: str | Path) -> PreTrainedTokenizerBase:
    """A BLIP tokenizer over a compact vocabulary, its ``vocab.txt`` written in ``folder``."""
    return build_tokenizer(write_vocab(words, Path(folder) / "vocab.txt"))
