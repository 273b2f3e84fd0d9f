"""Rows in key order: a shard's output does not depend on the order in which img2dataset's downloads finished.

img2dataset writes a shard's rows as their downloads finish; the same URL list downloaded twice gives the same rows
in another order. Each test writes one shard in key order and the same rows shuffled, runs both through
``process_shard`` and compares the output files row by row: the same rows, values and ``sample_id``s.
"""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_input_damage import garble
from test_pipeline import jpeg

from capfilt.filter import Filter
from capfilt.images import decode_image
from capfilt.pipelines.layout import FAILED, KEPT, REJECTED, OutputLayout
from capfilt.pipelines.worker_models import Models
from capfilt.pipelines.process import process_shard
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import InputRow, ShardReader, _in_order, key_order, list_shards
from webdataset_shards import write_webdataset_tar

ROWS = 12
K = 2
SHUFFLED = random.Random(0).sample(range(ROWS), ROWS)


@pytest.fixture(scope="module")
def settings(captioner_folder, filter_folder):
    """The threshold between the middle web-text scores, so that both outcomes occur (random weights)."""
    filter_ = Filter.load(filter_folder)
    judged = [r for r in rows() if r["caption"] and r["status"] == "success" and len(r["jpg"]) > 200]
    scores = sorted(s[0].itm for s in filter_.score([decode_image(r["jpg"]) for r in judged],
                                                    [[r["caption"]] for r in judged]))
    threshold = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    return BootstrapSettings(captioner=str(captioner_folder), filter=str(filter_folder), num_captions=K,
                             batch_size=3, threshold=threshold, seed=11, torch_threads=1, decode_threads=2)


@pytest.fixture(scope="module")
def models(settings):
    return Models.load(settings)


def rows() -> list[dict]:
    """Download-shard rows in key order: successes, a 404, bytes that are not an image, a 2x2 image, no web text."""
    out = []
    for i in range(ROWS):
        row = {"key": f"{i:09d}", "url": f"http://127.0.0.1/{i}.jpg", "caption": ["a red circle", "a dog", ""][i % 3],
               "jpg": jpeg((20 * i, 240 - 20 * i, 90), size=(36 + i, 30)), "status": "success", "error_message": None,
               "licence": f"cc-{i}"}
        if i == 4:
            row.update(jpg=None, status="failed_to_download", error_message="HTTP Error 404: Not Found")
        if i == 7:
            row["jpg"] = b"not an image"
        if i == 9:
            row["jpg"] = jpeg((0, 0, 0), size=(2, 2))
        out.append(row)
    return out


def write_parquet(folder, order: list[int], group_rows: int = 4):
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist([rows()[i] for i in order])
    pq.write_table(table, folder / "00000.parquet", row_group_size=group_rows)
    (folder / "00000_stats.json").write_text(json.dumps({"count": ROWS}))
    return folder / "00000.parquet"


def write_tar(folder, order: list[int], sidecar: bool):
    """img2dataset's webdataset layout, the tar's samples and the sidecar's rows both in ``order``."""
    folder.mkdir(parents=True)
    listed = [rows()[i] for i in order]
    write_webdataset_tar(folder / "00000.tar", listed)
    if sidecar:
        pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "jpg"} for r in listed]),
                       folder / "00000.parquet", row_group_size=5)
    (folder / "00000_stats.json").write_text(json.dumps({"count": ROWS}))


def process(folder, models, settings, out) -> tuple[OutputLayout, dict]:
    layout = OutputLayout(str(out))
    layout.claim(settings.provenance())
    run = layout.start_run(local=True)
    (shard,) = list_shards(folder)
    marker = process_shard(shard, models, settings, run)
    run.end_run()
    return layout, marker


def content(layout: OutputLayout) -> dict[str, list[dict]]:
    """Each output file's rows, in the order written."""
    return {kind: pq.read_table(layout.output(kind, "00000")).to_pylist() for kind in (KEPT, REJECTED, FAILED)}


def counts(marker: dict) -> dict:
    return {name: marker[name] for name in ("rows", "images", "failed", "kept", "rejected", "web_missing")}


