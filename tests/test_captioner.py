"""The captioner against transformers' own ``BlipForConditionalGeneration.generate``."""

from __future__ import annotations

import math
import types

import pytest
import torch

from capfilt.captioner import Captioner, SamplingSettings, beam_search_blip


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
    captioner.settings = settings = SamplingSettings(method="beam", num_beams=3, max_length=20, min_length=5,
                                                     beam_length_rule="transformers")
    pixel_values = captioner.preprocess(images)
    ours = captioner.generate_ids(pixel_values)
    theirs = reference_generate(hf_captioner, tokenizer, pixel_values, settings, do_sample=False, num_beams=3,
                                repetition_penalty=1.0)
    assert torch.equal(ours, theirs)
    decoded = tokenizer.batch_decode(theirs, skip_special_tokens=True)
    assert captioner.decode(ours) == [text[len("a picture of "):] for text in decoded]


@pytest.mark.parametrize("num_captions", [1, 2])
@pytest.mark.parametrize("lengths", [(12, 12), (5, 20)])
def test_blip_beam_search_matches_transformers_when_no_caption_ends_early(captioner, hf_captioner, tokenizer, images,
                                                                          lengths, num_captions):
    """Both rules divide captions that reach max_length alike; the tiny random model's beams all do."""
    min_length, max_length = lengths
    captioner.settings = settings = SamplingSettings(method="beam", min_length=min_length, max_length=max_length)
    assert settings.beam_length_rule == "blip"
    pixel_values = captioner.preprocess(images)
    ours = captioner.generate_ids(pixel_values, num_captions=num_captions)
    theirs = reference_generate(hf_captioner, tokenizer, pixel_values, settings, num_beams=3,
                                num_return_sequences=num_captions, repetition_penalty=1.0)
    assert ours.shape == (len(images) * num_captions, max_length)  # nothing ended early
    assert torch.equal(ours, theirs)


def _ids(tokenizer, tokens):
    return tokenizer.convert_tokens_to_ids(tokens)


@pytest.mark.parametrize("first", [["##i", "##n", "##g"], [","], ["red"]])
def test_decode_cuts_the_prompt_characters_as_blip(captioner, tokenizer, tmp_path, first):
    """BLIP returns ``decoded[len(prompt):]``: a word-piece or punctuation start loses characters of its own."""
    from capfilt.vocab import compact_tokenizer

    tok = compact_tokenizer("a picture of red circle ,".split(), tmp_path)  # with a punctuation mark
    captioner.tokenizer, saved = tok, captioner.tokenizer
    try:
        ids = torch.tensor([_ids(tok, ["[DEC]", "a", "picture", "of", *first, "red", "circle", "[SEP]", "[PAD]"])])
        decoded = tok.decode(ids[0], skip_special_tokens=True)
        assert captioner.decode(ids) == [decoded[len("a picture of "):]]
    finally:
        captioner.tokenizer = saved
    expected = {"##i": "ng red circle", ",": " red circle", "red": "red red circle"}[first[0]]
    assert decoded[len("a picture of "):] == expected


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
    captioner.settings = settings = SamplingSettings(method="beam", num_beams=3, max_length=12, min_length=5,
                                                     beam_length_rule="transformers")
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
    with pytest.raises(ValueError, match="beam_length_rule"):
        SamplingSettings(beam_length_rule="hf")
    with pytest.raises(ValueError, match="greedy"):
        SamplingSettings(method="greedy").generate_kwargs(num_captions=2)


def test_original_defaults():
    settings = SamplingSettings()
    assert settings.generate_kwargs(1) == dict(do_sample=True, top_p=0.9, top_k=50, num_beams=1,
                                               repetition_penalty=1.1)
    assert (settings.max_length, settings.min_length, settings.prompt) == (30, 10, "a picture of ")
    assert SamplingSettings(method="beam").generate_kwargs(1)["repetition_penalty"] == 1.0
    assert settings.beam_length_rule == "blip"


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


