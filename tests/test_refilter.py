"""``capfilt refilter``: a new split from the stored scores equals a fresh run with the new settings, read back; a
split at the run's own settings is the run again.

The captioner writes fixed captions (so that texts repeat); the filter is the tiny random-weight one. A fresh run
with the new settings is the reference: kept/, rejected/ and failed/ row for row, every column, and stats.json,
except the refilter's own record (``by``, ``keep_fraction``, ``refiltered_from`` in the settings) and the timings.
A refilter of a run at its own settings (``assert_reproduces``) is held to more: also each file's provenance and
each shard's marker, hashes files and cross-shard record. The demo world with the shipped demo models is compared
the same way through the command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from PIL import Image

from capfilt import cli
from capfilt.captioner import Captioner
from capfilt.pipelines import bootstrap
from capfilt.pipelines.layout import DONE, FAILED, KEPT, REJECTED, OutputLayout, SettingsMismatchError
from capfilt.pipelines.refilter import REFILTER_KEYS, RefilterError, RefilterSettings, refilter
from capfilt.pipelines.report import read_stats
from capfilt.pipelines.schema import BELOW_THRESHOLD, DUPLICATE_IMAGE, read_provenance
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import list_shards
from capfilt.pipelines.stats import MAX_SAMPLES_PER_CELL

K = 2
CAPTIONS = ["a red circle", "a blue square"]


def jpeg(colour, size=(40, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


A, B, C, D, E, F = (jpeg(c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200),
                                      (90, 30, 160)))
# (image, web text) per row; None: a failed download. Duplicate images within shards (A, F) and across (B, D, E); web
# texts equal to a caption once normalised (shard 0 rows 0 and 5).
SHARDS = [[(A, "a red circle"), (B, "a dog"), (A, "a cat"), (C, ""), (D, "a bird"), (E, "A RED  circle")],
          [(B, "a bird"), (F, "a fish"), (None, "a lost image"), (F, "a fish"), (E, "green square"), (D, "click here")]]


def write_inputs(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for shard, rows in enumerate(SHARDS):
        table = pa.Table.from_pylist([
            {"key": f"{shard}-{i}", "url": f"http://127.0.0.1/{shard}/{i}.jpg", "caption": text, "jpg": image,
             "status": "success" if image else "failed_to_download",
             "error_message": None if image else "HTTP Error 404: Not Found"}
            for i, (image, text) in enumerate(rows)])
        pq.write_table(table, folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text("{}")
    return folder


def fixed_captions(self, pixel_values, num_captions=1, seed=None, *, seeds=None):
    return [CAPTIONS[:num_captions] for _ in range(len(pixel_values))]


def run(shards, settings, out) -> OutputLayout:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Captioner, "caption_pixels", fixed_captions)
        with BeamTestPipeline(runner="FnApiRunner") as p:
            bootstrap.build_pipeline(p, shards, settings, str(out))
    return OutputLayout(str(out))


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("input"))


@pytest.fixture(scope="module")
def settings(captioner_folder, filter_folder):
    return BootstrapSettings(captioner=str(captioner_folder), filter=str(filter_folder), num_captions=K,
                             batch_size=3, threshold=0.0, seed=3, torch_threads=1)


@pytest.fixture(scope="module")
def everything(input_dir, settings, tmp_path_factory):
    """A run at threshold 0: every text passes the filter."""
    return run(list_shards(input_dir), settings, tmp_path_factory.mktemp("out") / "all")


def best_scores(out) -> list[float]:
    """Each image's best ITM score in a run where every text passed (its image is sample_id less the source)."""
    table = pq.read_table(f"{out.root}/{KEPT}", columns=["sample_id", "itm_score"]).to_pylist()
    best: dict[str, float] = {}
    for row in table:
        image = row["sample_id"].rsplit("_", 1)[0]
        best[image] = max(best.get(image, 0.0), row["itm_score"])
    return list(best.values())


