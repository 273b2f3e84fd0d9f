"""The filter against transformers' ``BlipForImageTextRetrieval`` fed the same ids."""

from __future__ import annotations

import pytest
import torch

from capfilt.filter import Filter, TextScore

TEXTS = [
    ["a small red circle", "a large blue square left of a small green triangle"],
    [],
    ["a dog on the cat", "click here for more", "a picture of a red square"],
]


@pytest.fixture(scope="module")
def filter_(filter_folder):
    return Filter.load(filter_folder, precision="fp32")  # transformers' reference runs fp32


def reference_scores(hf_retrieval, filter_, pixel_values, texts):
    """ITM probability and ITC similarity of each (image, text) from transformers' forward."""
    expected = []
    for image, group in enumerate(texts):
        if not group:
            expected.append([])
            continue
        tokens = filter_.tokenizer(group, padding="longest", return_tensors="pt")
        enc_ids = tokens.input_ids.clone()
        enc_ids[:, 0] = filter_.tokenizer.convert_tokens_to_ids("[ENC]")
        repeated = pixel_values[image : image + 1].expand(len(group), -1, -1, -1)
        with torch.no_grad():
            itm = hf_retrieval(input_ids=enc_ids, pixel_values=repeated, attention_mask=tokens.attention_mask,
                               use_itm_head=True).itm_score.softmax(dim=-1)[:, 1]
            itc = hf_retrieval(input_ids=tokens.input_ids, pixel_values=pixel_values[image : image + 1],
                               attention_mask=tokens.attention_mask, use_itm_head=False).itm_score[0]
        expected.append(list(zip(itm.tolist(), itc.tolist())))
    return expected


def test_scores_match_transformers(filter_, hf_retrieval, images):
    pixel_values = filter_.preprocess(images)
    expected = reference_scores(hf_retrieval, filter_, pixel_values, TEXTS)
    scores = filter_.score(images, TEXTS)
    assert [len(group) for group in scores] == [2, 0, 3]
    for got, want in zip(scores, expected):
        for score, (itm, itc) in zip(got, want):
            assert score.itm == pytest.approx(itm, abs=1e-5)
            assert score.itc == pytest.approx(itc, abs=1e-5)
            assert 0.0 <= score.itm <= 1.0 and -1.0 <= score.itc <= 1.0


def test_itm_input_starts_with_enc_not_cls(filter_, hf_retrieval, images):
    """transformers' class would leave [CLS] first; BLIP's filters were trained with [ENC]."""
    pixel_values = filter_.preprocess(images[:1])
    tokens = filter_.tokenizer(TEXTS[0], padding="longest", return_tensors="pt")
    with torch.no_grad():
        with_cls = hf_retrieval(input_ids=tokens.input_ids, pixel_values=pixel_values.expand(2, -1, -1, -1),
                                attention_mask=tokens.attention_mask).itm_score.softmax(dim=-1)[:, 1]
    ours = torch.tensor([s.itm for s in filter_.score(images[:1], TEXTS[:1])[0]])
    assert not torch.allclose(ours, with_cls, atol=1e-4)


def test_image_encoded_once_and_text_batches_split(filter_folder, images):
    filter_ = Filter.load(filter_folder, precision="fp32")
    filter_.text_batch_size = 2
    calls = []
    hook = filter_.model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        batched = filter_.score(images, TEXTS)
    finally:
        hook.remove()
    assert calls == [3]
    filter_.text_batch_size = 256
    whole = filter_.score(images, TEXTS)
    for got, want in zip(batched, whole):
        for a, b in zip(got, want):
            assert a.itm == pytest.approx(b.itm, abs=1e-5) and a.itc == pytest.approx(b.itc, abs=1e-5)


def test_texts_are_normalised_like_blip(filter_, images):
    """BLIP's pre_caption lower-cases and strips punctuation before tokenising."""
    plain, noisy = filter_.score(images[:1], [["a small red circle", "A Small (RED) circle!!"]])[0]
    assert plain.itm == pytest.approx(noisy.itm, abs=1e-6)
    assert plain.itc == pytest.approx(noisy.itc, abs=1e-6)


def test_mismatched_lengths_and_threshold(filter_, images):
    with pytest.raises(ValueError, match="3 images but 1"):
        filter_.score(images, [["a dog"]])
    assert filter_.score(images, [[], [], []]) == [[], [], []]
    assert TextScore(itm=0.49, itc=0.0).is_noise() and not TextScore(itm=0.5, itc=0.0).is_noise()