class MarkovDecoder:
    """A text decoder whose next-token distribution depends on the last token only (a table): the beams, their
    summed log-probabilities and where they end can be worked out by hand."""

    PAD, SEP, P, A, B, C, F = range(7)

    def __init__(self):
        table = {  # last token -> {token: probability}; the rest of the mass spread evenly over the other tokens
            self.P: {self.A: 0.55, self.B: 0.40},
            self.A: {self.SEP: 0.55, self.C: 0.406},
            self.B: {self.C: 0.90},
            self.C: {self.SEP: 0.552, self.C: 0.40},
        }
        self.logp = torch.full((7, 7), math.log(1 / 7))
        for last, given in table.items():
            rest = (1 - sum(given.values())) / (7 - len(given))
            row = torch.full((7,), rest)
            for token, p in given.items():
                row[token] = p
            self.logp[last] = row.log()

    def __call__(self, input_ids, cache=None, **_):
        logits = self.logp[input_ids[:, -1]].unsqueeze(1)  # log-probs as logits: log_softmax leaves them
        return types.SimpleNamespace(logits=logits, cache=types.SimpleNamespace(reorder_cache=lambda rows: None))


def test_blip_beam_rule_picks_what_transformers_4_15_picked_where_transformers_5_picks_otherwise():
    """Two captions end early: "A" after one token, "B C" after two; prompt of three tokens. Worked by hand
    with two beams: step 1 keeps A and B; step 2 finishes "A" (rank 1) and keeps "B C", "A C"; step 3 finishes
    "B C" (rank 0) and the search is done. BLIP's rule (sum / whole length without [SEP]) prefers "A"; transformers
    5's (sum / generated length with [SEP]) prefers "B C"."""
    m = MarkovDecoder()
    lp = m.logp
    caption_a = lp[m.P, m.A] + lp[m.A, m.SEP]
    caption_bc = lp[m.P, m.B] + lp[m.B, m.C] + lp[m.C, m.SEP]
    assert caption_a / 4 > caption_bc / 5  # BLIP: prompt 3 + A; prompt 3 + B C
    assert caption_a / 2 < caption_bc / 3  # transformers 5: A [SEP]; B C [SEP]
    settings = SamplingSettings(method="beam", num_beams=2, min_length=0, max_length=12, repetition_penalty=1.0)
    ids = types.SimpleNamespace(pad=m.PAD, sep=m.SEP)
    prompt = torch.tensor([[m.P, m.P, m.P]])
    out = beam_search_blip(m, torch.zeros(1, 1, 4), prompt, ids, settings, num_captions=2)
    assert out.tolist() == [[m.P, m.P, m.P, m.A, m.SEP, m.PAD], [m.P, m.P, m.P, m.B, m.C, m.SEP]]


# --- per-image seeds ------------------------------------------------------------------------------------------

def five_images():
    from PIL import Image

    colours = [(200, 30, 30), (20, 160, 60), (128, 128, 128), (20, 30, 230), (220, 220, 30)]
    return [Image.new("RGB", (30 + 7 * i, 40 - 3 * i), colour) for i, colour in enumerate(colours)]


def test_an_images_captions_depend_on_its_seed_only(captioner):
    """Alone, or in a batch of five in another order: the same captions for the same image and seed."""
    captioner.settings = SamplingSettings()
    images, seeds = five_images(), [101, 202, 303, 404, 505]
    together = captioner.caption(images, num_captions=3, seeds=seeds)
    for image, seed, captions in zip(images, seeds, together):
        assert captioner.caption([image], num_captions=3, seeds=[seed]) == [captions]
    order = [3, 0, 4, 1, 2]
    shuffled = captioner.caption([images[i] for i in order], num_captions=3, seeds=[seeds[i] for i in order])
    assert shuffled == [together[i] for i in order]
    assert len({text for captions in together for text in captions}) > 5  # the seeds and caption indices matter
    assert captioner.caption(images[:1], num_captions=3, seeds=[999]) != together[:1]


