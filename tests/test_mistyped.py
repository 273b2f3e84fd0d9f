"""Columns of the wrong type fail rows at stage read, naming the column and its type; they never wedge a shard.

A shard whose ``caption`` is an int or a list, or whose ``url`` or ``status`` is an int, used to fail whole as a
retry, again on every rerun. Each test writes a real Parquet file (or a tar) and runs it through
``process_shard``: the shard is done, listed as damaged, every row accounted for.
"""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_key_order import ROWS, content, process, rows

from capfilt.pipelines.layout import FAILED, KEPT, REJECTED
from capfilt.pipelines.worker_models import Models
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import ShardReader, list_shards

K = 1


@pytest.fixture(scope="module")
def settings(captioner_folder, filter_folder):
    return BootstrapSettings(captioner=str(captioner_folder), filter=str(filter_folder), num_captions=K,
                             batch_size=4, threshold=0.5, seed=2, torch_threads=1, decode_threads=1)


@pytest.fixture(scope="module")
def models(settings):
    return Models.load(settings)


def write(folder, table: pa.Table, stats: bool = True):
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "00000.parquet", row_group_size=5)
    if stats:
        (folder / "00000_stats.json").write_text(json.dumps({"count": table.num_rows}))


def with_column(name: str, values: pa.Array) -> pa.Table:
    table = pa.Table.from_pylist(rows())
    return table.set_column(table.schema.get_field_index(name), name, values)


CASES = {
    "caption int": ("caption", pa.array(range(ROWS), pa.int64()), "column caption is int64, not a string"),
    "caption list": ("caption", pa.array([["a", "dog"]] * ROWS, pa.list_(pa.string())),
                     "column caption is list<element: string>, not a string"),  # as read back from Parquet
    "url int": ("url", pa.array(range(ROWS), pa.int64()), "column url is int64, not a string"),
    "status int": ("status", pa.array([200] * ROWS, pa.int32()), "column status is int32, not a string"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stats", [True, False], ids=["with stats", "without stats"])
def test_a_mistyped_column_fails_every_row_at_read_and_the_shard_is_done(models, settings, tmp_path, case, stats):
    column, values, error = CASES[case]
    write(tmp_path / "in", with_column(column, values), stats=stats)
    layout, marker = process(tmp_path / "in", models, settings, tmp_path / "out")  # raises nothing: done
    assert layout.is_done("00000")
    out = content(layout)
    assert not out[KEPT] and not out[REJECTED]
    inputs = {r["key"]: r for r in rows()}
    assert sorted(r["key"] for r in out[FAILED]) == sorted(inputs)
    for row in out[FAILED]:
        given = inputs[row["key"]]
        assert (row["stage"], row["error"]) == ("read", error)
        assert row["sample_id"] == f"00000_{row['key']}"  # the key is the row's place in rows()
        # The mistyped column's value is not written; the row's others are.
        assert row["url"] == (None if column == "url" else given["url"])
        assert row["web_text"] == (None if column == "caption" else given["caption"])
        assert row["status"] == (None if column == "status" else given["status"])
        assert row["licence"] == given["licence"]
    assert marker["failed"]["read"] == ROWS and marker["rows"] == ROWS
    assert marker["damaged"]["errors"] == [f"{error}: every row fails at read"]
    assert marker["damaged"]["all_rows_accounted"]


def test_an_integer_key_column_is_taken_as_decimal_text_in_numeric_order(models, settings, tmp_path):
    table = pa.Table.from_pylist(rows())
    table = table.set_column(0, "key", pa.array([3 * i for i in range(ROWS)], pa.int64()))
    order = [5, 11, 0, 3, 10, 1, 2, 4, 9, 6, 8, 7]
    write(tmp_path / "in", table.take(order))
    (shard,) = list_shards(tmp_path / "in")
    assert [(r.key, r.index) for r in ShardReader(shard).rows()] == [(str(3 * i), i) for i in range(ROWS)]
    layout, marker = process(tmp_path / "in", models, settings, tmp_path / "out")
    out = content(layout)
    assert not marker.get("damaged") and marker["failed"]["read"] == 0
    by_key = {r["key"]: r for r in out[FAILED]}
    assert {key: r["stage"] for key, r in by_key.items()} == {"12": "download", "21": "decode", "27": "size"}
    assert by_key["12"]["sample_id"] == "00000_000000004"
    judged = {r["key"] for r in out[KEPT] + out[REJECTED]}
    assert judged | set(by_key) == {str(3 * i) for i in range(ROWS)}


def test_a_samples_json_with_a_mistyped_url_fails_that_sample(models, settings, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for row in rows():
            if row["status"] != "success":
                continue
            url = 12345 if row["key"] == "000000003" else row["url"]
            for extension, data in (("jpg", row["jpg"]), ("json", json.dumps({"url": url,
                                                                               "caption": row["caption"]}).encode())):
                info = tarfile.TarInfo(f"{row['key']}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    layout, marker = process(folder, models, settings, tmp_path / "out")  # no stats file: still done
    failed = {r["key"]: r for r in content(layout)[FAILED]}
    assert failed["000000003"]["stage"] == "read" and failed["000000003"]["url"] is None
    assert "url in 000000003.json is int, not a string" in failed["000000003"]["error"]
    assert failed["000000003"]["web_text"] == rows()[3]["caption"]
    assert {key: r["stage"] for key, r in failed.items()} == {"000000003": "read", "000000007": "decode",
                                                               "000000009": "size"}
    assert marker["damaged"]["all_rows_accounted"] and layout.is_done("00000")