@pytest.mark.parametrize("layout_", ["parquet", "webdataset with sidecar", "webdataset without sidecar"])
def test_a_shuffled_shard_writes_what_the_shard_in_key_order_writes(models, settings, tmp_path, layout_):
    outputs = {}
    for name, order in (("sorted", list(range(ROWS))), ("shuffled", SHUFFLED)):
        folder = tmp_path / name
        if layout_ == "parquet":
            write_parquet(folder, order)
        else:
            write_tar(folder, order, sidecar=layout_ == "webdataset with sidecar")
        outputs[name] = process(folder, models, settings, tmp_path / f"out-{name}")
    (sorted_layout, sorted_marker), (shuffled_layout, shuffled_marker) = outputs["sorted"], outputs["shuffled"]
    expected, got = content(sorted_layout), content(shuffled_layout)
    assert got == expected
    assert counts(shuffled_marker) == counts(sorted_marker) and not shuffled_marker.get("damaged")
    # The rows are those of the key order: each sample_id's row is the key's place.
    outcomes = {r["sample_id"][len("00000_"):][:9]: r["key"] for kind in expected for r in expected[kind]}
    assert outcomes == {f"{i:09d}": f"{i:09d}" for i in range(ROWS)} or layout_ == "webdataset without sidecar"
    assert {r["key"]: r["stage"] for r in got[FAILED]} == (
        {"000000004": "download", "000000007": "decode", "000000009": "size"} if layout_ != "webdataset without sidecar"
        else {"000000007": "decode", "000000009": "size"})  # no sidecar: the 404 is not in the tar
    assert len(got[KEPT]) and len(got[REJECTED])


def test_the_reader_yields_key_order_and_file_order_on_demand(tmp_path):
    path = write_parquet(tmp_path / "in", SHUFFLED, group_rows=5)
    (shard,) = list_shards(tmp_path / "in")
    ordered = list(ShardReader(shard).rows())
    assert [(r.key, r.index) for r in ordered] == [(f"{i:09d}", i) for i in range(ROWS)]
    in_file = list(ShardReader(shard).file_rows())  # the rows (and indices) of schema versions up to 3
    assert [(r.key, r.index) for r in in_file] == [(f"{i:09d}", at) for at, i in enumerate(SHUFFLED)]
    assert pq.read_table(path).column("key").to_pylist() == [f"{i:09d}" for i in SHUFFLED]


def test_rows_without_a_key_keep_their_place_and_damage_reads_in_key_order(models, settings, tmp_path):
    """Shuffled, in row groups of two: group 1's images and group 3's keys do not read. Group 1's rows fail at
    read under their keys, at their key's place; group 3's rows (file positions 6 and 7) keep those places,
    under keys made from them; the other rows fill the other places in key order."""
    path = write_parquet(tmp_path / "in", SHUFFLED, group_rows=2)
    garble(path, 1, "jpg")
    garble(path, 3, "key")
    layout, marker = process(tmp_path / "in", models, settings, tmp_path / "out")
    out = content(layout)
    keyless = {6, 7}
    places = [p for p in range(ROWS) if p not in keyless]
    keyed = sorted(SHUFFLED[p] for p in places)
    expected_id = {f"{key:09d}": f"00000_{place:09d}" for place, key in zip(places, keyed)}
    failed = {r["key"]: r for r in out[FAILED]}
    for position in keyless:
        made = f"00000_{position:09d}"
        assert failed[made]["sample_id"] == made and failed[made]["stage"] == "read"
        assert "row group 3" in failed[made]["error"]
    for position in (2, 3):  # group 1: the images do not read, the keys do
        key = f"{SHUFFLED[position]:09d}"
        assert failed[key]["stage"] == ("download" if key == "000000004" else "read")
        assert failed[key]["sample_id"] == expected_id[key]
    for row in out[KEPT] + out[REJECTED] + out[FAILED]:
        if row["key"] in expected_id:
            assert row["sample_id"].startswith(expected_id[row["key"]])
    assert marker["rows"] == ROWS and marker["damaged"]["all_rows_accounted"]


def test_rows_out_of_order_are_held_only_until_their_turn():
    """A row finishing late holds back the rows after it only until it comes: the memory a shuffled shard costs
    is the rows read ahead of an earlier key, not the shard."""
    file_order = [0, 1, 3, 4, 5, 2, 6, 7, 8, 9]  # row 2 finished three rows late
    keys = [f"{k:09d}" for k in file_order]
    order = key_order(keys)
    assert order == [0, 1, 5, 2, 3, 4, 6, 7, 8, 9]
    assert key_order(sorted(keys)) is None  # in order already: streamed as it is
    assert key_order([None, "b", None, "a"]) == [0, 3, 2, 1]  # keyless rows keep their place
    pulled, held = 0, []

    def source():
        nonlocal pulled
        for position, key in enumerate(keys):
            pulled += 1
            yield InputRow(key=key, url=None, caption=None, image=None, status="success", index=position)

    out = []
    for row in _in_order(source(), order, "00000"):
        held.append(pulled - len(out) - 1)
        out.append(row)
    assert [(r.key, r.index) for r in out] == [(f"{k:09d}", k) for k in range(10)]
    assert max(held) == 3 and held[-4:] == [0, 0, 0, 0]
