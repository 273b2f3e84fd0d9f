"""CLIP and SigLIP rankers against transformers' ``CLIPModel`` / ``SiglipModel``: tiny random models saved as HF
folders, nothing downloaded."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast, SiglipConfig, SiglipModel

from capfilt.captioner import Captioner
from capfilt.families import load_captioner, load_filter
from capfilt.checkpoints import CheckpointError
from capfilt.clip_ranker import CenterCropPreprocessor, ClipRanker

WORDS = "<pad> <unk> <start> <end> a photo picture of the small large red green blue circle square".split()
SIZE = 32
POSITIONS = 16


def tokenizer(template: str) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single=template,
                                                           special_tokens=[("<start>", 2), ("<end>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<start>", eos_token="<end>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["clip", "siglip"])
def ranker_folder(request, tmp_path_factory):
    text = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=POSITIONS)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=SIZE, patch_size=8)
    torch.manual_seed(4)
    if request.param == "clip":
        model = CLIPModel(CLIPConfig(text_config={**text, "eos_token_id": 3, "bos_token_id": 2, "pad_token_id": 0},
                                     vision_config=vision, projection_dim=16))
        tok = tokenizer("<start> $A <end>")
    else:
        model = SiglipModel(SiglipConfig(text_config={**text, "eos_token_id": 3, "pad_token_id": 0},
                                         vision_config=vision))
        tok = tokenizer("$A <end>")
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def images():
    from PIL import Image

    return [Image.new("RGB", (40, 30), (200, 30, 30)), Image.radial_gradient("L").resize((48, 64)),
            Image.new("RGB", (32, 32), (20, 160, 60))]


def test_cosine_similarity_matches_transformers(ranker_folder, images):
    ranker = load_filter(ranker_folder, precision="fp32")
    assert type(ranker) is ClipRanker and ranker.judged_by == "itc"
    texts = [["a red circle", "the small square"], ["blue"], []]
    scores = ranker.score(images, texts)
    assert [len(s) for s in scores] == [2, 1, 0] and all(s.itm is None for g in scores for s in g)
    # independent pixels: transformers' own image processor
    if ranker.family == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor

        processor = Processor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    else:
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as Processor

        processor = Processor(size={"height": SIZE, "width": SIZE})
    pixels = processor(images, return_tensors="pt").pixel_values
    flat = [(i, t) for i, group in enumerate(texts) for t in group]
    tokens = ranker.tokenize([t for _, t in flat])
    index = torch.tensor([i for i, _ in flat])
    with torch.no_grad():
        out = ranker.model(pixel_values=pixels, **tokens)
    cosine = (out.logits_per_text - getattr(ranker.model, "logit_bias", 0.0)) / ranker.model.logit_scale.exp()
    theirs = cosine[torch.arange(len(flat)), index]
    ours = torch.tensor([s.itc for g in scores for s in g])
    assert torch.allclose(ours, theirs, atol=2e-3, rtol=0)  # the resampling of two libraries differs slightly
    # on the same pixels, to 1e-5
    same = ranker.score_pixels(ranker.preprocess(images), texts)
    ours_pixels = ranker.preprocess(images)
    if ranker.family == "siglip":
        from capfilt.clip_ranker import siglip_from_clip

        ours_pixels = siglip_from_clip(ours_pixels)
    with torch.no_grad():
        out = ranker.model(pixel_values=ours_pixels, **tokens)
    cosine = (out.logits_per_text - getattr(ranker.model, "logit_bias", 0.0)) / ranker.model.logit_scale.exp()
    exact = torch.tensor([s.itc for g in same for s in g])
    assert torch.allclose(exact, cosine[torch.arange(len(flat)), index], atol=1e-5, rtol=0)
    assert torch.allclose(exact, (out.text_embeds * out.image_embeds[index]).sum(-1), atol=1e-5, rtol=0)


def test_preprocessing_is_the_model_processors(ranker_folder, images):
    ranker = ClipRanker.load(ranker_folder)
    assert isinstance(ranker.preprocess, CenterCropPreprocessor) == (ranker.family == "clip")
    with pytest.raises(ValueError, match="no ITM head"):
        ranker.score(images[:1], [["a photo"]])[0][0].is_noise()


def test_siglip_text_is_padded_to_its_length(ranker_folder):
    ranker = ClipRanker.load(ranker_folder)
    tokens = ranker.tokenize(["a red circle", "blue"])
    if ranker.family == "siglip":
        assert tokens["input_ids"].shape == (2, POSITIONS) and "attention_mask" not in tokens
    else:
        assert tokens["input_ids"].shape == (2, 5) and tokens["attention_mask"].sum().item() == 8


def test_a_ranker_as_captioner_is_a_one_line_error(ranker_folder):
    for load in (load_captioner, Captioner.load):
        with pytest.raises(CheckpointError, match="the captioner accepts") as error:
            load(ranker_folder)
        assert "\n" not in str(error.value) and ("CLIP" in str(error.value) or "SigLIP" in str(error.value))


@pytest.mark.parametrize("size", [(640, 427), (427, 640), (300, 300), (225, 224)])
def test_clip_pixels_are_clips_image_processors_on_any_aspect(size):
    import numpy as np
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    theirs = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})(
        [image], return_tensors="pt").pixel_values[0]
    ours = CenterCropPreprocessor(224).one(image)
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-4, rtol=0)
