"""A job whose filter has no ITM head (CLIP): judged and ranked by ITC, against the ranker's own scores.

Tiny random models saved as HF folders (BLIP's from conftest, CLIP's and BLIP-2's as tests/test_family_clip.py and
tests/test_family_blip2.py build them), nothing downloaded. The truth is what each model computes on its own from
the decoded images (``ClipRanker.score``, ``caption``), not what the pipeline handed it.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import Blip2Config, Blip2ForConditionalGeneration, CLIPConfig, CLIPModel

from capfilt.checkpoints import CheckpointError
from capfilt.families import load_captioner, load_filter, sampling_settings
from capfilt.pipelines.bootstrap import run
from capfilt.pipelines.layout import OutputLayout
from capfilt.pipelines.process import process_shard
from capfilt.pipelines.refilter import RefilterError, RefilterSettings, refilter
from capfilt.pipelines.report import read_stats
from capfilt.pipelines.selection import normalise
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import list_shards
from capfilt.pipelines.worker_models import Models
from capfilt.vocab import compact_tokenizer
from test_family_blip2 import IMAGE_TOKEN, LM_WORDS, QUERIES, lm_tokenizer, text_config, vision_and_qformer
from test_family_clip import POSITIONS, WORDS, tokenizer as clip_tokenizer

SIZE = 32  # the tiny BLIP's, BLIP-2's and CLIP's input: one size, two ways to preprocess (squash, centre crop)
K = 3
WEB_TEXTS = ["a red circle", "the small blue square", "a picture of a green square", "large red circle",
             "a photo of the small circle", "blue"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    text = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=POSITIONS, eos_token_id=3, bos_token_id=2,
                pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
                  patch_size=8)
    torch.manual_seed(7)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    clip_tokenizer("<start> $A <end>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip2_folder(tmp_path_factory):
    bert = compact_tokenizer(LM_WORDS[4:], tmp_path_factory.mktemp("qformer-vocab"))
    torch.manual_seed(0)
    config = Blip2Config(**vision_and_qformer(len(bert)), text_config=text_config("opt"), num_query_tokens=QUERIES,
                         image_token_index=IMAGE_TOKEN)
    folder = tmp_path_factory.mktemp("blip2-opt")
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    lm_tokenizer("</s> $A").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
    """One Parquet shard of wide images (centre crop and squash differ on them), each with a web text."""
    folder = tmp_path_factory.mktemp("in")
    rows = []
    for i, text in enumerate(WEB_TEXTS):
        image = Image.linear_gradient("L").resize((72, 40)).convert("RGB")
        image.paste((40 * i, 200 - 30 * i, 90), (0, 0, 20 + 8 * i, 40))  # a block at the left edge: cropped off
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append({"key": f"{i:09d}", "url": f"http://x/{i}", "caption": text, "jpg": buffer.getvalue(),
                     "status": "success", "error_message": None})
    pq.write_table(pa.Table.from_pylist(rows), folder / "00000.parquet")
    (folder / "00000_stats.json").write_text("{}")
    return folder


def decoded_images(input_dir) -> dict[str, Image.Image]:
    table = pq.read_table(input_dir / "00000.parquet").to_pylist()
    return {row["key"]: Image.open(io.BytesIO(row["jpg"])).convert("RGB") for row in table}


def judged(out) -> list[dict]:
    """Every judged text of an output (kept and rejected), in sample_id order."""
    rows = pq.read_table(out / "kept").drop(["jpg"]).to_pylist()
    rows += [{**row, "kept": False} for row in pq.read_table(out / "rejected").to_pylist()]
    for row in rows:
        row.setdefault("reason", None)
    return sorted(rows, key=lambda row: row["sample_id"])


def reference_scores(ranker, images: dict, rows: list[dict]) -> dict[str, float]:
    """The ranker's own cosine similarity of each judged text with its image (decoded in full, preprocessed by the
    ranker itself)."""
    keys = sorted(images)
    texts = {key: [row for row in rows if row["key"] == key] for key in keys}
    scores = ranker.score([images[key] for key in keys], [[row["caption"] for row in texts[key]] for key in keys])
    assert all(score.itm is None for group in scores for score in group)
    return {row["sample_id"]: score.itc for key, group in zip(keys, scores) for row, score in zip(texts[key], group)}


def expected_kept(rows: list[dict], score: dict[str, float], threshold: float | None, top_n: int | None) -> set:
    """The selection rules, written out for one image at a time: at least the threshold, the first of identical
    normalised texts, then the top N by score (ties in candidate order)."""
    kept = set()
    for key in sorted({row["key"] for row in rows}):
        mine = sorted((row for row in rows if row["key"] == key),
                      key=lambda row: (row["source"] != "web", row["source_index"]))
        seen, passing = set(), []
        for row in mine:
            if threshold is not None and score[row["sample_id"]] < threshold:
                continue
            if normalise(row["caption"]) in seen:
                continue
            seen.add(normalise(row["caption"]))
            passing.append(row["sample_id"])
        if top_n is not None:
            passing = sorted(passing, key=lambda sid: -score[sid])[:top_n]  # stable: candidate order on ties
        kept.update(passing)
    return kept


def a_threshold_between(scores: list[float]) -> float:
    """A threshold in the widest gap of the middle half of the scores: some pass, some not, none close to it."""
    ordered = sorted(scores)
    n = len(ordered)
    gaps = [(ordered[i + 1] - ordered[i], i) for i in range(n // 4, 3 * n // 4)]
    width, i = max(gaps)
    assert width > 1e-4
    return (ordered[i] + ordered[i + 1]) / 2


def settings_for(captioner, filter_, **kwargs) -> BootstrapSettings:
    return BootstrapSettings(captioner=str(captioner), filter=str(filter_), filter_family="clip", by="itc",
                             num_captions=K, device="cpu", precision="fp32", batch_size=4, decode_threads=0,
                             sampling_overrides={"max_length": 12}, **kwargs)


def test_a_clip_filter_judges_by_itc_with_a_threshold_and_refilter_reproduces_a_fresh_run(
        captioner_folder, clip_folder, input_dir, tmp_path):
    ranker = load_filter(clip_folder, device="cpu", precision="fp32")
    shards = list_shards(str(input_dir))
    images = decoded_images(input_dir)
    # A first run at threshold -1 (every text passes) gives the texts; their scores are the ranker's own.
    everything = tmp_path / "all"
    run(shards, settings_for(captioner_folder, clip_folder, threshold=-1.0), str(everything))
    rows = judged(everything)
    assert len(rows) == len(WEB_TEXTS) * (1 + K)
    truth = reference_scores(ranker, images, rows)
    assert all(abs(row["itc_score"] - truth[row["sample_id"]]) < 1e-5 for row in rows)
    assert all(row["itm_score"] is None for row in rows)  # null: CLIP has no ITM head
    assert pq.read_schema(everything / "kept" / "00000.parquet").field("itm_score").nullable
    # The BLIP captioner got its own (squashed) pixels, not CLIP's centre crop of the same size.
    settings = settings_for(captioner_folder, clip_folder, threshold=0.0)
    captioner = load_captioner(captioner_folder, device="cpu", precision="fp32",
                               settings=sampling_settings(captioner_folder, **settings.sampling_overrides))
    keys = sorted(images)
    captions = captioner.caption([images[k] for k in keys], num_captions=K,
                                 seeds=[settings.sample_seed(k) for k in keys])
    for row in rows:
        if row["source"] == "synthetic":
            assert row["caption"] == captions[keys.index(row["key"])][row["source_index"]]

    threshold = a_threshold_between(list(truth.values()))
    fresh = tmp_path / "fresh"
    run(shards, settings_for(captioner_folder, clip_folder, threshold=threshold), str(fresh))
    fresh_rows = judged(fresh)
    assert {row["sample_id"] for row in fresh_rows if row["reason"] is None} == \
        expected_kept(rows, truth, threshold, None)
    assert any(row["reason"] == "below threshold" for row in fresh_rows)
    config = json.loads(fresh_rows[0]["capfilt_config"])
    assert (config["by"], config["threshold"], config["filter_family"]) == ("itc", threshold, "clip")
    stats = read_stats(OutputLayout(str(fresh)))
    assert stats["by"] == "itc" and "itm_histogram" not in stats
    histogram = stats["score_histogram"]
    assert histogram["score"] == "itc" and histogram["range"] == [-1.0, 1.0]
    for source in ("web", "synthetic"):  # binned on [-1, 1] in 20 bins of 0.1, from the ranker's own scores
        expected = [0] * 20
        for row in rows:
            if row["source"] == source:
                expected[min(19, int((truth[row["sample_id"]] + 1) / 2 * 20))] += 1
        assert histogram[source] == expected
    report = (fresh / "report.html").read_text()
    assert "ITC score histogram" in report and "ITC cosine similarity" in report and ">-1.0</text>" in report

    # refilter of the everything-passes run at the threshold: the fresh run, row for row (but the refilter's keys)
    refiltered = tmp_path / "refiltered"
    refilter(RefilterSettings(threshold=threshold), str(everything), str(refiltered))  # by: the source's, itc
    again = judged(refiltered)
    for ours, theirs in zip(again, fresh_rows, strict=True):
        ours_config = json.loads(ours.pop("capfilt_config"))
        theirs_config = json.loads(theirs.pop("capfilt_config"))
        assert ours_config.pop("refiltered_from") == str(everything)
        assert ours_config.pop("keep_fraction") is None
        assert ours_config == theirs_config
        assert ours == theirs
    assert read_stats(OutputLayout(str(refiltered)))["score_histogram"] == histogram
    with pytest.raises(RefilterError, match="stores no itm_score.*refilter it --by itc"):
        refilter(RefilterSettings(threshold=0.5, by="itm"), str(everything), str(tmp_path / "by-itm"))
    assert not (tmp_path / "by-itm").exists()  # refused before anything is written


def test_blip2s_recipe_top_two_by_clip_similarity_without_a_threshold(blip2_folder, clip_folder, input_dir,
                                                                      tmp_path):
    """A BLIP-2 captioner (32 px, squashed) and a CLIP ranker (32 px, centre crop) in one shard job: each gets its
    own pixels; the top two texts of each image by the ranker's similarity are kept, no threshold."""
    settings = BootstrapSettings(captioner=str(blip2_folder), filter=str(clip_folder), captioner_family="blip-2",
                                 filter_family="clip", by="itc", threshold=None, select="top-2", num_captions=K,
                                 sampling_overrides={"max_length": 8}, device="cpu", precision="fp32",
                                 batch_size=4, decode_threads=0)
    models = Models.load(settings)
    assert models.captioner.preprocess.image_size == models.filter.preprocess.image_size == SIZE
    assert models.captioner.preprocess.key != models.filter.preprocess.key
    layout = OutputLayout(str(tmp_path / "out"))
    marker = process_shard(list_shards(str(input_dir))[0], models, settings, layout)
    rows = judged(tmp_path / "out")
    images = decoded_images(input_dir)
    keys = sorted(images)
    captions = models.captioner.caption([images[k] for k in keys], num_captions=K,
                                        seeds=[settings.sample_seed(k) for k in keys])
    for row in rows:
        if row["source"] == "synthetic":
            assert row["caption"] == captions[keys.index(row["key"])][row["source_index"]]
    truth = reference_scores(models.filter, images, rows)
    assert all(abs(row["itc_score"] - truth[row["sample_id"]]) < 1e-5 for row in rows)
    kept = {row["sample_id"] for row in rows if row["reason"] is None}
    assert kept == expected_kept(rows, truth, None, 2)
    assert {row["reason"] for row in rows} <= {None, "not in top n", "duplicate text"}  # nothing below a threshold
    assert all(sum(1 for sid in kept if sid.startswith(f"00000_{i:09d}_")) == 2 for i in range(len(WEB_TEXTS)))
    assert marker["by"] == "itc" and marker["rejected_reasons"]["below threshold"] == {"web": 0, "synthetic": 0}
    assert json.loads(rows[0]["capfilt_config"])["captioner_family"] == "blip-2"


