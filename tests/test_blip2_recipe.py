"""BLIP-2's data recipe (``make bootstrap-blip2-recipe``) end to end on small random models: the Makefile's flags,
its hub ids resolved from a hub cache holding tiny models, the demo's data; each image keeps the two texts that
CLIP itself (transformers' ``CLIPModel``) scores highest."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

from capfilt import cli
from capfilt.pipelines.schema import NOT_IN_TOP_N
from conftest import TEST_WORDS

MAKEFILE = Path(__file__).resolve().parent.parent / "Makefile"
CAPTIONER_ID, RANKER_ID = "Salesforce/blip-image-captioning-large", "openai/clip-vit-large-patch14"
CLIP_SIZE = 24  # not the tiny BLIP's 32: the two models then take their own inputs
POSITIONS = 40  # the tiny CLIP's text positions
SPECIAL = ["<pad>", "<unk>", "<start>", "<end>"]


def recipe_flags() -> list[str]:
    """``BLIP2_RECIPE`` as the Makefile spells it."""
    text = MAKEFILE.read_text().replace("\\\n", " ")
    (value,) = re.findall(r"^BLIP2_RECIPE = (.*)$", text, flags=re.M)
    return value.split()


def clip_tokenizer() -> PreTrainedTokenizerFast:
    """Word level over the tiny BLIP's words and the shapes world's, so that different texts tokenise differently."""
    words = SPECIAL + sorted(set(TEST_WORDS) | set("mismatch big small tiny huge purple yellow orange star "
                                                  "hexagon diamond next to of and with in front behind".split()))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<start> $A <end>",
                                                           special_tokens=[("<start>", 2), ("<end>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<start>", eos_token="<end>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, captioner_folder):
    """A hub cache holding the recipe's two ids: the tiny BLIP captioner, a tiny CLIP."""
    cache = tmp_path_factory.mktemp("hub")
    tokenizer = clip_tokenizer()
    torch.manual_seed(5)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=POSITIONS, eos_token_id=3, bos_token_id=2,
                pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=CLIP_SIZE, patch_size=8)
    clip = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(clip)
    tokenizer.save_pretrained(clip)
    for hub_id, folder in ((CAPTIONER_ID, captioner_folder), (RANKER_ID, clip)):
        repo = cache / f"models--{hub_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / ("c" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("c" * 40)
    return cache, clip


def clip_cosines(folder: Path, jpg: bytes, texts: list[str]) -> list[float]:
    """The cosine similarity of each text with the image, as transformers' CLIP computes it, from its processor."""
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE,
                                                                                 "width": CLIP_SIZE})
    pixels = processor(Image.open(io.BytesIO(jpg)).convert("RGB"), return_tensors="pt").pixel_values
    # cut at the model's positions, as CLIPTokenizer's model_max_length (77) cuts ViT-L/14's input
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=POSITIONS, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, **tokens)
    return F.normalize(out.text_embeds, dim=-1).matmul(F.normalize(out.image_embeds, dim=-1)[0]).tolist()


def test_blip2_recipe_keeps_each_images_two_best_texts_by_clip(hub_cache, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache, clip = hub_cache
    flags = recipe_flags()
    assert flags[flags.index("--captioner") + 1] == CAPTIONER_ID and flags[flags.index("--filter") + 1] == RANKER_ID
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "out"
    code = cli.main(["bootstrap", "--data", "demo", "--demo-size", "8", "--out", str(out), "--torch-threads", "1",
                     "--precision", "fp32", *flags])
    assert code == 0
    kept = pq.read_table(out / "kept").to_pylist()
    rejected = pq.read_table(out / "rejected").to_pylist()
    keys = {row["key"] for row in kept}
    assert len(keys) == 8  # every image keeps texts: no threshold
    assert all(row["itm_score"] is None for row in kept + rejected)
    for key in keys:
        mine = [row for row in kept if row["key"] == key]
        ranked_out = [row for row in rejected if row["key"] == key and row["reason"] == NOT_IN_TOP_N]
        assert 1 <= len(mine) <= 2 and len(mine) + len(ranked_out) >= 2
        assert len(mine) == 2 or not ranked_out
        rows = mine + ranked_out
        truth = clip_cosines(clip, mine[0]["jpg"]["bytes"], [row["text"] for row in rows])
        for row, cosine in zip(rows, truth):  # the stored score is CLIP's own cosine
            assert abs(row["itc_score"] - cosine) < 1e-5, (row["text"], row["itc_score"], cosine)
        worst_kept = min(truth[: len(mine)])
        assert all(cosine <= worst_kept + 1e-6 for cosine in truth[len(mine):])  # the two best, web text included
    sources = {row["source"] for row in kept + rejected}
    assert sources == {"web", "synthetic"}
    assert max(row["source_index"] for row in kept + rejected if row["source"] == "synthetic") == 9  # -k 10