def test_seeds_are_checked_and_ignored_by_beam_and_greedy(captioner, images):
    captioner.settings = SamplingSettings()
    pixel_values = captioner.preprocess(images)
    with pytest.raises(ValueError, match="not both"):
        captioner.generate_ids(pixel_values, seed=1, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        captioner.generate_ids(pixel_values, seeds=[1, 2])
    for settings in (SamplingSettings(method="greedy"), SamplingSettings(method="beam", max_length=12)):
        captioner.settings = settings
        assert torch.equal(captioner.generate_ids(pixel_values, seeds=[1, 2, 3]), captioner.generate_ids(pixel_values))


def transformers_scores(captioner, pixel_values, ids, settings: SamplingSettings, num_captions: int):
    """For each step of ``ids``: transformers' processed scores, recomputed from the whole prefix (no cache) with
    its own processors in the order its sampling applies them: repetition penalty, min length, top-k, top-p."""
    from transformers import LogitsProcessorList, MinLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.1), MinLengthLogitsProcessor(settings.min_length, captioner.ids.sep),
        TopKLogitsWarper(settings.top_k), TopPLogitsWarper(settings.top_p)])
    with torch.no_grad():
        embeds = captioner.model.vision_model(pixel_values=pixel_values).last_hidden_state
        embeds = embeds.repeat_interleave(num_captions, dim=0)
        for step in range(len(captioner.prompt_ids), ids.shape[1]):
            prefix = ids[:, :step]
            logits = captioner.model.text_decoder(input_ids=prefix, attention_mask=torch.ones_like(prefix),
                                                  encoder_hidden_states=embeds).logits[:, -1].float()
            yield step, processors(prefix, logits)


@pytest.mark.parametrize("top_k, top_p", [(50, 0.9), (6, 1.0), (20, 0.5)])
def test_each_sampled_token_lies_in_transformers_nucleus(captioner, top_k, top_p):
    captioner.settings = settings = SamplingSettings(top_k=top_k, top_p=top_p, max_length=16, min_length=8)
    images = five_images()
    pixel_values = captioner.preprocess(images)
    ids = captioner.generate_ids(pixel_values, num_captions=4, seeds=range(len(images)))
    prompt = len(captioner.prompt_ids)
    checked = 0
    for step, scores in transformers_scores(captioner, pixel_values, ids, settings, num_captions=4):
        for row in range(ids.shape[0]):
            if (ids[row, prompt:step] == captioner.ids.sep).any():
                continue  # finished: [PAD] from here on
            assert torch.isfinite(scores[row, ids[row, step]]), (row, step)
            checked += 1
        nucleus = torch.isfinite(scores).sum(dim=1)
        assert nucleus.max() < scores.shape[1]  # the warpers remove tokens: the check can fail
    assert checked > 100


def test_per_row_sampling_draws_from_the_warped_softmax(captioner, images):
    """The first caption token of 20,000 captions, each with its own generator, against transformers'
    probabilities after penalty, length rule, top-k and top-p. Fixed seeds: the counts are the same every run;
    six standard deviations leave room for any seeds."""
    prompt = len(captioner.prompt_ids)
    captioner.settings = settings = SamplingSettings(top_k=12, top_p=0.8, max_length=prompt + 1,
                                                     min_length=prompt + 1)
    draws = 20_000
    pixel_values = captioner.preprocess(images[:1])
    ids = captioner.generate_ids(pixel_values, num_captions=draws, seeds=[7])
    assert ids.shape == (draws, prompt + 1)
    (_, scores), = transformers_scores(captioner, pixel_values, ids[:1], settings, num_captions=1)
    expected = torch.softmax(scores[0].double(), dim=-1)
    counts = torch.bincount(ids[:, prompt], minlength=expected.numel()).double()
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus
    assert (expected > 0).sum() >= 4 and expected.max() < 0.6  # a distribution worth testing
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert torch.all((counts / draws - expected).abs() <= 6 * sigma + 1e-12)
