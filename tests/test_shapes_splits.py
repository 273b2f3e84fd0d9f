"""Splits: determinism per seed, iteration, Parquet shards and the CLI (docs/shapes.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest

from capfilt.shapes import (
    RenderConfig,
    WorldConfig,
    is_correct,
    iter_split,
    make_sample,
    read_split,
    scene_from_json,
    write_split,
)
from capfilt.shapes.__main__ import main

COLUMNS = ["key", "jpg", "caption", "url", "width", "height", "status", "error_message", "kind", "scene"]


def test_same_seed_same_bytes_and_different_seeds_differ():
    first = [(s.image_bytes, s.text, s.kind, s.scene) for s in iter_split("web", 20, seed=3)]
    again = [(s.image_bytes, s.text, s.kind, s.scene) for s in iter_split("web", 20, seed=3)]
    assert first == again
    other_seed = [s.image_bytes for s in iter_split("web", 20, seed=4)]
    assert all(a[0] != b for a, b in zip(first, other_seed))
    other_split = [s.image_bytes for s in iter_split("human", 20, seed=3)]
    assert all(a[0] != b for a, b in zip(first, other_split))
    # a sample does not depend on where iteration starts
    assert [s.image_bytes for s in iter_split("web", 5, seed=3, start=15)] == [f[0] for f in first[15:]]


def test_mixture_changes_texts_not_images():
    clean_only = WorldConfig(mixture={"clean": 1.0})
    for index in range(10):
        noisy, clean = make_sample("web", 5, index), make_sample("web", 5, index, clean_only)
        assert noisy.image_bytes == clean.image_bytes and noisy.scene == clean.scene
        assert clean.kind == "clean" and is_correct(clean.text, clean.scene)


def test_human_and_test_are_clean_and_web_is_noisy():
    for split in ("human", "test"):
        for s in iter_split(split, 30, seed=1):
            assert s.kind == "clean" and is_correct(s.text, s.scene)
            assert s.image.size == (64, 64)
    web = list(iter_split("web", 120, seed=1))
    assert {s.kind for s in web} == {"clean", "mismatch", "partial", "alt"}
    for s in web:
        assert is_correct(s.text, s.scene) == (s.kind == "clean")
    with pytest.raises(ValueError):
        make_sample("train", 1, 0)


def test_parquet_shards_read_back(tmp_path):
    out = tmp_path / "web"
    paths = write_split("web", 25, seed=2, out=out, shard_size=10)
    assert [p.name for p in paths] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"0000{i}.parquet" for i in range(3)] + [f"0000{i}_stats.json" for i in range(3)]
    )
    expected = list(iter_split("web", 25, seed=2))
    rows = []
    for shard, (path, count) in enumerate(zip(paths, (10, 10, 5))):
        table = pq.read_table(path)
        assert table.column_names == COLUMNS and table.num_rows == count
        stats = json.loads((out / f"0000{shard}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == count
        assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
        assert sum(stats["kinds"].values()) == count
        rows += table.to_pylist()
    assert rows[12]["key"] == "000010002" and rows[12]["url"] == "shapes://web/000010002"
    assert len({r["key"] for r in rows}) == 25
    for row, sample in zip(rows, expected):
        assert row["jpg"] == sample.image_bytes and row["jpg"][:2] == b"\xff\xd8"
        assert row["caption"] == sample.text and row["kind"] == sample.kind
        assert (row["width"], row["height"], row["status"], row["error_message"]) == (64, 64, "success", None)
        scene = scene_from_json(row["scene"])
        assert scene == sample.scene
        assert is_correct(row["caption"], scene) == (row["kind"] == "clean")
    assert [r["scene"] for r in read_split(out)] == [s.scene for s in expected]


def test_written_bytes_do_not_depend_on_sharding_or_processes(tmp_path):
    write_split("test", 12, seed=9, out=tmp_path / "a", shard_size=12)
    write_split("test", 12, seed=9, out=tmp_path / "b", shard_size=5, processes=2)
    write_split("test", 12, seed=9, out=tmp_path / "c", shard_size=12)
    images = {name: [r["jpg"] for r in read_split(tmp_path / name)] for name in "abc"}
    assert images["a"] == images["b"] == images["c"]
    assert (tmp_path / "a" / "00000.parquet").read_bytes() == (tmp_path / "c" / "00000.parquet").read_bytes()


def test_existing_shards_need_overwrite(tmp_path):
    write_split("human", 6, seed=1, out=tmp_path, shard_size=2)
    with pytest.raises(FileExistsError):
        write_split("human", 2, seed=1, out=tmp_path, shard_size=2)
    write_split("human", 2, seed=1, out=tmp_path, shard_size=2, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["00000.parquet"]  # no stale shards


def test_png_split_names_its_column_png(tmp_path):
    write_split("test", 3, seed=1, out=tmp_path, config=WorldConfig(render=RenderConfig(image_formats=("png",))))
    table = pq.read_table(tmp_path / "00000.parquet")
    assert "png" in table.column_names and "jpg" not in table.column_names
    assert table.column("png")[0].as_py()[:4] == b"\x89PNG"


def test_cli_writes_a_split(tmp_path, capsys):
    args = ["write", "--split", "web", "--n", "7", "--seed", "1", "--out", str(tmp_path), "--shard-size", "3"]
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    kinds = Counter(r["kind"] for r in read_split(tmp_path))
    assert sum(kinds.values()) == 7
    assert "wrote 7 web pairs" in capsys.readouterr().out


def test_python_dash_m_entry_point(tmp_path):
    command = [sys.executable, "-m", "capfilt.shapes"]
    args = ["write", "--split", "test", "--n", "2", "--seed", "0", "--out", str(tmp_path)]
    done = subprocess.run(command + args, capture_output=True, text=True, check=True)
    assert "wrote 2 test pairs" in done.stdout
    assert pq.read_table(tmp_path / "00000.parquet").num_rows == 2
    vocab = subprocess.run(command + ["vocab"], capture_output=True, text=True, check=True)
    assert vocab.stdout.split()[:2] == ["a", "small"]
