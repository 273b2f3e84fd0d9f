"""The captioner against transformers' own ``BlipForConditionalGeneration.generate``."""

from __future__ import annotations

import pytest
import torch

from capfilt.captioner import Captioner, SamplingSettings


def reference_generate(hf_model, tokenizer, pixel_values, settings: SamplingSettings, **kwargs):
    """transformers' generate, fed the prompt as BLIP feeds it ([CLS] -> [DEC], [SEP] dropped by HF)."""
    prompt = tokenizer([settings.prompt] * len(pixel_values), return_tensors="pt").input_ids
    return hf_model.generate(pixel_values=pixel_values, input_ids=prompt, max_length=settings.max_length,
                             min_length=settings.min_length, **kwargs)


@pytest.fixture(scope="module")
def captioner(captioner_folder):
    return Captioner.load(captioner_folder, precision="fp32")  # transformers' reference runs fp32


def test_greedy_matches_transformers(captioner, hf_captioner, tokenizer, images):
    captioner.settings = settings = SamplingSettings(method="greedy")
    pixel_values = captioner.preprocess(images)
    ours = captioner.generate_ids(pixel_values)
    theirs = reference_generate(hf_captioner, tokenizer, pixel_values, settings, do_sample=False, num_beams=1)
    assert torch.equal(ours, theirs)
    assert ours.shape[1] >= settings.min_length  # [SEP] was held back until min_length


def test_beam_matches_transformers(captioner, hf_captioner, tokenizer, images):
    captioner.settings = settings = SamplingSettings(method="beam", num_beams=3, max_length=20, min_length=5)
    pixel_values = captioner.preprocess(images)
    ours = captioner.generate_ids(pixel_values)
    theirs = reference_generate(hf_captioner, tokenizer, pixel_values, settings, do_sample=False, num_beams=3,
                                repetition_penalty=1.0)
    assert torch.equal(ours, theirs)
    decoded = tokenizer.batch_decode(theirs, skip_special_tokens=True)
    assert captioner.decode(ours) == [text.removeprefix("a picture of").strip() for text in decoded]


def test_nucleus_sampling_matches_transformers_and_repeats_per_seed(captioner, hf_captioner, tokenizer, images):
    captioner.settings = settings = SamplingSettings()
    pixel_values = captioner.preprocess(images)
    ours = captioner.generate_ids(pixel_values, seed=7)
    torch.manual_seed(7)
    theirs = reference_generate(hf_captioner, tokenizer, pixel_values, settings, do_sample=True, top_p=0.9,
                                top_k=50, repetition_penalty=1.1)
    assert torch.equal(ours, theirs)
    assert captioner.caption(images, seed=7) == captioner.caption(images, seed=7)
    runs = {tuple(c[0] for c in captioner.caption(images, seed=seed)) for seed in range(4)}
    assert len(runs) > 1  # the seed matters


def test_seed_leaves_global_rng_alone(captioner, images):
    captioner.settings = SamplingSettings()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    captioner.caption(images, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_k_captions_encode_each_image_once(captioner, images):
    captioner.settings = SamplingSettings()
    batches = []
    hook = captioner.model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        captions = captioner.caption(images, num_captions=4, seed=0)
    finally:
        hook.remove()
    assert batches == [len(images)]
    assert [len(c) for c in captions] == [4, 4, 4]
    assert all(isinstance(text, str) for group in captions for text in group)


def test_k_beam_captions_are_the_top_beams(captioner, hf_captioner, tokenizer, images):
    captioner.settings = settings = SamplingSettings(method="beam", num_beams=3, max_length=12, min_length=5)
    pixel_values = captioner.preprocess(images)
    ours = captioner.generate_ids(pixel_values, num_captions=2)
    theirs = reference_generate(hf_captioner, tokenizer, pixel_values, settings, num_beams=3,
                                num_return_sequences=2, repetition_penalty=1.0)
    assert torch.equal(ours, theirs)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="method"):
        SamplingSettings(method="topk")
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=1.5)
    with pytest.raises(ValueError, match="greedy"):
        SamplingSettings(method="greedy").generate_kwargs(num_captions=2)


def test_original_defaults():
    settings = SamplingSettings()
    assert settings.generate_kwargs(1) == dict(do_sample=True, top_p=0.9, top_k=50, num_beams=1,
                                               repetition_penalty=1.1)
    assert (settings.max_length, settings.min_length, settings.prompt) == (30, 10, "a picture of ")
    assert SamplingSettings(method="beam").generate_kwargs(1)["repetition_penalty"] == 1.0


def test_model_folder_can_carry_its_sampling_defaults(tmp_path, hf_captioner, tokenizer):
    hf_captioner.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert Captioner.load(tmp_path).settings == SamplingSettings()
    (tmp_path / "capfilt_sampling.json").write_text('{"min_length": 5, "max_length": 20}')
    settings = Captioner.load(tmp_path).settings
    assert (settings.min_length, settings.max_length, settings.top_p) == (5, 20, 0.9)
    assert SamplingSettings.for_model(Captioner.load(tmp_path).source, top_p=0.8).top_p == 0.8
    (tmp_path / "capfilt_sampling.json").write_text('{"min_len": 5}')
    with pytest.raises(ValueError, match="unknown settings"):
        Captioner.load(tmp_path)
