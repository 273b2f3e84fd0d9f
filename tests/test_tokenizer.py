"""BLIP's tokenizer: BERT WordPiece + [DEC] (bos) + [ENC], built offline."""

from __future__ import annotations

import pytest

from capfilt.configs import BLIP_VOCAB_SIZE, preset_config
from capfilt.tokenizer import TokenizerNotFoundError, load_tokenizer, pre_caption, special_ids
from capfilt.vocab import wordpiece_vocab


@pytest.fixture(scope="module")
def bert_layout_vocab(tmp_path_factory):
    """A vocab.txt with bert-base-uncased's size and special ids (its words are not needed)."""
    words = wordpiece_vocab(["a", "picture", "of", "dog"])
    words += [f"[filler{i}]" for i in range(30522 - len(words))]
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(words) + "\n")
    return path


def test_blip_ids_on_bert_vocabulary(bert_layout_vocab, tmp_path):
    tokenizer = load_tokenizer(bert_layout_vocab)
    ids = special_ids(tokenizer)
    assert (ids.pad, ids.cls, ids.sep, ids.dec, ids.enc) == (0, 101, 102, 30522, 30523)
    assert len(tokenizer) == BLIP_VOCAB_SIZE == preset_config("base").text_config.vocab_size
    encoded = tokenizer("A picture of a DOG").input_ids
    assert encoded[0] == 101 and encoded[-1] == 102 and 100 not in encoded
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)  # a saved folder already has [DEC] and [ENC]: no duplicates
    assert special_ids(again) == ids and len(again) == BLIP_VOCAB_SIZE
    assert again("A picture of a DOG").input_ids == encoded


def test_folder_with_only_vocab_txt(bert_layout_vocab):
    tokenizer = load_tokenizer(bert_layout_vocab.parent)
    assert special_ids(tokenizer).enc == 30523


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="never downloads"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerNotFoundError):
        load_tokenizer(tmp_path / "absent")


def test_special_ids_requires_blip_tokens(bert_layout_vocab):
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert import load_vocab

    plain = BertTokenizer(vocab=load_vocab(str(bert_layout_vocab)))
    with pytest.raises(ValueError, match=r"\[DEC\]"):
        special_ids(plain)


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("A Dog: running (fast)!", "a dog running fast"),
        ("  two   spaces\n", "two spaces"),
        ("it's ~fine~ #1", "it's fine 1"),
    ],
)
def test_pre_caption_like_blip(raw, cleaned):
    assert pre_caption(raw) == cleaned


def test_pre_caption_keeps_thirty_words():
    assert pre_caption(" ".join(f"w{i}" for i in range(40))).split() == [f"w{i}" for i in range(30)]
