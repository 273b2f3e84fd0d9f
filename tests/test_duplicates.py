"""Duplicate texts, --select top-N and --dedup-images through the Beam pipeline, read back from the files.

The captioner is replaced by one that writes fixed captions, so that duplicates are known; the filter is the tiny
random-weight one, with threshold 0 (every text passes) so that only the rules under test remove texts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from PIL import Image

from capfilt.captioner import Captioner
from capfilt.pipelines import bootstrap, image_dedup
from capfilt.pipelines.layout import KEPT, REJECTED, OutputLayout, SettingsMismatchError
from capfilt.pipelines.report import read_stats
from capfilt.pipelines.selection import normalise
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import list_shards

K = 2
CAPTIONS = ["a red circle", "A RED  circle"]  # caption 1 repeats caption 0 once normalised


def jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


A, B, C, D, E = (jpeg(c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)))
# (image, web text) per row. Shard 0 row 2 repeats row 0's image; shard 1 row 0 repeats shard 0 row 1's; shard 1
# row 2 repeats row 1's. Web texts equal to a caption (once normalised) are shard 0 row 0 and shard 1 row 3.
SHARDS = [[(A, "A red circle"), (B, "a dog"), (A, "a cat"), (C, "")],
          [(B, "a bird"), (D, "a fish"), (D, "a fish"), (E, "a red   circle")]]


@pytest.fixture
def fixed_captions(monkeypatch):
    def caption_pixels(self, pixel_values, num_captions=1, seed=None, *, seeds=None):
        return [CAPTIONS[:num_captions] for _ in range(len(pixel_values))]

    monkeypatch.setattr(Captioner, "caption_pixels", caption_pixels)


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("input")
    for shard, rows in enumerate(SHARDS):
        table = pa.Table.from_pylist([{"key": f"{shard}-{i}", "url": f"http://127.0.0.1/{shard}/{i}.jpg",
                                       "caption": text, "jpg": image, "status": "success"}
                                      for i, (image, text) in enumerate(rows)])
        pq.write_table(table, folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def settings(captioner_folder, filter_folder):
    return BootstrapSettings(captioner=str(captioner_folder), filter=str(filter_folder), num_captions=K,
                             batch_size=3, threshold=0.0, seed=3, torch_threads=1)


def run(shards, settings, out) -> OutputLayout:
    with BeamTestPipeline(runner="FnApiRunner") as p:
        bootstrap.build_pipeline(p, shards, settings, str(out))
    return OutputLayout(str(out))


def rows(out, kind) -> list[dict]:
    return sorted(pq.read_table(f"{out}/{kind}").to_pylist(), key=lambda r: r["sample_id"])


def place(row: dict) -> tuple[int, int]:
    """The (shard, row) of an output row, from its sample_id."""
    shard, index, _ = row["sample_id"].split("_")
    return int(shard), int(index)


def check_accounting(out, settings):
    """Every judged image's web text (when it has one) and K captions once; stats.json equal to the files' counts."""
    judged = rows(out, KEPT) + rows(out, REJECTED)
    per_row = Counter(place(r) for r in judged)
    for shard, shard_rows in enumerate(SHARDS):
        for i, (_, text) in enumerate(shard_rows):
            assert per_row[(shard, i)] == K + (1 if text else 0)
    assert len({r["sample_id"] for r in judged}) == len(judged)
    stats = read_stats(OutputLayout(str(out)))
    for kind in ("kept", "rejected"):
        counts = Counter(r["source"] for r in rows(out, kind))
        assert stats[kind] == {"web": counts["web"], "synthetic": counts["synthetic"]}
    reasons = Counter((r["reason"], r["source"]) for r in rows(out, REJECTED))
    assert {(reason, source): n for reason, by in stats["rejected_reasons"].items()
            for source, n in by.items() if n} == dict(reasons)
    assert stats["noise_ratio"] == {"web": 0.0, "synthetic": 0.0}  # threshold 0: nothing is noise
    return stats


def test_held_earlier_names_each_shards_hashes_that_a_shard_with_a_smaller_id_holds():
    def hashes_file(*hashes):
        return np.array(sorted(hashes), dtype="<u8").tobytes()

    files = [("00002", hashes_file(1, 5, 9)), ("00000", hashes_file(5, 7)), ("00001", hashes_file(7, 9, 11))]
    found = {shard: hashes.tolist() for shard, hashes in image_dedup.held_earlier(files).items()}
    assert found == {"00001": [7], "00002": [5, 9]}
    assert image_dedup.held_earlier([]) == {}


def test_identical_texts_of_an_image_are_kept_once_and_duplicate_images_counted(fixed_captions, input_dir, settings,
                                                                                tmp_path):
    out = tmp_path / "out"
    run(list_shards(input_dir), settings, out)
    stats = check_accounting(out, settings)
    kept = rows(out, KEPT)
    # No image keeps two texts that are equal once normalised; the web text wins over an equal caption.
    texts = Counter((place(r), normalise(r["caption"])) for r in kept)
    assert max(texts.values()) == 1
    for shard, shard_rows in enumerate(SHARDS):
        for i, (_, web) in enumerate(shard_rows):
            mine = {(r["source"], r["source_index"]) for r in kept if place(r) == (shard, i)}
            repeats = web and normalise(web) == normalise(CAPTIONS[0])
            assert mine == ({("web", 0)} if web else set()) | (set() if repeats else {("synthetic", 0)})
    duplicates = [r for r in rows(out, REJECTED) if r["reason"] == "duplicate text"]
    assert {(r["source"], r["source_index"]) for r in duplicates} == {("synthetic", 0), ("synthetic", 1)}
    assert stats["duplicate_texts"] == {"web": 0, "synthetic": len(duplicates)}
    # Duplicate images are counted, not dropped: A and D repeat within their shards, B across.
    assert {r["image_sha256"] for r in kept} == {hashlib.sha256(image).hexdigest() for image in (A, B, C, D, E)}
    images = stats["duplicate_images"]
    assert (images["images"], images["within_shards"], images["across_shards"], images["dropped"]) == (3, 2, 1, False)
    assert {e["sha256"] for e in images["examples"]} == {hashlib.sha256(image).hexdigest() for image in (A, B, D)}
    report = (out / "report.html").read_text()
    assert "Duplicate images: 3 images" in report and "still in kept/" in report
    assert f"<tr><td>duplicate text</td><td>0</td><td>{len(duplicates)}</td></tr>" in report


def kept_places(out) -> dict[str, set[tuple[int, int]]]:
    found: dict[str, set] = {}
    for row in rows(out, KEPT):
        found.setdefault(row["image_sha256"], set()).add(place(row))
    return found


def comparable(out, kind) -> list[str]:
    return [json.dumps(row, sort_keys=True, default=repr) for row in rows(out, kind)]


def test_dedup_images_keeps_each_image_at_its_first_shard_and_row_whatever_the_order(fixed_captions, input_dir,
                                                                                    settings, tmp_path):
    settings = dataclasses.replace(settings, dedup_images=True)
    shards = list_shards(input_dir)
    together = tmp_path / "together"
    run(shards, settings, together)
    check_accounting(together, settings)
    # Each image in kept/ at one (shard, row): the first that holds it.
    firsts = {}
    for shard, shard_rows in enumerate(SHARDS):
        for i, (image, _) in enumerate(shard_rows):
            firsts.setdefault(hashlib.sha256(image).hexdigest(), (shard, i))
    assert kept_places(together) == {sha: {first} for sha, first in firsts.items()}
    dropped = [r for r in rows(together, REJECTED) if r["reason"] == "duplicate image"]
    assert {place(r) for r in dropped} == {(0, 2), (1, 0), (1, 2)}
    assert all(r["itm_score"] is not None and "jpg" not in r for r in dropped)  # judged: their scores are kept
    stats = read_stats(OutputLayout(str(together)))
    assert stats["duplicate_images"]["dropped"] is True
    assert sum(stats["rejected_reasons"]["duplicate image"].values()) == len(dropped)
    assert json.loads((together / ".capfilt" / "done" / "00001.dedup").read_text())["moved"] == {
        r["sample_id"]: r["source"] for r in dropped if place(r)[0] == 1 and place(r)[1] == 0}
    # The later shard first, in its own job, then the earlier one: the same rows and counts.
    apart = tmp_path / "apart"
    run(shards[1:], settings, apart)
    assert kept_places(apart)[hashlib.sha256(B).hexdigest()] == {(1, 0)}  # shard 0 is not done yet
    run(shards[:1], settings, apart)
    for kind in (KEPT, REJECTED):
        assert comparable(apart, kind) == comparable(together, kind)
    assert read_stats(OutputLayout(str(apart)))["rejected_reasons"] == stats["rejected_reasons"]
    # The kept files still carry the image type and provenance after the move.
    schema = pq.read_schema(apart / "kept" / "00001.parquet")
    assert b"huggingface" in schema.metadata and b"capfilt" in schema.metadata


def test_a_killed_move_is_finished_by_the_next_run(fixed_captions, input_dir, settings, tmp_path, monkeypatch):
    settings = dataclasses.replace(settings, dedup_images=True)
    shards = list_shards(input_dir)
    expected = tmp_path / "expected"
    run(shards, settings, expected)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:  # the shards commit, the cross-shard step does not run yet
        patch.setattr(image_dedup, "drop_duplicate_images", lambda layout: None)
        run(shards, settings, out)
    layout = OutputLayout(str(out))
    b = hashlib.sha256(B).hexdigest()
    assert kept_places(out)[b] == {(0, 1), (1, 0)}
    replace_files = OutputLayout.replace_files

    def killed(self, sources, finals):  # renames rejected/ into place, then dies before kept/
        replace_files(self, sources[:1], finals[:1])
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patch:
        patch.setattr(OutputLayout, "replace_files", killed)
        with pytest.raises(KeyboardInterrupt):
            image_dedup.drop_duplicate_images(layout)
    in_both = {r["sample_id"] for r in rows(out, KEPT)} & {r["sample_id"] for r in rows(out, REJECTED)}
    assert in_both and all(place({"sample_id": s}) == (1, 0) for s in in_both)
    assert image_dedup.drop_duplicate_images(layout) == {"shards": 1, "texts": len(in_both)}
    assert image_dedup.drop_duplicate_images(layout) == {"shards": 0, "texts": 0}  # nothing left to move
    run(shards, settings, out)  # a rerun: every shard done; its end writes the stats
    for kind in (KEPT, REJECTED):
        assert comparable(out, kind) == comparable(expected, kind)
    assert read_stats(layout)["kept"] == read_stats(OutputLayout(str(expected)))["kept"]


def test_select_top_n_keeps_the_best_scoring_texts_of_each_image(monkeypatch, input_dir, settings, tmp_path):
    def caption_pixels(self, pixel_values, num_captions=1, seed=None, *, seeds=None):
        return [["a green square", "a blue triangle"][:num_captions] for _ in range(len(pixel_values))]

    monkeypatch.setattr(Captioner, "caption_pixels", caption_pixels)
    top = dataclasses.replace(settings, select="top-1")
    out = tmp_path / "top"
    run(list_shards(input_dir), top, out)
    check_accounting(out, top)
    judged = rows(out, KEPT) + rows(out, REJECTED)
    kept = rows(out, KEPT)
    assert sorted(place(r) for r in kept) == sorted({place(r) for r in judged})  # one text per image
    for row in kept:
        mine = [r for r in judged if place(r) == place(row)]
        assert row["itm_score"] == max(r["itm_score"] for r in mine)
    assert {r["reason"] for r in rows(out, REJECTED)} == {"not in top n"}
    assert json.loads(kept[0]["capfilt_config"])["select"] == "top-1"
    with pytest.raises(SettingsMismatchError, match="select"):
        run(list_shards(input_dir), settings, out)
