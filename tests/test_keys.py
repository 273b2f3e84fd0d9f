"""Keys: a null key gets a stable one, duplicate keys are counted (within and across shards), sample_id is unique."""

from __future__ import annotations

import tracemalloc
from collections import Counter

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_pipeline import ROWS_PER_SHARD, read, run_pipeline, shard_rows

from capfilt.pipelines.layout import FAILED, KEPT, REJECTED
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import list_shards
from capfilt.pipelines.stats import KEY_HASH_DTYPE, duplicates_across
from capfilt.pipelines.report import read_stats

K = 2


@pytest.fixture(scope="module")
def settings(captioner_folder, filter_folder):
    return BootstrapSettings(captioner=str(captioner_folder), filter=str(filter_folder), num_captions=K,
                             batch_size=4, threshold=0.5, seed=5, torch_threads=1, decode_threads=1)


def places(keys: list) -> dict[int, int]:
    """Each file row's place in key order: a row without a key keeps its own, the others fill the rest by key."""
    keyed = [i for i, key in enumerate(keys) if key is not None]
    ranked = sorted(keyed, key=lambda i: (keys[i], i))
    return {**{i: i for i in range(len(keys))}, **{row: slot for slot, row in zip(keyed, ranked)}}


def test_keys_sample_ids_and_duplicates(settings, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    inputs = {shard: shard_rows(shard) for shard in range(3)}
    inputs[0][1]["key"] = None  # a null key
    inputs[0][3]["key"] = inputs[0][6]["key"] = "twice in 00000"
    inputs[0][7]["key"] = inputs[1][0]["key"] = inputs[1][7]["key"] = "in 00000 and twice in 00001"
    pq.write_table(pa.Table.from_pylist(inputs[0]), folder / "00000.parquet")
    pq.write_table(pa.Table.from_pylist(inputs[1]), folder / "00001.parquet")
    pq.write_table(pa.Table.from_pylist(inputs[2]).drop_columns(["key"]), folder / "00002.parquet")  # no keys
    layout = run_pipeline(list_shards(folder), settings, tmp_path / "out", expected_rows=3 * ROWS_PER_SHARD)

    tables = {kind: read(layout, kind).to_pylist() for kind in (KEPT, REJECTED, FAILED)}
    rows = [r for kind in tables for r in tables[kind]]
    assert len({r["sample_id"] for r in rows}) == len(rows)  # unique per output row
    union = " union all ".join(f"select sample_id from read_parquet('{layout.root}/{kind}/*.parquet')"
                               for kind in (KEPT, REJECTED, FAILED))
    assert duckdb.sql(f"select count(*) = count(distinct sample_id) from ({union})").fetchall() == [(True,)]
    # Every input row is in exactly one outcome, found by its sample_id: failed, or judged with each text once.
    judged = Counter()
    for kind in (KEPT, REJECTED):
        for r in tables[kind]:
            prefix, text = r["sample_id"].rsplit("_", 1)
            assert text == f"{r['source']}{r['source_index']}"
            judged[prefix] += 1
    failed = {r["sample_id"]: r for r in tables[FAILED]}
    assert not set(failed) & set(judged)
    for shard, shard_inputs in inputs.items():
        place = places([row["key"] if shard != 2 else None for row in shard_inputs])
        for i, row in enumerate(shard_inputs):
            sample = f"{shard:05d}_{place[i]:09d}"
            key = row["key"] if shard != 2 and row["key"] is not None else sample  # a stable key from shard and row
            if i in (2, 4, 5):
                assert failed[sample]["key"] == key and failed[sample]["stage"] in ("download", "decode", "size")
            else:
                assert judged[sample] == K + (1 if row["caption"] else 0)
                assert {r["key"] for r in tables[KEPT] + tables[REJECTED] if r["sample_id"].startswith(sample)} \
                    == {key}

    duplicates = read_stats(layout)["duplicate_keys"]
    assert (duplicates["rows"], duplicates["within_shards"], duplicates["across_shards"]) == (3, 2, 1)
    assert {"key": "twice in 00000", "shards": ["00000"]} in duplicates["examples"]
    assert {"key": "in 00000 and twice in 00001", "shards": ["00001"]} in duplicates["examples"]
    assert {"key": "in 00000 and twice in 00001", "shards": ["00000", "00001"]} in duplicates["examples"]
    assert "Duplicate input keys: 3 rows" in (tmp_path / "out" / "report.html").read_text()


def test_duplicates_across_1200_shards_of_10000_keys_in_bounded_memory():
    shards, rows = 1200, 10_000
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 2**63, size=7, dtype=np.uint64)  # keys that two shards hold

    def files():
        for shard in range(shards):
            hashes = rng.integers(0, 2**63, size=rows, dtype=np.uint64)
            if shard in (10, 1100):
                hashes[:7] = shared
            yield f"{shard:05d}", np.sort(hashes).astype(KEY_HASH_DTYPE).tobytes()

    tracemalloc.start()
    try:
        count, examples = duplicates_across(files())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 7
    assert len(examples) == 5 and all(found == ["00010", "01100"] for _, found in examples)
    assert {digest for digest, _ in examples} <= {int(h) for h in shared}
    assert peak < 18 * shards * rows + (16 << 20), f"{peak / 2**20:.0f} MiB"  # two 8-byte arrays per key, a mask
