"""The CapFilt Beam pipeline on tiny random-weight models and small img2dataset-style shards.

Random weights give arbitrary captions and scores, so the tests check what
must hold whatever the weights: every input row is accounted for, the scores
written are the filter's own for that image and text, captions are the
captioner's for each image's own seed, reruns resume to the same output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
from collections import Counter

import apache_beam as beam
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from capfilt.captioner import Captioner, SamplingSettings
from capfilt.filter import Filter
from capfilt.images import decode_image
from capfilt.pipelines import bootstrap
from capfilt.pipelines.layout import FAILED, KEPT, REJECTED, OutputLayout, SettingsMismatchError
from capfilt.pipelines.worker_models import Models
from capfilt.pipelines.progress import Progress
from capfilt.pipelines.schema import SCHEMA_VERSION, read_provenance
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import list_shards
from capfilt.pipelines.report import read_stats
from webdataset_shards import write_webdataset_tar

K = 2
BATCH = 3
ROWS_PER_SHARD = 8
PAIR_KEY = ["key", "source", "source_index"]



def jpeg(colour, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def shard_rows(shard: int) -> list[dict]:
    """img2dataset-style rows: images, a failed download, corrupt bytes, a too-small image, no web text."""
    rows = []
    for i in range(ROWS_PER_SHARD):
        row = {
            "key": f"{shard:05d}{i:04d}", "url": f"http://127.0.0.1/{shard}/{i}.jpg",
            "caption": ["a red circle", "a small green square", "a dog on the grass", "click here"][i % 4],
            "jpg": jpeg((30 * i, 200 - 20 * i, 50 + 40 * shard), size=(40 + i, 30 + 2 * i)),
            "status": "success", "error_message": None, "width": 40 + i, "height": 30 + 2 * i,
            "kind": "clean",
        }
        if i == 2:
            row.update(jpg=None, status="failed_to_download", error_message="HTTP Error 404: Not Found",
                       width=None, height=None)
        if i == 4:
            row["jpg"] = b"this is not an image"
        if i == 5:
            row["jpg"] = jpeg((0, 0, 0), size=(2, 2))
        if i == 6:
            row["caption"] = ""
        rows.append(row)
    return rows


def write_parquet_shards(folder, shards=2):
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        pq.write_table(pa.Table.from_pylist(shard_rows(shard)), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
    return write_parquet_shards(tmp_path_factory.mktemp("input"))


@pytest.fixture(scope="module")
def threshold(filter_folder, input_dir):
    """Between the middle web-text ITM scores: random weights score near 0.5, so 0.5 could keep everything."""
    filter_ = Filter.load(filter_folder)
    rows = [r for r in shard_rows(0) if r["status"] == "success" and r["caption"]]
    images, texts = [], []
    for r in rows:
        try:
            images.append(decode_image(r["jpg"]))
            texts.append([r["caption"]])
        except ValueError:
            continue
    scores = sorted(s[0].itm for s in filter_.score(images, texts))
    middle = len(scores) // 2
    return (scores[middle - 1] + scores[middle]) / 2


@pytest.fixture(scope="module")
def settings(captioner_folder, filter_folder, threshold):
    return BootstrapSettings(captioner=str(captioner_folder), filter=str(filter_folder), num_captions=K,
                             batch_size=BATCH, threshold=threshold, seed=7, torch_threads=1)


def run_pipeline(shards, settings, out, expected_rows=None):
    """Run with TestPipeline on the in-process FnApiRunner; optionally assert the run's row counts inside Beam."""
    with BeamTestPipeline(runner="FnApiRunner") as p:
        stats = bootstrap.build_pipeline(p, shards, settings, str(out))
        if expected_rows is not None:
            counts = stats | beam.Map(lambda s: (s["rows"], s["images"] + sum(s["failed"].values())))
            assert_that(counts, equal_to([(expected_rows, expected_rows)]))
    return OutputLayout(str(out))


