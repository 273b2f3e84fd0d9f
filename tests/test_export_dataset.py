"""``capfilt export-dataset``: kept/ as webdataset tars, read back with the webdataset library as open_clip does."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from PIL import Image

from capfilt import cli
from capfilt.pipelines import bootstrap
from capfilt.pipelines.export_dataset import ExportError, export_webdataset, sample_key
from capfilt.pipelines.schema import SCHEMA_VERSION
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import list_shards

SAMPLES_PER_TAR = 4


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (36, 30), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def kept(tmp_path_factory, captioner_folder, filter_folder):
    """A CapFilt run's kept/ (two shards, PNG images, threshold 0: every text kept)."""
    folder = tmp_path_factory.mktemp("input")
    for shard in range(2):
        rows = [{"key": f"{shard}{i}", "url": f"http://127.0.0.1/{shard}/{i}.png", "caption": f"web text {shard}.{i}",
                 "png": png((40 * i, 100 * shard, 90)), "status": "success", "licence": "cc-by"} for i in range(3)]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text("{}")
    settings = BootstrapSettings(captioner=str(captioner_folder), filter=str(filter_folder), threshold=0.0,
                                 batch_size=2, torch_threads=1)
    out = tmp_path_factory.mktemp("out")
    with BeamTestPipeline(runner="FnApiRunner") as p:
        bootstrap.build_pipeline(p, list_shards(folder), settings, str(out))
    return out / "kept"


def test_every_kept_row_comes_back_from_the_tars_with_its_text_and_image(kept, tmp_path):
    import webdataset as wds

    rows = pq.read_table(kept).to_pylist()
    assert len(rows) > SAMPLES_PER_TAR  # more than one tar
    out = tmp_path / "wds"
    assert cli.main(["export-dataset", "--format", "webdataset", "--from", str(kept), "--out", str(out),
                     "--samples-per-tar", str(SAMPLES_PER_TAR), "--min-tars", "1"]) == 0
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == [f"{i:05d}.tar" for i in range(-(-len(rows) // SAMPLES_PER_TAR))]
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False))
    assert len(samples) == len(rows)
    by_key = {sample_key(row["sample_id"]): row for row in rows}
    for sample in samples:
        row = by_key[sample["__key__"]]
        assert sample["png"] == row["png"]["bytes"]
        assert sample["txt"].decode() == row["caption"]  # the kept text, not the web text
        other = json.loads(sample["json"])
        assert other["web_text"] == row["web_text"] and other["itm_score"] == pytest.approx(row["itm_score"])
        assert other["sample_id"] == row["sample_id"] and other["licence"] == "cc-by"
        assert not {"png", "caption", "text", "capfilt_config"} & set(other)
    assert sorted(s["__key__"] for s in samples) == sorted(by_key)
    # sizes.json as open_clip's get_dataset_size reads it: the tars' base names -> samples, summing to all.
    sizes = json.loads((out / "sizes.json").read_text())
    per_tar = {}
    for sample in samples:
        name = sample["__url__"].rsplit("/", 1)[-1]
        per_tar[name] = per_tar.get(name, 0) + 1
    assert sizes == per_tar and sum(sizes[t.name] for t in tars) == len(rows)
    manifest = json.loads((out / "capfilt_export.json").read_text())
    assert manifest["samples"] == len(rows) and manifest["capfilt"]["schema_version"] == SCHEMA_VERSION
    # The same kept/ gives the same bytes.
    again = tmp_path / "again"
    export_webdataset([str(kept)], again, SAMPLES_PER_TAR, min_tars=1)
    assert all((again / t.name).read_bytes() == t.read_bytes() for t in tars)


def test_keys_have_no_dot_for_webdataset_to_split_at():
    assert sample_key("part.0001_000000003_web0") == "part_0001_000000003_web0"


def test_what_cannot_be_exported_is_a_clear_error(kept, tmp_path, capsys):
    with pytest.raises(ExportError, match="no image column"):
        export_webdataset([str(kept.parent / "rejected")], tmp_path / "a")
    with pytest.raises(ExportError, match="no Parquet files"):
        export_webdataset([str(tmp_path / "nothing")], tmp_path / "b")
    old = tmp_path / "old"
    old.mkdir()
    table = pq.read_table(kept).drop_columns(["web_text"])
    pq.write_table(table, old / "00000.parquet")
    with pytest.raises(ExportError, match="schema version 3 or later"):
        export_webdataset([str(old)], tmp_path / "c")
    used = tmp_path / "used"
    used.mkdir()
    (used / "00000.tar").write_bytes(b"")
    assert cli.main(["export-dataset", "--from", str(kept), "--out", str(used)]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    with pytest.raises(ExportError, match="at least 1"):
        export_webdataset([str(kept)], tmp_path / "d", samples_per_tar=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_export_shows_its_progress_and_help_shows_only_real_defaults(kept, tmp_path, capsys):
    rows = pq.read_table(kept).num_rows
    assert cli.main(["export-dataset", "--from", str(kept), "--out", str(tmp_path / "wds")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # not a terminal: whole lines
    assert f"export: 0/{rows} samples" in err and f"export: {rows}/{rows} samples, 100%" in err
    assert cli.main(["export-dataset", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: 10000)" in text and "{sample_id}.jpg" in " ".join(text.split())
