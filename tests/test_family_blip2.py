"""BLIP-2 (OPT and Flan-T5 language models) and InstructBLIP captioners, BLIP-2's Q-Former filter, against
transformers' own classes: tiny random models saved as HF folders, nothing downloaded."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig,
    InstructBlipConfig, InstructBlipForConditionalGeneration, OPTConfig, PreTrainedTokenizerFast, T5Config,
)

from capfilt.blip2 import Blip2Captioner, Blip2Filter, LmSamplingSettings
from capfilt.captioner import Captioner
from capfilt.row_sampler import row_sampling
from capfilt.families import load_captioner, load_filter
from capfilt.checkpoints import CheckpointError
from capfilt.filter import Filter
from capfilt.instructblip import CAPTION_INSTRUCTION, InstructBlipCaptioner
from capfilt.vocab import compact_tokenizer

LM_WORDS = ("<pad> </s> <unk> <image> a photo picture of the small large red green blue circle square short image "
            "caption : on left right").split()
IMAGE_TOKEN = LM_WORDS.index("<image>")
QUERIES = 4
SIZE = 32


def lm_tokenizer(template: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: OPT's adds ``</s>`` in front (``</s> $A``), T5's at the end (``$A </s>``)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(LM_WORDS)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])


def vision_and_qformer(qformer_vocab: int) -> dict:
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=SIZE, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 encoder_hidden_size=32, vocab_size=qformer_vocab, max_position_embeddings=48)
    return {"vision_config": vision.to_dict(), "qformer_config": qformer.to_dict()}


def text_config(lm: str) -> dict:
    if lm == "opt":
        return OPTConfig(vocab_size=len(LM_WORDS), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                         num_attention_heads=4, max_position_embeddings=96, word_embed_proj_dim=32,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0).to_dict()
    return T5Config(vocab_size=len(LM_WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                    num_heads=4, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0).to_dict()


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return compact_tokenizer(LM_WORDS[4:], tmp_path_factory.mktemp("qformer-vocab"))


@pytest.fixture(scope="module", params=["opt", "t5"])
def blip2_folder(request, tmp_path_factory, bert):
    lm = request.param
    torch.manual_seed(0)
    config = Blip2Config(**vision_and_qformer(len(bert)), text_config=text_config(lm), num_query_tokens=QUERIES,
                         image_token_index=IMAGE_TOKEN)
    folder = tmp_path_factory.mktemp(f"blip2-{lm}")
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    lm_tokenizer("</s> $A" if lm == "opt" else "$A </s>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def instructblip_folder(tmp_path_factory, bert):
    torch.manual_seed(1)
    config = InstructBlipConfig(**vision_and_qformer(len(bert)), text_config=text_config("opt"),
                                num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN)
    folder = tmp_path_factory.mktemp("instructblip")
    InstructBlipForConditionalGeneration(config).save_pretrained(folder)
    lm_tokenizer("</s> $A").save_pretrained(folder)
    bert.save_pretrained(folder / "qformer_tokenizer")
    return folder


@pytest.fixture(scope="module")
def itm_folder(tmp_path_factory, bert):
    torch.manual_seed(2)
    parts = vision_and_qformer(len(bert))
    parts["qformer_config"]["use_qformer_text_input"] = True  # the Q-Former's text layers (ITM, ITC)
    config = Blip2Config(**parts, num_query_tokens=QUERIES, image_text_hidden_size=16)
    folder = tmp_path_factory.mktemp("blip2-itm")
    Blip2ForImageTextRetrieval(config).save_pretrained(folder)
    bert.save_pretrained(folder)
    return folder


@pytest.fixture
def pixels():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def reference(captioner, pixel_values, **kwargs):
    """transformers' own generate on the same inputs, new tokens only."""
    ids = captioner.input_ids.expand(len(pixel_values), -1)
    extra = {}
    if isinstance(captioner, InstructBlipCaptioner):
        qformer_ids = captioner.qformer_ids.expand(len(pixel_values), -1)
        extra = {"qformer_input_ids": qformer_ids, "qformer_attention_mask": torch.ones_like(qformer_ids)}
    settings = captioner.settings
    out = captioner.model.generate(pixel_values=pixel_values, input_ids=ids, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=settings.max_length, min_new_tokens=settings.min_length,
                                   repetition_penalty=settings.repetition_penalty, **extra, **kwargs)
    return out[:, ids.shape[1]:] if captioner.decoder_only else out[:, 1:]


def test_captioner_is_chosen_by_config(blip2_folder, instructblip_folder):
    assert type(load_captioner(blip2_folder, precision="fp32")) is Blip2Captioner
    assert type(Captioner.load(blip2_folder)) is Blip2Captioner  # the one interface loads every family
    instruct = load_captioner(instructblip_folder, precision="fp32")
    assert type(instruct) is InstructBlipCaptioner
    assert instruct.settings.instruction == CAPTION_INSTRUCTION and instruct.settings.repetition_penalty == 1.5