@pytest.fixture(scope="module")
def full_run(input_dir, settings, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "full"
    return run_pipeline(list_shards(input_dir), settings, out, expected_rows=2 * ROWS_PER_SHARD)


def read(layout: OutputLayout, kind: str) -> pa.Table:
    return pq.read_table(layout.root + "/" + kind)


def sorted_rows(layout: OutputLayout, kind: str) -> list[dict]:
    keys = PAIR_KEY if kind != FAILED else ["key"]
    return sorted(read(layout, kind).to_pylist(), key=lambda r: tuple(r[k] for k in keys))


def test_every_input_row_is_kept_rejected_or_failed(full_run, input_dir):
    inputs = {r["key"]: r for shard in (0, 1) for r in shard_rows(shard)}
    judged = read(full_run, KEPT).to_pylist() + read(full_run, REJECTED).to_pylist()
    failed = read(full_run, FAILED).to_pylist()
    judged_keys = {r["key"] for r in judged}
    failed_keys = [r["key"] for r in failed]
    assert judged_keys | set(failed_keys) == set(inputs)
    assert not judged_keys & set(failed_keys)
    assert len(failed_keys) == len(set(failed_keys))
    # Each judged image: its web text (when it has one) and K synthetic captions, each exactly once.
    per_key = Counter((r["key"], r["source"]) for r in judged)
    for key in judged_keys:
        assert per_key[(key, "synthetic")] == K
        assert per_key[(key, "web")] == (1 if inputs[key]["caption"] else 0)
    assert Counter(tuple(r[k] for k in PAIR_KEY) for r in judged).most_common(1)[0][1] == 1
    # Failures carry their stage, img2dataset's error and status.
    by_key = {r["key"]: r for r in failed}
    for shard in (0, 1):
        assert by_key[f"{shard:05d}0002"]["stage"] == "download"
        assert by_key[f"{shard:05d}0002"]["error"] == "HTTP Error 404: Not Found"
        assert by_key[f"{shard:05d}0002"]["status"] == "failed_to_download"
        assert by_key[f"{shard:05d}0004"]["stage"] == "decode"
        assert by_key[f"{shard:05d}0005"]["stage"] == "size"
    assert len(failed) == 6
    # Both outcomes occur with the median threshold.
    assert read(full_run, KEPT).num_rows and read(full_run, REJECTED).num_rows


def test_stats_match_the_files(full_run):
    stats = read_stats(full_run)
    counts = duckdb.sql(
        f"select source, count(*) from read_parquet('{full_run.root}/kept/*.parquet') group by source"
    ).fetchall()
    kept = dict(counts)
    rejected = dict(duckdb.sql(
        f"select source, count(*) from read_parquet('{full_run.root}/rejected/*.parquet') group by source"
    ).fetchall())
    assert stats["schema_version"] == SCHEMA_VERSION
    assert stats["rows"] == 2 * ROWS_PER_SHARD and stats["images"] == 10
    assert stats["failed"] == {"read": 0, "parse": 0, "download": 2, "decode": 2, "size": 2, "caption": 0, "filter": 0}
    assert stats["kept"] == {s: kept.get(s, 0) for s in ("web", "synthetic")}
    assert stats["rejected"] == {s: rejected.get(s, 0) for s in ("web", "synthetic")}
    assert stats["web_missing"] == 2
    assert stats["noise_ratio"]["web"] == pytest.approx(rejected.get("web", 0) / 8)
    assert sum(stats["itm_histogram"]["synthetic"]) == 10 * K
    assert stats["shards"] == {"selected": 2, "done": 2, "errors": [], "damaged": []}
    report = open(full_run.report_file).read()
    assert "<svg" in report and "noise ratio" in report and "data:image/jpeg;base64," in report


def test_schema_and_provenance(full_run, settings):
    kept = read(full_run, KEPT)
    for name in ("key", "url", "caption", "text", "web_text", "source", "itm_score", "itc_score", "jpg",
                 "image_sha256", "width", "height", "captioner", "filter", "capfilt_config", "kind"):
        assert name in kept.schema.names
    rejected = read(full_run, REJECTED)
    assert "jpg" not in rejected.schema.names and "reason" not in kept.schema.names
    assert set(rejected.column("reason").to_pylist()) <= {"below threshold", "duplicate text"}
    assert set(kept.column("source").to_pylist()) <= {"web", "synthetic"}
    assert set(kept.column("captioner").to_pylist()) == {settings.captioner}
    config = json.loads(kept.column("capfilt_config")[0].as_py())
    assert config["num_captions"] == K and config["sampling"]["top_p"] == 0.9
    provenance = read_provenance(pq.read_schema(f"{full_run.root}/kept/00000.parquet"))
    assert provenance["schema_version"] == SCHEMA_VERSION
    assert provenance["models"]["filter"]["path"] == settings.filter
    # The pair's text is caption (text: the same); the input's text is web_text.
    inputs = {r["key"]: r for r in shard_rows(0) + shard_rows(1)}
    for row in kept.to_pylist() + rejected.to_pylist():
        assert row["caption"] == row["text"] and row["web_text"] == inputs[row["key"]]["caption"]
        if row["source"] == "web":
            assert row["caption"] == row["web_text"]
    # The image bytes are the input's, unchanged, in HF datasets' Image struct; image_sha256 is theirs.
    for row in kept.to_pylist():
        assert row["jpg"] == {"bytes": inputs[row["key"]]["jpg"], "path": None}
        assert row["image_sha256"] == hashlib.sha256(row["jpg"]["bytes"]).hexdigest()
    assert json.loads(kept.schema.metadata[b"huggingface"]) == {"info": {"features": {"jpg": {"_type": "Image"}}}}


def test_written_scores_are_the_filters_and_captions_the_captioners(full_run, settings):
    filter_ = Filter.load(settings.filter)
    captioner = Captioner.load(settings.captioner)  # the folder's sampling defaults: the paper's
    pairs = sorted_rows(full_run, KEPT) + sorted_rows(full_run, REJECTED)
    for shard in (0, 1):
        judged = [r for r in shard_rows(shard) if r["key"] in {p["key"] for p in pairs}]
        images = [decode_image(r["jpg"]) for r in judged]
        # Captions: the captioner's with each image's seed, in the pipeline's batches (the same products: the same
        # rounding at any precision; that other batches give the same captions is test_captioner's).
        for b in range(0, len(judged), BATCH):
            seeds = [settings.sample_seed(row["key"]) for row in judged[b:b + BATCH]]
            expected = captioner.caption(images[b:b + BATCH], num_captions=K, seeds=seeds)
            for row, captions in zip(judged[b:b + BATCH], expected):
                written = sorted((p for p in pairs if p["key"] == row["key"] and p["source"] == "synthetic"),
                                 key=lambda p: p["source_index"])
                assert [p["text"] for p in written] == captions
        # Scores: the filter's for the same image and texts, and kept exactly when ITM >= threshold.
        for row, image in zip(judged, images):
            mine = sorted((p for p in pairs if p["key"] == row["key"]),
                          key=lambda p: (p["source"] != "web", p["source_index"]))
            scores = filter_.score([image], [[p["text"] for p in mine]])[0]
            for p, score in zip(mine, scores):
                assert p["itm_score"] == pytest.approx(score.itm, abs=1e-5)
                assert p["itc_score"] == pytest.approx(score.itc, abs=1e-5)
                if abs(score.itm - settings.threshold) > 1e-5:  # clear of float noise
                    assert (p.get("reason") == "below threshold") == (score.itm < settings.threshold)
                    assert ("jpg" in p) == (score.itm >= settings.threshold and p.get("reason") is None)


def test_killed_run_resumes_to_the_same_output(full_run, input_dir, settings, tmp_path):
    shards = list_shards(input_dir)
    out = tmp_path / "resumed"
    layout = run_pipeline(shards[:1], settings, out)  # the "killed" run finished shard 0 only
    first_marker = (out / ".capfilt" / "done" / "00000.json").stat().st_mtime_ns
    # ... and was killed while writing shard 1: a temp file, and a stale final file without marker.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process that is gone: the killed job's
    killed = out / ".capfilt" / "tmp" / "run-killed"
    (killed / "00001-deadbeef").mkdir(parents=True)
    (killed / "run.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "local": True}))
    (killed / "00001-deadbeef" / "kept.parquet").write_bytes(b"half a parquet file")
    pq.write_table(read(full_run, KEPT).slice(0, 3), out / "kept" / "00001.parquet")
    assert not layout.is_done("00001")

    run_pipeline(shards, settings, out)
    assert (out / ".capfilt" / "done" / "00000.json").stat().st_mtime_ns == first_marker  # shard 0 was skipped
    for kind in (KEPT, REJECTED, FAILED):
        assert sorted_rows(layout, kind) == sorted_rows(full_run, kind)
    assert not (out / ".capfilt" / "tmp").exists()
    total = duckdb.sql(f"select count(*), count(distinct (key, source, source_index)) "
                       f"from read_parquet('{out}/kept/*.parquet')").fetchall()[0]
    assert total[0] == total[1]
    assert read_stats(layout)["rows"] == read_stats(full_run)["rows"]


def test_resuming_with_other_settings_is_refused(full_run, input_dir, settings):
    other = dataclasses.replace(settings, threshold=0.9)
    with pytest.raises(SettingsMismatchError, match="threshold"):
        run_pipeline(list_shards(input_dir), other, full_run.root)


def test_a_model_error_on_one_image_fails_that_image_only(input_dir, settings, tmp_path, monkeypatch):
    caption_pixels = Captioner.caption_pixels
    row_3 = decode_image(shard_rows(0)[3]["jpg"])

    def flaky(self, pixel_values, num_captions=1, seed=None, *, seeds=None):
        if any(torch.equal(pixels, self.preprocess([row_3])[0]) for pixels in pixel_values):
            raise RuntimeError("model exploded")
        return caption_pixels(self, pixel_values, num_captions, seed, seeds=seeds)

    monkeypatch.setattr(Captioner, "caption_pixels", flaky)
    layout = run_pipeline(list_shards(input_dir)[:1], settings, tmp_path / "out", expected_rows=ROWS_PER_SHARD)
    failed = {r["key"]: r for r in read(layout, FAILED).to_pylist()}
    assert failed["000000003"]["stage"] == "caption"
    assert failed["000000003"]["error"] == "RuntimeError: model exploded"
    assert read_stats(layout)["images"] == 4


def test_a_model_failing_on_every_image_leaves_the_shard_unfinished(input_dir, settings, tmp_path, monkeypatch):
    def broken(self, pixel_values, texts):
        raise RuntimeError("filter is broken")

    monkeypatch.setattr(Filter, "score_pixels", broken)
    layout = run_pipeline(list_shards(input_dir)[:1], settings, tmp_path / "out")
    assert not layout.is_done("00000")
    errors = read_stats(layout)["shards"]["errors"]
    assert [e["shard"] for e in errors] == ["00000"] and "filter is broken" in errors[0]["error"]
    assert not (tmp_path / "out" / "kept" / "00000.parquet").exists()


def test_a_running_shard_reports_the_rows_it_has_read(input_dir, settings, tmp_path, monkeypatch):
    from capfilt.pipelines import process

    written = []

    def spy(path, text):
        written.append((path, json.loads(text)["rows"]))
        write_text(path, text)

    write_text = process.write_text
    monkeypatch.setattr(process, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(process, "write_text", spy)
    layout = run_pipeline(list_shards(input_dir)[:1], settings, tmp_path / "out", expected_rows=ROWS_PER_SHARD)
    assert written, "no progress was written"
    assert all(path.startswith(str(tmp_path / "out" / ".capfilt" / "tmp" / "run-")) and path.endswith("/progress.json")
               and "/00000-" in path for path, _ in written)
    rows = [n for _, n in written]
    assert rows == sorted(rows) and BATCH <= rows[0] and rows[-1] <= ROWS_PER_SHARD
    assert layout.progress_files() == {}  # removed with the committed attempt's temp folder


def test_progress_counts_running_shards_once_and_ignores_stale_attempts(tmp_path):
    def attempt(folder: str, rows: int):
        path = tmp_path / ".capfilt" / "tmp" / "run-x" / folder
        path.mkdir(parents=True, exist_ok=True)
        (path / "progress.json").write_text(json.dumps({"rows": rows}))

    attempt("00000-aaaaaaaaaaaa", 40)  # left by a killed earlier run
    stream = io.StringIO()
    with Progress(OutputLayout(str(tmp_path)), ["00000", "00001", "00002"], interval=3600, stream=stream) as progress:
        attempt("00001-bbbbbbbbbbbb", 25)
        attempt("00001-cccccccccccc", 30)  # a retry of the same shard: its furthest attempt counts
        attempt("00002-dddddddddddd", 7)
        (tmp_path / ".capfilt" / "done").mkdir()
        (tmp_path / ".capfilt" / "done" / "00002.json").write_text(json.dumps({"rows": 100}))  # done: its marker counts
        progress.update()
        assert (progress.in_flight, progress.images) == (30, 100)
        assert "shards 1/3 | 130 images this run" in progress.line()


def test_webdataset_shards_with_sidecar(settings, tmp_path):
    """img2dataset's webdataset layout: successes in the tar, every row in the sidecar Parquet."""
    folder = tmp_path / "wds"
    folder.mkdir()
    rows = shard_rows(0)
    write_webdataset_tar(folder / "00000.tar", rows)
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "jpg"} for r in rows]),
                   folder / "00000.parquet")
    shards = list_shards(folder)
    assert [(s.shard_id, s.format, s.sidecar is not None) for s in shards] == [("00000", "webdataset", True)]
    layout = run_pipeline(shards, settings, tmp_path / "out", expected_rows=ROWS_PER_SHARD)
    failed = {r["key"]: r["stage"] for r in read(layout, FAILED).to_pylist()}
    assert failed == {"000000002": "download", "000000004": "decode", "000000005": "size"}
    kept = read(layout, KEPT).to_pylist()
    assert all(r["jpg"]["bytes"] == rows[int(r["key"][-4:])]["jpg"] for r in kept)