def test_a_filter_without_itm_in_an_itm_run_and_a_model_of_another_family_are_clear_errors(
        captioner_folder, clip_folder, filter_folder):
    with pytest.raises(CheckpointError, match="has no ITM head, so it cannot judge by ITM: .*--by itc"):
        Models.load(BootstrapSettings(captioner=str(captioner_folder), filter=str(clip_folder), filter_family="clip",
                                      device="cpu", precision="fp32"))
    with pytest.raises(CheckpointError, match="is a blip model, but this run was set up for a clip filter"):
        Models.load(BootstrapSettings(captioner=str(captioner_folder), filter=str(filter_folder), filter_family="clip",
                                      by="itc", threshold=0.2, device="cpu", precision="fp32"))


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": None}, "no threshold .* needs select top-N"),
    ({"by": "itc", "threshold": -1.5}, r"ITC cosine similarity is in \[-1, 1\]"),
    ({"threshold": -0.5}, r"ITM match probability is in \[0, 1\]"),
    ({"by": "clip"}, "by must be one of"),
    ({"filter_family": "vit"}, "filter_family must be one of"),
    ({"captioner_family": "blip-2", "sampling_overrides": {"beam_length_rule": "blip"}}, "unknown sampling settings"),
    ({"sampling_overrides": {"instruction": "say"}}, "unknown sampling settings"),
])
def test_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BootstrapSettings(**kwargs)


def test_settings_accept_itc_runs_and_lm_sampling_keys():
    top = BootstrapSettings(by="itc", threshold=None, select="top-2", captioner_family="instructblip",
                            filter_family="siglip", sampling_overrides={"instruction": "Describe it.", "top_p": 0.8})
    assert (top.threshold, top.top_n, top.provenance()["by"]) == (None, 2, "itc")
    assert BootstrapSettings(by="itc", threshold=-0.25).threshold == -0.25
    assert {k: BootstrapSettings().provenance()[k] for k in ("by", "captioner_family", "filter_family")} == \
        {"by": "itm", "captioner_family": "blip", "filter_family": "blip"}