def test_greedy_and_beam_match_transformers(blip2_folder, pixels):
    captioner = load_captioner(blip2_folder, precision="fp32")
    captioner.settings = LmSamplingSettings(method="greedy", max_length=8, min_length=3)
    ours = captioner.generate_ids(pixels)
    assert torch.equal(ours, reference(captioner, pixels, do_sample=False, num_beams=1))
    assert ours.shape[1] >= 3
    captioner.settings = LmSamplingSettings(method="beam", num_beams=3, max_length=8, min_length=2)
    ours = captioner.generate_ids(pixels, num_captions=2)
    assert torch.equal(ours, reference(captioner, pixels, do_sample=False, num_beams=3, num_return_sequences=2))
    texts = captioner.caption_pixels(pixels, num_captions=2)
    assert [len(group) for group in texts] == [2, 2, 2]
    assert texts[0][0] == captioner.tokenizer.decode(ours[0], skip_special_tokens=True).strip()


def test_nucleus_with_a_seed_matches_transformers(blip2_folder, pixels):
    captioner = load_captioner(blip2_folder, precision="fp32")
    captioner.settings = LmSamplingSettings(max_length=10)
    ours = captioner.generate_ids(pixels, num_captions=3, seed=7)
    torch.manual_seed(7)
    theirs = reference(captioner, pixels, do_sample=True, top_p=0.9, top_k=50, num_return_sequences=3)
    assert torch.equal(ours, theirs)
    assert ours.shape[0] == 9


def test_per_image_seeds_do_not_depend_on_the_batch(blip2_folder, pixels):
    captioner = load_captioner(blip2_folder, precision="fp32")
    captioner.settings = LmSamplingSettings(max_length=10)
    seeds = [11, 12, 13]
    batch = captioner.caption_pixels(pixels, num_captions=2, seeds=seeds)
    alone = [captioner.caption_pixels(pixels[i:i + 1], num_captions=2, seeds=[seeds[i]])[0] for i in range(3)]
    assert batch == alone
    # the draws are transformers' generate with the same per-row generators
    sampling = row_sampling(captioner.settings.generate_kwargs(2), seeds, 2, torch.device("cpu"))
    sampling = {k: v for k, v in sampling.items() if k not in ("max_new_tokens", "min_new_tokens",
                                                                 "repetition_penalty")}
    theirs = reference(captioner, pixels.repeat_interleave(2, dim=0), **sampling)
    assert torch.equal(captioner.generate_ids(pixels, num_captions=2, seeds=seeds), theirs)


def test_instructblip_matches_transformers_and_takes_an_instruction(instructblip_folder, pixels):
    captioner = load_captioner(instructblip_folder, precision="fp32")
    captioner.settings = LmSamplingSettings(method="greedy", max_length=6, instruction=CAPTION_INSTRUCTION)
    assert torch.equal(captioner.generate_ids(pixels), reference(captioner, pixels, do_sample=False, num_beams=1))
    captioner.settings = LmSamplingSettings(max_length=6, instruction=CAPTION_INSTRUCTION)
    ours = captioner.generate_ids(pixels, num_captions=2, seed=5)
    torch.manual_seed(5)
    assert torch.equal(ours, reference(captioner, pixels, do_sample=True, top_p=0.9, top_k=50,
                                       num_return_sequences=2))
    default_ids = captioner.qformer_ids
    other = InstructBlipCaptioner.load(instructblip_folder, precision="fp32",
                                       settings=LmSamplingSettings(instruction="a photo of the image"))
    assert other.qformer_ids.tolist() != default_ids.tolist()
    assert other.lm_prompt() == "a photo of the image"


def test_blip2_filter_matches_transformers(itm_folder, pixels):
    filter_ = load_filter(itm_folder, precision="fp32")
    assert type(filter_) is Blip2Filter and filter_.judged_by == "itm"
    assert type(Filter.load(itm_folder)) is Blip2Filter
    texts = [["a red circle", "the small square on the left"], [], ["blue"]]
    scores = filter_.score_pixels(pixels, texts)
    assert [len(s) for s in scores] == [2, 0, 1]
    flat = [(i, t) for i, group in enumerate(texts) for t in group]
    tokens = filter_.tokenize([t for _, t in flat])
    index = torch.tensor([i for i, _ in flat])
    with torch.no_grad():
        itm = filter_.model(pixel_values=pixels[index], use_image_text_matching_head=True, **tokens)
        itc = filter_.model(pixel_values=pixels[index], use_image_text_matching_head=False, **tokens)
    probability = torch.softmax(itm.logits_per_image, dim=1)[:, 1]
    similarity = itc.logits_per_image.diagonal()  # each text against its own image
    ours = [s for group in scores for s in group]
    assert torch.allclose(torch.tensor([s.itm for s in ours]), probability, atol=1e-5, rtol=0)
    assert torch.allclose(torch.tensor([s.itc for s in ours]), similarity, atol=1e-5, rtol=0)