@pytest.fixture(scope="module")
def high(everything):
    """The median of the images' best ITM scores: about half of the images keep no text at all."""
    ordered = sorted(best_scores(everything))
    return ordered[len(ordered) // 2]


def _names(out, kind) -> list[str]:
    return sorted(path.name for path in Path(out, kind).glob("*.parquet"))


@pytest.fixture(scope="module")
def low(everything):
    """The lowest of the images' best ITM scores: every image keeps a text, so duplicate images repeat in kept/."""
    return min(best_scores(everything))


def rows(out, kind) -> list[dict]:
    """The rows of a folder's files in file and row order; ``capfilt_config`` as JSON without the refilter's keys."""
    found = []
    for name in _names(out, kind):
        for row in pq.read_table(Path(out, kind, name)).to_pylist():
            if "capfilt_config" in row:
                config = json.loads(row["capfilt_config"])
                row["capfilt_config"] = {k: v for k, v in config.items() if k not in REFILTER_KEYS}
            found.append(row)
    return found


def assert_same_output(fresh, refiltered, source):
    """kept/, rejected/ and failed/ equal row for row; stats.json and the files' provenance equal but for the
    refilter's record (and the timings)."""
    fresh, refiltered = OutputLayout(str(fresh)), OutputLayout(str(refiltered))
    for kind in (KEPT, REJECTED, FAILED):
        assert _names(fresh.root, kind) == _names(refiltered.root, kind)
        assert rows(fresh.root, kind) == rows(refiltered.root, kind), kind
        for name in _names(fresh.root, kind):
            ours = read_provenance(pq.read_schema(f"{refiltered.root}/{kind}/{name}"))
            theirs = read_provenance(pq.read_schema(f"{fresh.root}/{kind}/{name}"))
            assert ours["config"]["refiltered_from"] == str(source)
            ours["config"] = {k: v for k, v in ours["config"].items() if k not in REFILTER_KEYS}
            assert {k: v for k, v in ours.items() if k != "input"} == {k: v for k, v in theirs.items() if k != "input"}
    for row in pq.read_table(f"{refiltered.root}/{KEPT}").to_pylist()[:3]:
        assert json.loads(row["capfilt_config"])["refiltered_from"] == str(source)
    ours, theirs = read_stats(refiltered), read_stats(fresh)
    assert {k: v for k, v in ours.items() if k not in ("settings", "shard_seconds", "timing")} == \
        {k: v for k, v in theirs.items() if k not in ("settings", "shard_seconds", "timing")}
    assert {k: v for k, v in ours["settings"].items() if k not in REFILTER_KEYS} == theirs["settings"]
    assert "Refiltered from the scores stored in" in Path(refiltered.report_file).read_text()


def _pipeline_order(row: dict) -> tuple:
    """Where a judged text comes in its shard: by input row, the web text first, then the captions by index."""
    shard, index, _ = row["sample_id"].split("_")
    return shard, int(index), row["source"] != "web", row["source_index"]


def _examples_at_hand(run: Path, shard: str) -> list[tuple]:
    """The report examples of removed texts refilter takes for ``shard`` of ``run`` at the run's own settings: the
    pipeline's rule (the first ``MAX_SAMPLES_PER_CELL`` of each source, in the pipeline's order) among the removed
    texts whose image has a kept text in the shard, the only image bytes refilter has."""
    at_hand = {row["image_sha256"] for row in pq.read_table(run / KEPT / f"{shard}.parquet").to_pylist()}
    removed = sorted((row for row in pq.read_table(run / REJECTED / f"{shard}.parquet").to_pylist()
                      if row["image_sha256"] in at_hand), key=_pipeline_order)
    taken = Counter()
    chosen = []
    for row in removed:
        if taken[row["source"]] < MAX_SAMPLES_PER_CELL:
            taken[row["source"]] += 1
            chosen.append((row["key"], row["caption"], row["source"], row["reason"]))
    return chosen


def assert_reproduces(run, refiltered):
    """``refiltered``, a refilter of ``run`` at the run's own settings, is the run again: kept/, rejected/ and
    failed/ row for row, every column; each file's provenance; each shard's marker, key and image hashes files and
    cross-shard dedup record; stats.json.

    What may differ, and why: the refilter's own record (``REFILTER_KEYS``: ``keep_fraction``,
    ``refiltered_from``, in every row's ``capfilt_config``, every file's provenance and stats.json's settings); the
    timings (a marker's ``seconds`` and ``timing``, stats.json's ``shard_seconds`` and ``timing``); and a marker's
    report examples of removed texts: refilter has the bytes of the kept images only (it reads no input shard for a
    removed text), so it takes them by the pipeline's rule among the removed texts whose image is kept
    (``_examples_at_hand``)."""
    run, refiltered = Path(run), Path(refiltered)
    for kind in (KEPT, REJECTED, FAILED):
        assert _names(run, kind) == _names(refiltered, kind)
        assert rows(run, kind) == rows(refiltered, kind), kind  # capfilt_config without REFILTER_KEYS
        for name in _names(run, kind):
            ours = read_provenance(pq.read_schema(refiltered / kind / name))
            theirs = read_provenance(pq.read_schema(run / kind / name))
            assert ours["config"]["refiltered_from"] == str(run)
            ours["config"] = {k: v for k, v in ours["config"].items() if k not in REFILTER_KEYS}
            assert ours == theirs
            configs = pq.read_table(refiltered / kind / name, columns=["capfilt_config"]).column(0).to_pylist() \
                if kind != FAILED else []
            assert all(json.loads(config)["refiltered_from"] == str(run) for config in configs)
    assert sorted(p.name for p in (run / DONE).iterdir()) == sorted(p.name for p in (refiltered / DONE).iterdir())
    for path in sorted((run / DONE).iterdir()):
        if path.suffix != ".json":  # .keys, .images, .dedup
            assert (refiltered / DONE / path.name).read_bytes() == path.read_bytes(), path.name
            continue
        ours, theirs = json.loads((refiltered / DONE / path.name).read_text()), json.loads(path.read_text())
        samples = ours.pop("samples"), theirs.pop("samples")
        examples = {outcome: [[s for s in found if s["kept"] == outcome] for found in samples]
                    for outcome in (True, False)}
        assert {k: v for k, v in ours.items() if k not in ("seconds", "timing")} == \
            {k: v for k, v in theirs.items() if k not in ("seconds", "timing")}
        assert examples[True][0] == examples[True][1]  # kept texts: their images are at hand, thumbnails and all
        assert [(s["key"], s["text"], s["source"], s["reason"]) for s in examples[False][0]] == \
            _examples_at_hand(run, path.stem)
    ours, theirs = read_stats(OutputLayout(str(refiltered))), read_stats(OutputLayout(str(run)))
    assert {k: v for k, v in ours.items() if k not in ("settings", "shard_seconds", "timing")} == \
        {k: v for k, v in theirs.items() if k not in ("settings", "shard_seconds", "timing")}
    assert {k: v for k, v in ours["settings"].items() if k not in REFILTER_KEYS} == theirs["settings"]


def test_a_refilter_at_the_runs_own_settings_is_the_run(everything, tmp_path):
    """Threshold 0: every text passes, so duplicate images repeat in kept/ within and across shards (counted)."""
    refilter(RefilterSettings(threshold=0.0), everything.root, str(tmp_path / "again"))
    assert_reproduces(everything.root, tmp_path / "again")
    assert read_stats(OutputLayout(str(tmp_path / "again")))["duplicate_images"]["images"]


@pytest.mark.parametrize("select, dedup", [("all", False), ("top-1", False), ("all", True)])
def test_refilter_equals_a_fresh_run_with_the_new_settings(select, dedup, input_dir, settings, everything, high, low,
                                                           tmp_path):
    threshold = low if dedup else high  # at the lower one duplicate images repeat within and across shards
    new = dataclasses.replace(settings, threshold=threshold, select=select, dedup_images=dedup)
    fresh = run(list_shards(input_dir), new, tmp_path / "fresh")
    stats = refilter(RefilterSettings(threshold=threshold, select=select, dedup_images=dedup), everything.root,
                     str(tmp_path / "refiltered"))
    assert_same_output(fresh.root, tmp_path / "refiltered", everything.root)
    assert stats["settings"]["by"] == "itm" and stats["settings"]["keep_fraction"] is None
    # The rules the variant is about did remove texts: the comparison is not between two empty columns.
    removed = Counter(row["reason"] for row in rows(fresh.root, REJECTED))
    assert removed[BELOW_THRESHOLD] and (select == "all" or removed["not in top n"])
    if dedup:  # within a shard A (shard 0 rows 0, 2) and F (shard 1 rows 1, 3); across B, E and D
        dropped = {row["sample_id"].rsplit("_", 1)[0] for row in rows(fresh.root, REJECTED)
                   if row["reason"] == DUPLICATE_IMAGE}
        assert dropped == {"00000_000000002", "00001_000000003", "00001_000000000", "00001_000000004",
                           "00001_000000005"}
    # The fresh run refiltered at its own settings (select and dedup_images left to the source's) is the run again.
    refilter(RefilterSettings(threshold=threshold), fresh.root, str(tmp_path / "again"))
    assert_reproduces(fresh.root, tmp_path / "again")


def test_lowering_the_threshold_takes_images_from_kept_or_by_reference_from_the_input(
        input_dir, settings, everything, high, tmp_path):
    strict = run(list_shards(input_dir), dataclasses.replace(settings, threshold=high), tmp_path / "strict")
    strict_kept = {row["image_sha256"] for row in rows(strict.root, KEPT)}
    refilter(RefilterSettings(threshold=0.0), strict.root, str(tmp_path / "lenient"))
    assert_same_output(everything.root, tmp_path / "lenient", strict.root)
    # Some kept images had no kept row in the source: their bytes are the input's.
    inputs = {hashlib.sha256(image).hexdigest(): image for shard in SHARDS for image, _ in shard if image}
    fetched = {row["image_sha256"] for row in rows(tmp_path / "lenient", KEPT)} - strict_kept
    assert fetched
    for row in rows(tmp_path / "lenient", KEPT):
        assert row["jpg"] == {"bytes": inputs[row["image_sha256"]], "path": None}

    # The input moved: a clear error naming the recorded path, nothing written for the shard; --input finds it.
    moved = tmp_path / "moved"
    shutil.copytree(input_dir, moved)
    hidden = input_dir.with_name(input_dir.name + "-hidden")
    input_dir.rename(hidden)
    try:
        with pytest.raises(RefilterError) as error:
            refilter(RefilterSettings(threshold=0.0), strict.root, str(tmp_path / "again"))
        assert re.search(f"input shard '{re.escape(str(input_dir))}/0000[01].parquet' of shard 0000[01] is not "
                         "reachable.*Give --input", str(error.value))
        shard = re.search("of shard (0000[01])", str(error.value)).group(1)
        assert not (tmp_path / "again" / DONE / f"{shard}.json").exists()
        assert not (tmp_path / "again" / KEPT / f"{shard}.parquet").exists()
        refilter(RefilterSettings(threshold=0.0, input=str(moved)), strict.root, str(tmp_path / "again"))  # resumes
    finally:
        hidden.rename(input_dir)
    assert rows(tmp_path / "again", KEPT) == rows(tmp_path / "lenient", KEPT)

    # An input whose row is another image than the one judged is an error, not a wrong pair.
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in sorted(input_dir.glob("*.parquet")):
        table = pq.read_table(path)
        swapped = [A if data is not None else None for data in table.column("jpg").to_pylist()]
        pq.write_table(table.set_column(table.schema.get_field_index("jpg"), "jpg", pa.array(swapped, pa.binary())),
                       changed / path.name)
    with pytest.raises(RefilterError, match="is not the image .* judged: the input changed"):
        refilter(RefilterSettings(threshold=0.0, input=str(changed)), strict.root, str(tmp_path / "wrong"))


def test_webdataset_input_is_read_by_reference_with_the_pipelines_reader(settings, high, tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    records = []
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i, (image, text) in enumerate(SHARDS[0] + SHARDS[1][:2]):
            key = f"{i:09d}"
            records.append({"key": key, "url": f"http://127.0.0.1/{i}.jpg", "caption": text, "status": "success"})
            for extension, data in (("jpg", image), ("txt", text.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.Table.from_pylist(records), folder / "00000.parquet")
    shards = list_shards(folder)
    assert shards[0].format == "webdataset"
    strict = run(shards, dataclasses.replace(settings, threshold=high), tmp_path / "strict")
    lenient = run(shards, settings, tmp_path / "lenient")
    refilter(RefilterSettings(threshold=0.0), strict.root, str(tmp_path / "refiltered"))
    assert_same_output(lenient.root, tmp_path / "refiltered", strict.root)
    assert len({r["image_sha256"] for r in rows(lenient.root, KEPT)}) > \
        len({r["image_sha256"] for r in rows(strict.root, KEPT)})  # some images came from the tar


def test_keep_fraction_is_a_share_of_the_web_texts_of_all_shards(everything, tmp_path):
    web = sorted((row["itm_score"] for kind in (KEPT, REJECTED) for row in rows(everything.root, kind)
                  if row["source"] == "web"), reverse=True)
    fraction = 0.4
    keep = math.ceil(fraction * len(web))
    stats = refilter(RefilterSettings(keep_fraction=fraction), everything.root, str(tmp_path / "share"))
    threshold = stats["settings"]["threshold"]
    assert threshold == web[keep - 1]  # the ⌈F·N⌉-th highest web score over both shards
    assert stats["settings"]["keep_fraction"] == fraction
    passed = stats["texts"]["web"] - stats["rejected_reasons"][BELOW_THRESHOLD]["web"]
    assert passed == sum(score >= threshold for score in web) >= keep
    # The same split as that threshold given as such.
    refilter(RefilterSettings(threshold=threshold), everything.root, str(tmp_path / "threshold"))
    for kind in (KEPT, REJECTED, FAILED):
        assert rows(tmp_path / "share", kind) == rows(tmp_path / "threshold", kind)
    assert json.loads(pq.read_table(f"{tmp_path}/share/{KEPT}").column("capfilt_config")[0].as_py())[
        "keep_fraction"] == fraction
    # F = 1 keeps every web text.
    whole = refilter(RefilterSettings(keep_fraction=1.0), everything.root, str(tmp_path / "whole"))
    assert whole["rejected_reasons"][BELOW_THRESHOLD]["web"] == 0


def test_by_itc_judges_and_ranks_by_the_itc_cosine(everything, tmp_path):
    stats = refilter(RefilterSettings(keep_fraction=0.5, by="itc", select="top-1"), everything.root,
                     str(tmp_path / "itc"))
    threshold = stats["settings"]["threshold"]
    kept, rejected = rows(tmp_path / "itc", KEPT), rows(tmp_path / "itc", REJECTED)
    assert kept and all(row["itc_score"] >= threshold for row in kept)
    assert all((row["itc_score"] < threshold) == (row["reason"] == BELOW_THRESHOLD) for row in rejected)
    for row in kept:  # top-1 by ITC among the image's texts that pass
        image = row["sample_id"].rsplit("_", 1)[0]
        rivals = [r for r in rejected if r["sample_id"].startswith(image + "_") and r["reason"] == "not in top n"]
        assert all(r["itc_score"] <= row["itc_score"] for r in rivals)
    web = [r["itc_score"] for r in kept + rejected if r["source"] == "web"]
    assert threshold == sorted(web, reverse=True)[math.ceil(0.5 * len(web)) - 1]
    report = (tmp_path / "itc" / "report.html").read_text()
    assert "ITC cosine similarity" in report and "50.00% of the web texts pass" in report


def test_a_rerun_resumes_and_other_settings_are_refused(everything, high, tmp_path):
    out = tmp_path / "out"
    refilter(RefilterSettings(threshold=high), everything.root, str(out))
    marker = (out / DONE / "00000.json").stat().st_mtime_ns
    (out / DONE / "00001.json").unlink()  # as if killed before shard 1's commit
    refilter(RefilterSettings(threshold=high), everything.root, str(out))
    assert (out / DONE / "00000.json").stat().st_mtime_ns == marker  # shard 0 was kept, shard 1 done again
    assert (out / DONE / "00001.json").is_file()
    with pytest.raises(SettingsMismatchError, match="threshold"):
        refilter(RefilterSettings(threshold=0.9), everything.root, str(out))


@pytest.mark.parametrize("kwargs, message", [
    ({}, "either a threshold or a keep fraction"),
    ({"threshold": 0.5, "keep_fraction": 0.5}, "either a threshold or a keep fraction"),
    ({"keep_fraction": 0.0}, r"in \(0, 1\]"),
    ({"keep_fraction": 1.5}, r"in \(0, 1\]"),
    ({"threshold": 1.5, "by": "itm"}, r"itm_score is in \[0.0, 1.0\]"),
    ({"threshold": -0.5, "by": "itc"}, None),  # a cosine may be negative
    ({"threshold": 0.5, "by": "clip"}, "by must be one of"),
    ({"threshold": 0.5, "select": "top-0"}, "select must be"),
])
def test_settings_are_checked(kwargs, message):
    if message is None:
        assert RefilterSettings(**kwargs).threshold == kwargs["threshold"]
        return
    with pytest.raises(ValueError, match=message):  # RefilterError is one
        RefilterSettings(**kwargs)


def test_sources_refilter_cannot_use_are_clear_errors(everything, tmp_path):
    with pytest.raises(RefilterError, match="no _run.json"):
        refilter(RefilterSettings(threshold=0.5), str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(RefilterError, match="is the source folder"):
        refilter(RefilterSettings(threshold=0.5), everything.root, everything.root + "/")
    old = tmp_path / "old"
    shutil.copytree(everything.root, old)
    run_file = json.loads((old / "_run.json").read_text())
    (old / "_run.json").write_text(json.dumps({**run_file, "schema_version": 2}))
    with pytest.raises(RefilterError, match="schema version 2: refilter needs version 4"):
        refilter(RefilterSettings(threshold=0.5), str(old), str(tmp_path / "out"))
    (old / "_run.json").write_text(json.dumps(run_file))
    path = old / KEPT / "00000.parquet"
    table = pq.read_table(path)
    at = table.schema.get_field_index("itc_score")
    pq.write_table(table.set_column(at, "itc_score", pa.nulls(table.num_rows, pa.float32())), path)
    with pytest.raises(RefilterError, match="without itc_score"):
        refilter(RefilterSettings(keep_fraction=0.5, by="itc"), str(old), str(tmp_path / "out2"))
    with pytest.raises(RefilterError, match="texts without itc_score"):
        refilter(RefilterSettings(threshold=0.5, by="itc"), str(old), str(tmp_path / "out3"))
    # by ITM (the source's score, by default) needs no ITC score; the threshold is checked on the source's range
    refilter(RefilterSettings(threshold=0.5), str(old), str(tmp_path / "by-itm"))
    with pytest.raises(RefilterError, match=r"itm_score is in \[0.0, 1.0\], not -0.5"):
        refilter(RefilterSettings(threshold=-0.5), str(old), str(tmp_path / "below-zero"))
    # A folder that lost a text: its files no longer hold what its marker counts.
    shutil.rmtree(old)
    shutil.copytree(everything.root, old)
    path = old / KEPT / "00001.parquet"
    table = pq.read_table(path)
    assert table.num_rows
    pq.write_table(table.slice(1), path)
    with pytest.raises(RefilterError, match="shard 00001 .* hold .* texts, its marker counts"):
        refilter(RefilterSettings(threshold=0.5), str(old), str(tmp_path / "out4"))
    # A file cut short: the error names it (pyarrow names a '<Buffer>').
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} cannot be read"):
        refilter(RefilterSettings(threshold=0.5), str(old), str(tmp_path / "out5"))


def test_the_command_line(everything, high, tmp_path, capsys):
    assert cli.main(["refilter", "--from", everything.root, "--out", str(tmp_path / "cli"), "--threshold",
                     str(high)]) == 0
    err = capsys.readouterr().err
    assert f"split {everything.root} anew by itm at threshold {high:.6g}" in err and "output in" in err
    assert read_stats(OutputLayout(str(tmp_path / "cli")))["settings"]["threshold"] == high
    with pytest.raises(SystemExit) as exit_:
        cli.main(["refilter", "--from", everything.root, "--out", str(tmp_path / "x"), "--threshold", "0.5",
                  "--keep-fraction", "0.5"])
    assert exit_.value.code == cli.EXIT_USAGE and "not allowed with argument" in capsys.readouterr().err
    assert cli.main(["refilter", "--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"),
                     "--keep-fraction", "0.5"]) == cli.EXIT_USAGE
    assert "capfilt: error: " in capsys.readouterr().err
    assert cli.main(["refilter", "--from", everything.root, "--out", str(tmp_path / "y"), "--keep-fraction",
                     "1.5"]) == cli.EXIT_USAGE
    assert "the keep fraction is a share of the web texts in (0, 1]" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_half(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "half"
    assert cli.main(["bootstrap", "--data", "demo", "--demo-size", "40", "--demo-shard-size", "20", "--out", str(out),
                     "--torch-threads", "1", "--progress-interval", "1000"]) == 0
    return out


@pytest.mark.parametrize("flags", [[], ["--select", "top-1", "--dedup-images"]])
def test_on_the_demo_refilter_at_07_equals_a_fresh_run_at_07(flags, demo_half, tmp_path):
    """``capfilt bootstrap`` on the demo at 0.7 (same seeds) and ``capfilt refilter --from OUT(0.5) --threshold
    0.7`` write the same kept/ and rejected/ (and failed/, stats); a refilter of the run at 0.7 is the run again."""
    fresh = tmp_path / "fresh"
    assert cli.main(["bootstrap", "--data", "demo", "--demo-size", "40", "--demo-shard-size", "20", "--out",
                     str(fresh), "--threshold", "0.7", "--torch-threads", "1", "--progress-interval", "1000",
                     *flags]) == 0
    assert cli.main(["refilter", "--from", str(demo_half), "--out", str(tmp_path / "re"), "--threshold", "0.7",
                     *flags]) == 0
    assert_same_output(fresh, tmp_path / "re", demo_half)
    removed = {r["sample_id"] for r in rows(demo_half, KEPT)} & {r["sample_id"] for r in rows(fresh, REJECTED)}
    assert removed  # the split changed: the comparison is not of two copies of the source
    assert cli.main(["refilter", "--from", str(fresh), "--out", str(tmp_path / "again"), "--threshold", "0.7"]) == 0
    assert_reproduces(fresh, tmp_path / "again")


def test_the_command_line_shows_refilter_progress(tmp_path, capsys):
    from capfilt import cli

    source = tmp_path / "src"
    assert cli.main(["bootstrap", "--out", str(source), "--demo-size", "8", "--demo-shard-size", "4",
                     "--torch-threads", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["refilter", "--from", str(source), "--out", str(tmp_path / "new"), "--threshold", "0.7"]) == 0
    err = capsys.readouterr().err
    assert "refilter: 0/2 shards" in err and "refilter: 2/2 shards, 100%" in err and "\r" not in err
