"""Input paths are literal where they exist: folders named ``a[1]`` or ``b*c`` hold shards like any other."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_pipeline import shard_rows

from capfilt.pipelines.shards import ShardError, ShardReader, list_shards


def write(folder, shard: int, tar: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = shard_rows(shard)
    if tar:
        import io
        import tarfile

        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for row in rows[:2]:
                info = tarfile.TarInfo(f"{row['key']}.jpg")
                info.size = len(row["jpg"])
                archive.addfile(info, io.BytesIO(row["jpg"]))
        rows = [{k: v for k, v in r.items() if k != "jpg"} for r in rows[:2]]
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(rows)}))


@pytest.fixture
def folders(tmp_path):
    write(tmp_path / "a[1]", 0)
    write(tmp_path / "a1", 1)  # what a[1] means as a glob: never listed for the folder a[1]
    write(tmp_path / "b*c", 2, tar=True)
    write(tmp_path / "bxc", 3)  # what b*c means as a glob
    write(tmp_path / "q?", 4)
    return tmp_path


def ids(shards) -> list[str]:
    return [s.shard_id for s in shards]


def test_folders_with_wildcard_characters_are_literal(folders):
    (shard,) = list_shards(folders / "a[1]")
    assert (shard.shard_id, shard.path, shard.download_stats) == (
        "00000", str(folders / "a[1]" / "00000.parquet"), str(folders / "a[1]" / "00000_stats.json"))
    assert len(list(ShardReader(shard).rows())) == 8
    (tar,) = list_shards(str(folders / "b*c") + "/")
    assert (tar.format, tar.sidecar) == ("webdataset", str(folders / "b*c" / "00002.parquet"))
    assert [r.key for r in ShardReader(tar).rows() if r.image] == ["000020000", "000020001"]
    assert ids(list_shards(folders / "q?")) == ["00004"]
    # Files in them, given one by one, are literal too.
    assert ids(list_shards([folders / "a[1]" / "00000.parquet", folders / "b*c" / "00002.tar"])) == ["00000", "00002"]


def test_a_glob_still_matches_and_its_existing_folder_part_is_literal(folders):
    assert ids(list_shards(str(folders / "a[1]" / "*.parquet"))) == ["00000"]  # the folder a[1], not a1
    assert ids(list_shards(str(folders / "a[1]" / "0000[0-9].parquet"))) == ["00000"]
    assert ids(list_shards(str(folders / "b*c" / "*.tar"))) == ["00002"]
    assert ids(list_shards(str(folders / "a?" / "*.parquet"))) == ["00001"]  # no folder a?: a glob over folders
    assert ids(list_shards(str(folders / "bx*" / "0000?.parquet"))) == ["00003"]
    for nothing in ("a[2]/*.parquet", "a[1]/00009.parquet"):
        with pytest.raises(ShardError, match="no input shards"):
            list_shards(str(folders / nothing))
    with pytest.raises(ShardError, match="no such input"):
        list_shards(folders / "a1" / "00009.parquet")