def test_loads_from_a_hub_cache_id(tmp_path, monkeypatch, blip2_folder, itm_folder, pixels):
    import shutil

    import huggingface_hub.constants

    for name, folder in (("tiny-blip2", blip2_folder), ("tiny-blip2-itm", itm_folder)):
        repo = tmp_path / f"models--someone--{name}"
        shutil.copytree(folder, repo / "snapshots" / ("b" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    captioner = load_captioner("someone/tiny-blip2", precision="fp32")
    assert captioner.source.path == tmp_path / "models--someone--tiny-blip2" / "snapshots" / ("b" * 40)
    assert captioner.ref == "someone/tiny-blip2"
    assert len(captioner.caption_pixels(pixels, seed=0)) == 3
    assert isinstance(load_filter("someone/tiny-blip2-itm"), Blip2Filter)


def test_a_model_in_the_wrong_role_is_a_one_line_error(blip2_folder, itm_folder, instructblip_folder):
    for load in (load_captioner, Captioner.load):
        with pytest.raises(CheckpointError) as error:
            load(itm_folder)
        message = str(error.value)
        assert "\n" not in message and "Blip2ForImageTextRetrieval" in message and "captioner accepts" in message
    for folder in (blip2_folder, instructblip_folder):
        with pytest.raises(CheckpointError, match="the filter accepts") as error:
            load_filter(folder)
        assert "\n" not in str(error.value)


def test_settings_refuse_blips_own_and_bad_values(blip2_folder):
    from capfilt.checkpoints import resolve

    with pytest.raises(ValueError, match="beam_length_rule"):
        LmSamplingSettings.for_model(resolve(blip2_folder, "captioner"), {}, beam_length_rule="blip")
    with pytest.raises(ValueError, match="greedy decoding writes one caption"):
        LmSamplingSettings(method="greedy").generate_kwargs(2)
    assert LmSamplingSettings.for_model(None, {}, top_p=0.8, max_length=None).top_p == 0.8


def test_a_blip2_captioner_with_blips_itm_filter_in_a_shard_job(blip2_folder, filter_folder, tmp_path):
    """Any captioner with any filter: the shard job writes the BLIP-2 captioner's captions, the BLIP filter's
    scores, and each model's family and reference."""
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from capfilt.pipelines.layout import OutputLayout
    from capfilt.pipelines.process import process_shard
    from capfilt.pipelines.settings import BootstrapSettings
    from capfilt.pipelines.shards import list_shards
    from capfilt.pipelines.worker_models import Models

    rows = []
    for i, colour in enumerate([(200, 30, 30), (20, 160, 60), (30, 30, 200)]):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 36), colour).save(buffer, format="PNG")
        rows.append({"key": f"{i:09d}", "url": f"http://x/{i}", "caption": "a red circle", "jpg": buffer.getvalue(),
                     "status": "success", "error_message": None})
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "00000.parquet")
    (tmp_path / "in" / "00000_stats.json").write_text("{}")
    settings = BootstrapSettings(captioner=str(blip2_folder), filter=str(filter_folder), captioner_family="blip-2",
                                 num_captions=2,
                                 sampling_overrides={"max_length": 12}, device="cpu", precision="fp32", batch_size=2,
                                 decode_threads=0, threshold=0.0)
    models = Models.load(settings)
    assert (models.captioner.family, models.filter.family) == ("blip-2", "blip")
    assert models.sampling["max_length"] == 12 and models.sampling["prompt"] == ""
    provenance = models.provenance()
    assert provenance["captioner"]["family"] == "blip-2" and provenance["captioner"]["ref"] == str(blip2_folder)
    assert provenance["filter"]["family"] == "blip" and provenance["filter"]["weights"] == "float32"
    layout = OutputLayout(str(tmp_path / "out"))
    process_shard(list_shards(str(tmp_path / "in"))[0], models, settings, layout)
    kept = pq.read_table(tmp_path / "out" / "kept").to_pylist()
    assert {r["source"] for r in kept} == {"web", "synthetic"}  # threshold 0: all kept, each text of an image once
    images = [Image.open(io.BytesIO(r["jpg"])) for r in rows]
    seeds = [settings.sample_seed(r["key"]) for r in rows]
    captions = models.captioner.caption(images, num_captions=2, seeds=seeds)
    for row in kept:
        if row["source"] != "web":
            assert row["text"] == captions[int(row["key"])][row["source_index"]]
    scores = models.filter.score(images, [["a red circle"]] * 3)
    web = {r["key"]: r["itm_score"] for r in kept if r["source"] == "web"}
    assert web and all(abs(itm - scores[int(key)][0].itm) < 1e-5 for key, itm in web.items())
    assert json.loads(kept[0]["capfilt_config"])["sampling"]["max_length"] == 12