def test_sampling_is_the_papers_then_the_model_folders_then_the_runs(captioner_folder, filter_folder, tmp_path):
    folder = tmp_path / "captioner"
    shutil.copytree(captioner_folder, folder)
    assert Models.load(BootstrapSettings(captioner=str(folder), filter=str(filter_folder))).sampling["top_p"] == 0.9
    (folder / "capfilt_sampling.json").write_text(json.dumps({"max_length": 12, "min_length": 5}))
    settings = BootstrapSettings(captioner=str(folder), filter=str(filter_folder), sampling_overrides={"top_p": 0.8})
    assert Models.load(settings).sampling == {**dataclasses.asdict(SamplingSettings()), "max_length": 12,
                                              "min_length": 5, "top_p": 0.8}
    with pytest.raises(ValueError, match="unknown sampling"):
        BootstrapSettings(sampling_overrides={"temperature": 2.0})


def test_the_orientation_img2dataset_recorded_is_applied(settings, tmp_path):
    """img2dataset stores a photo's pixels as the camera wrote them, without the tag, and keeps the tag in its
    ``exif`` column: the filter judges the photo upright (its scores are those of the upright image)."""
    stored = Image.new("RGB", (48, 32), (220, 20, 20))
    stored.paste((20, 20, 220), (24, 0, 48, 32))  # left red, right blue
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG")
    rows = [{"key": key, "url": None, "caption": "a red square above a blue square", "jpg": buffer.getvalue(),
             "status": "success", "exif": exif}
            for key, exif in (("rotated", json.dumps({"Image Orientation": "Rotated 90 CW"})), ("plain", None))]
    folder = tmp_path / "input"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "00000.parquet")
    layout = run_pipeline(list_shards(folder), dataclasses.replace(settings, threshold=0.0), tmp_path / "out")
    web = {r["key"]: r for r in read(layout, KEPT).to_pylist() if r["source"] == "web"}
    filter_ = Filter.load(settings.filter)
    upright = stored.transpose(Image.Transpose.ROTATE_270)  # orientation 6: turned a quarter clockwise
    for key, image in (("rotated", upright), ("plain", stored)):
        (score,) = filter_.score([image], [[rows[0]["caption"]]])[0]
        assert web[key]["itm_score"] == pytest.approx(score.itm, abs=1e-5), key
    assert (web["rotated"]["width"], web["rotated"]["height"]) == (48, 32)  # the size as stored
    assert web["rotated"]["itm_score"] != pytest.approx(web["plain"]["itm_score"], abs=1e-6)


def test_a_runs_kept_folder_is_input_for_another_run(full_run, settings, tmp_path):
    """kept/ stores images as HF ``Image`` structs; read as input shards, its rows are judged on their bytes."""
    kept = read(full_run, KEPT).to_pylist()
    layout = run_pipeline(list_shards(full_run.root + "/kept"), settings, tmp_path / "again",
                          expected_rows=len(kept))
    again = read(layout, KEPT).to_pylist() + read(layout, REJECTED).to_pylist()
    web = [r for r in again if r["source"] == "web"]
    assert read(layout, FAILED).num_rows == 0 and len(web) == len(kept)  # every kept pair is a row with a web text
    assert {r["image_sha256"] for r in again} == {r["image_sha256"] for r in kept}
    assert sorted(r["web_text"] for r in web) == sorted(r["caption"] for r in kept)
