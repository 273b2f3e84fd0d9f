"""Hostile input loses nothing: refused URLs, damaged Parquet and tar shards, shards without img2dataset's stats.

Each test reads the output files back and checks the accounting: every input
row is in exactly one of kept/rejected (judged: one row per text) or failed
(with its stage and error), or its shard is listed as damaged.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_pipeline import ROWS_PER_SHARD, read, run_pipeline, shard_rows

from capfilt.pipelines.layout import FAILED, KEPT, REJECTED
from capfilt.columns import INPUT_ERROR, INPUT_STAGE, INPUT_URL
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import list_shards
from capfilt.pipelines.report import read_stats

K = 1


@pytest.fixture(scope="module")
def settings(captioner_folder, filter_folder):
    return BootstrapSettings(captioner=str(captioner_folder), filter=str(filter_folder), num_captions=K,
                             batch_size=4, threshold=0.5, seed=3, torch_threads=1, decode_threads=1)


def texts(row: dict) -> int:
    return K + (1 if row["caption"] else 0)


def test_refused_and_unparsed_rows_fail_at_their_stage(settings, tmp_path):
    rows = shard_rows(0)
    for row in rows:
        row.update({INPUT_ERROR: None, INPUT_STAGE: None, INPUT_URL: None})
    refused = "http://169.254.169.254/latest/meta-data/"
    rows[1].update(url=None, jpg=None, status="failed_to_download", error_message="Invalid URL",
                   **{INPUT_ERROR: "refused: link-local address", INPUT_STAGE: "download", INPUT_URL: refused})
    rows[3].update(url=None, jpg=None, status="failed_to_download", error_message="Invalid URL",
                   **{INPUT_ERROR: "malformed line 4 of urls.tsv", INPUT_STAGE: None})  # an older list: no stage
    rows[7].update(url=None, jpg=None, status="failed_to_download", error_message="Invalid URL",
                   **{INPUT_ERROR: "bytes that are not UTF-8", INPUT_STAGE: "parse"})
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "00000.parquet")
    layout = run_pipeline(list_shards(folder), settings, tmp_path / "out", expected_rows=ROWS_PER_SHARD)
    failed = {r["key"]: r for r in read(layout, FAILED).to_pylist()}
    assert failed["000000001"]["stage"] == "download" and failed["000000001"]["url"] == refused
    assert failed["000000001"]["error"] == "refused: link-local address"
    assert failed["000000003"]["stage"] == "parse" and failed["000000003"]["url"] is None
    assert failed["000000003"]["error"] == "malformed line 4 of urls.tsv"
    assert failed["000000007"]["stage"] == "parse" and failed["000000007"]["error"] == "bytes that are not UTF-8"
    assert not {INPUT_ERROR, INPUT_STAGE, INPUT_URL} & set(read(layout, FAILED).schema.names)  # never passed on
    stats = read_stats(layout)
    assert stats["failed"]["download"] == 2 and stats["failed"]["parse"] == 2  # row 2: img2dataset's 404


# --- damaged shards -------------------------------------------------------------------------------------------

def write_shard(folder, shard: int, rows: list[dict] | None = None, stats: bool = True, group_rows: int = 2):
    """An img2dataset-style Parquet shard of ``group_rows``-row row groups, and its _stats.json."""
    rows = shard_rows(shard) if rows is None else rows
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet", row_group_size=group_rows)
    if stats:
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(rows)}))
    return rows


def garble(path, group: int, column: str) -> None:
    """Overwrite the first page header of one column chunk: that row group's column no longer reads."""
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    chunk = meta.row_group(group).column(names.index(column))
    offset = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 24] = b"\xff" * 24
    path.write_bytes(bytes(data))


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def accounted(layout) -> dict[str, tuple]:
    """Each output row's key -> ('failed', stage, error) or ('judged', texts); no key both or twice failed."""
    found: dict[str, tuple] = {}
    for row in read(layout, FAILED).to_pylist():
        assert row["key"] not in found, f"{row['key']} failed twice"
        found[row["key"]] = ("failed", row["stage"], row["error"])
    judged = Counter(r["key"] for kind in (KEPT, REJECTED) for r in read(layout, kind).to_pylist())
    for key, n in judged.items():
        assert key not in found, f"{key} both judged and failed"
        found[key] = ("judged", n)
    return found


def check_judged(found: dict, rows: list[dict], skip: set[str] = frozenset()) -> None:
    """Rows of an undamaged part: judged with their texts, or failed where shard_rows makes them fail."""
    stages = {2: "download", 4: "decode", 5: "size"}
    for row in rows:
        i = int(row["key"][-4:])  # shard_rows' keys: {shard:05d}{row:04d}
        if row["key"] in skip:
            continue
        if i in stages:
            assert found[row["key"]][:2] == ("failed", stages[i]), row["key"]
        else:
            assert found[row["key"]] == ("judged", texts(row)), row["key"]


def bootstrap_cli(data, out, captioner_folder, filter_folder, *extra) -> int:
    from capfilt import cli

    return cli.main(["bootstrap", "--data", str(data), "--out", str(out), "--captioner", str(captioner_folder),
                     "--filter", str(filter_folder), "-k", str(K), "--batch-size", "4", "--torch-threads", "1",
                     "--decode-threads", "1", "--threshold", "0.5", "--progress-interval", "60", *extra])


def test_damaged_parquet_shards_are_recorded_and_what_reads_is_processed(captioner_folder, filter_folder, tmp_path,
                                                                         capsys):
    folder = tmp_path / "shards"
    inputs = {shard: write_shard(folder, shard) for shard in range(4)}
    truncate(folder / "00001.parquet")  # footer gone: nothing reads
    garble(folder / "00002.parquet", 1, "jpg")  # rows 2-3: the images do not read, the other columns do
    garble(folder / "00003.parquet", 2, "key")  # rows 4-5: not even the keys read
    out = tmp_path / "out"
    assert bootstrap_cli(folder, out, captioner_folder, filter_folder) == 3
    said = capsys.readouterr().err
    assert "input shard 00001 is damaged" in said and "rerunning will not change damaged shards" in said
    assert "rerun the same command to retry" not in said

    layout = run_layout(out)
    found = accounted(layout)
    check_judged(found, inputs[0])
    # 00002: row 2 was a failed download (its status still reads), row 3 failed at read with its own key.
    check_judged(found, inputs[2], skip={"000020003"})
    assert found["000020003"][:2] == ("failed", "read") and "row group 1" in found["000020003"][2]
    # 00003: rows 4 and 5 failed at read under their place in the shard; the rest as usual.
    check_judged(found, inputs[3], skip={"000030004", "000030005"})
    assert found["00003_000000004"][:2] == found["00003_000000005"][:2] == ("failed", "read")
    assert not any(key.startswith("00001") for key in found)
    assert len(found) == 3 * ROWS_PER_SHARD
    assert not (out / "kept" / "00001.parquet").exists()

    stats = read_stats(layout)
    assert stats["failed"]["read"] == 3 and stats["rows"] == 3 * ROWS_PER_SHARD
    assert stats["shards"]["errors"] == [] and stats["shards"]["done"] == 4
    damaged = {d["shard"]: d for d in stats["shards"]["damaged"]}
    assert set(damaged) == {"00001", "00002", "00003"}
    assert damaged["00001"]["input"] == str(folder / "00001.parquet")
    assert damaged["00001"]["rows_read"] == 0 and damaged["00001"]["rows_expected"] == ROWS_PER_SHARD
    assert not damaged["00001"]["all_rows_accounted"] and "magic bytes" in damaged["00001"]["errors"][0]
    assert damaged["00002"]["all_rows_accounted"] and damaged["00002"]["rows_failed_read"] == 1
    assert "row group 1 (rows 2-3)" in damaged["00002"]["errors"][0]
    assert damaged["00003"]["rows_failed_read"] == 2
    report = (out / "report.html").read_text()
    assert "Damaged input shards" in report and str(folder / "00001.parquet") in report

    # A rerun changes nothing and says the same; replacing the file and deleting its marker redoes the shard.
    markers = {p.name: p.read_bytes() for p in (out / ".capfilt" / "done").glob("*.json")}
    assert bootstrap_cli(folder, out, captioner_folder, filter_folder) == 3
    assert {p.name: p.read_bytes() for p in (out / ".capfilt" / "done").glob("*.json")} == markers
    write_shard(folder, 1)
    (out / ".capfilt" / "done" / "00001.json").unlink()
    assert bootstrap_cli(folder, out, captioner_folder, filter_folder) == 3  # 00002 and 00003 are still damaged
    found = accounted(layout)
    check_judged(found, inputs[1])
    assert len(found) == 4 * ROWS_PER_SHARD
    assert {d["shard"] for d in read_stats(layout)["shards"]["damaged"]} == {"00002", "00003"}


def run_layout(out):
    from capfilt.pipelines.layout import OutputLayout

    return OutputLayout(str(out))


def test_a_shard_without_stats_is_processed_or_left_unfinished_never_skipped(captioner_folder, filter_folder,
                                                                             tmp_path, capsys):
    folder = tmp_path / "shards"
    write_shard(folder, 0)
    rows = write_shard(folder, 1, stats=False)  # complete: its download died after writing it
    out = tmp_path / "out"
    assert bootstrap_cli(folder, out, captioner_folder, filter_folder) == 0
    assert "no img2dataset _stats.json (00001)" in capsys.readouterr().err
    found = accounted(run_layout(out))
    check_judged(found, rows)
    assert len(found) == 2 * ROWS_PER_SHARD

    # Cut short without stats: a download still being written. Unfinished (a rerun retries it), not damaged.
    write_shard(folder, 2, stats=False)
    truncate(folder / "00002.parquet")
    assert bootstrap_cli(folder, out, captioner_folder, filter_folder) == 1
    said = capsys.readouterr().err
    assert "shard 00002 is unfinished" in said and "still running" in said
    stats = read_stats(run_layout(out))
    assert stats["shards"]["damaged"] == [] and [e["shard"] for e in stats["shards"]["errors"]] == ["00002"]
    assert not (out / ".capfilt" / "done" / "00002.json").exists() and not list((out / ".capfilt" / "tmp").rglob("*.parquet"))
    rows = write_shard(folder, 2)  # the download finished
    assert bootstrap_cli(folder, out, captioner_folder, filter_folder) == 0
    check_judged(accounted(run_layout(out)), rows)


def write_tar(folder, shard: int, sidecar: bool = True, bad_json: int | None = None) -> tuple[list[dict], list[int]]:
    """img2dataset's webdataset layout; returns the rows and each success's (jpg header) offset in the tar."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, offsets = shard_rows(shard), []
    with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
        for i, row in enumerate(rows):
            if row["status"] != "success":
                continue
            offsets.append(tar.offset)
            meta = b"{not json" if i == bad_json else json.dumps({"url": row["url"]}).encode()
            for extension, data in (("jpg", row["jpg"]), ("txt", row["caption"].encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{row['key']}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if sidecar:
        pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "jpg"} for r in rows]),
                       folder / f"{shard:05d}.parquet")
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(rows)}))
    return rows, offsets


def test_damaged_tars_fail_the_rows_after_the_break(settings, tmp_path):
    folder = tmp_path / "wds"
    # 00000, with sidecar, cut in the middle of row 5's image: rows 0-4 read, the successes after fail at read.
    rows0, offsets0 = write_tar(folder, 0)
    truncate(folder / "00000.tar", keep=(offsets0[4] + 700) / (folder / "00000.tar").stat().st_size)
    # 00001, without sidecar, a garbled header before row 6 (tarfile alone would just stop there).
    rows1, offsets1 = write_tar(folder, 1, sidecar=False)
    data = bytearray((folder / "00001.tar").read_bytes())
    data[offsets1[5]:offsets1[5] + 8] = b"garbage!"
    (folder / "00001.tar").write_bytes(bytes(data))
    # 00002, with sidecar, whole, but row 3's .json is not JSON (read through the sidecar: its JSON is not used).
    rows2, _ = write_tar(folder, 2)
    # 00003, without sidecar, row 3's .json is not JSON.
    rows3, _ = write_tar(folder, 3, sidecar=False, bad_json=3)
    (folder / "00002_stats.json").unlink()  # processed anyway (whole), with a warning

    shards = list_shards(folder)
    assert [(s.shard_id, s.sidecar is not None, s.stats_missing) for s in shards] == [
        ("00000", True, False), ("00001", False, False), ("00002", True, True), ("00003", False, False)]
    layout = run_pipeline(shards, settings, tmp_path / "out")
    found = accounted(layout)
    check_judged(found, rows0[:5])
    for row in rows0[5:]:
        stage = "download" if row["status"] != "success" else "read"
        assert found[row["key"]][:2] == ("failed", stage)
    assert "the tar breaks before this sample" in found["000000006"][2]
    successes1 = [r for r in rows1 if r["status"] == "success"]
    check_judged(found, [r for r in successes1[:4] if r["key"] != "000010004"])
    assert found["000010004"][:2] == ("failed", "decode")
    assert not any(r["key"] in found for r in successes1[4:])  # sample 5's is the last before the garbled header
    check_judged(found, rows2)
    assert found["000030003"][:2] == ("failed", "read") and "JSONDecodeError" in found["000030003"][2]

    stats = read_stats(layout)
    damaged = {d["shard"]: d for d in stats["shards"]["damaged"]}
    assert set(damaged) == {"00000", "00001", "00003"}
    assert damaged["00000"]["all_rows_accounted"] and "unexpected end of data" in damaged["00000"]["errors"][0]
    assert not damaged["00001"]["all_rows_accounted"] and damaged["00001"]["rows_read"] == 4
    assert "not a tar header" in damaged["00001"]["errors"][0] and damaged["00001"]["rows_expected"] == 8
    assert damaged["00003"]["all_rows_accounted"] and damaged["00003"]["rows_failed_read"] == 1
    assert stats["rows"] == sum(m["rows"] for m in layout.read_markers())


def test_a_storage_error_is_retried_not_recorded_as_damage(settings, tmp_path, monkeypatch):
    from capfilt.pipelines import shards as shards_module

    folder = tmp_path / "in"
    rows = write_shard(folder, 0)
    open_ = shards_module.FileSystems.open

    class Flaky:
        """A file whose reads fail after its footer was read, like a connection that drops."""

        def __init__(self, f):
            self.f, self.reads = f, 0

        def read(self, *args):
            self.reads += 1
            if self.reads > 2:
                raise ConnectionResetError("connection reset by peer")
            return self.f.read(*args)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(shards_module.FileSystems, "open", staticmethod(lambda path: Flaky(open_(path))))
    out = tmp_path / "out"
    layout = run_pipeline(list_shards(folder), settings, out)
    stats = read_stats(layout)
    assert stats["shards"]["damaged"] == [] and not layout.is_done("00000")
    assert "ConnectionResetError" in stats["shards"]["errors"][0]["error"]
    monkeypatch.undo()
    layout = run_pipeline(list_shards(folder), settings, out)  # the storage is back: the rerun does the shard
    check_judged(accounted(layout), rows)
    assert read_stats(layout)["shards"]["errors"] == []


def test_the_report_escapes_damage_and_keys():
    from capfilt.pipelines.report import _damaged_section, _duplicates_paragraph

    damaged = _damaged_section([{"shard": "<b>s</b>", "input": "/data/<script>x</script>.parquet", "rows_read": 0,
                                 "rows_failed_read": 0, "errors": ["<img src=x onerror=alert(1)>"],
                                 "more_errors": 0, "all_rows_accounted": False, "rows_expected": None}])
    keys = _duplicates_paragraph({"rows": 1, "within_shards": 1, "across_shards": 0,
                                  "examples": [{"key": "<script>k</script>", "shards": ["<i>0</i>"]}]})
    for html in (damaged, keys):
        assert "<script>" not in html and "<img" not in html and "<i>" not in html and "<b>s" not in html
    assert "&lt;script&gt;x&lt;/script&gt;" in damaged and "&lt;script&gt;k" in keys


def write_sparse_tar(path, rows: list[dict], huge: str, size: int = 1 << 30) -> None:
    """A webdataset tar whose member ``huge`` claims ``size`` bytes of data that are a hole in the file: a few
    kilobytes on disk, ``size`` bytes to anything that reads the member."""
    with open(path, "wb") as f:
        for row in rows:
            if row["status"] != "success":
                continue
            for extension, data in (("jpg", row["jpg"]), ("txt", row["caption"].encode())):
                info = tarfile.TarInfo(f"{row['key']}.{extension}")
                info.size = size if info.name == huge else len(data)
                f.write(info.tobuf(tarfile.USTAR_FORMAT))
                if info.name == huge:
                    f.seek(size, io.SEEK_CUR)  # a multiple of 512: no padding
                else:
                    f.write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        f.write(b"\0" * 2 * tarfile.BLOCKSIZE)  # end of archive


# The child's peak RSS: /proc's VmHWM, the peak of its own memory since exec. Linux's ru_maxrss also holds the
# peak of the process it was forked from (exec keeps it), here pytest's, which can be above a gigabyte itself.
READ_IN_CHILD = """
import json, re, resource, sys
from capfilt.pipelines.shards import ShardReader, list_shards
(shard,) = list_shards(sys.argv[1])
reader = ShardReader(shard)
rows = [(r.key, r.input_stage, r.input_error, len(r.image or b"")) for r in reader.rows()]
try:
    with open("/proc/self/status") as status:
        peak = int(re.search(r"VmHWM:\\s*(\\d+) kB", status.read()).group(1))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": rows, "damage": reader.damage, "unfinished": reader.unfinished_damage,
                  "max_rss_kib": peak}))
"""


def test_a_huge_tar_member_fails_its_sample_unread(settings, tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "wds"
    folder.mkdir()
    rows = shard_rows(0)
    write_sparse_tar(folder / "00000.tar", rows, huge="000000003.jpg")
    assert (folder / "00000.tar").stat().st_blocks * 512 < 1 << 20  # sparse: the gigabyte is a hole
    done = subprocess.run([sys.executable, "-c", READ_IN_CHILD, str(folder)], capture_output=True, text=True,
                          check=True, timeout=300)
    result = json.loads(done.stdout.splitlines()[-1])
    read = {key: (stage, error, size) for key, stage, error, size in result["rows"]}
    assert read["000000003"][:2] == ("read", f"sample 000000003: member 000000003.jpg is {1 << 30} bytes, over the "
                                             f"{64 << 20}-byte limit for .jpg members")
    assert read["000000003"][2] == 0
    assert [key for key, (stage, _, _) in read.items() if stage] == ["000000003"]  # the tar read on after it
    assert read["000000006"][2] == len(rows[6]["jpg"])
    assert result["unfinished"] == 0 and "000000003.jpg" in result["damage"][0]
    assert result["max_rss_kib"] < (1 << 30) // 1024, f"peak RSS {result['max_rss_kib'] // 1024} MiB"

    layout = run_pipeline(list_shards(folder), settings, tmp_path / "out")
    found = accounted(layout)
    assert found["000000003"][:2] == ("failed", "read") and "over the" in found["000000003"][2]
    check_judged(found, [r for r in rows if r["status"] == "success"], skip={"000000003"})
    assert layout.is_done("00000")


@pytest.mark.parametrize("seekable", [True, False], ids=["sought past", "read through"])
def test_tar_members_over_their_limit_are_skipped_in_both_tar_modes(tmp_path, monkeypatch, seekable):
    from capfilt.pipelines import shards as shards_module

    monkeypatch.setattr(shards_module, "MAX_IMAGE_MEMBER_BYTES", 640)
    monkeypatch.setattr(shards_module, "MAX_TEXT_MEMBER_BYTES", 10)
    rows = shard_rows(0)
    write_sparse_tar(tmp_path / "s.tar", rows, huge="000000001.jpg", size=4096)
    with open(tmp_path / "s.tar", "rb") as f:
        data = f.read()

    class Stream(io.BytesIO):
        def seekable(self):
            return seekable

    samples = list(shards_module._tar_samples(shards_module._Storage(Stream(data))))
    by_key = {s.key: s for s in samples}
    successes = [r for r in rows if r["status"] == "success"]
    assert list(by_key) == [r["key"] for r in successes]
    for row in successes:
        sample, large = by_key[row["key"]], []
        if row["key"] == "000000001":
            large.append("member 000000001.jpg is 4096 bytes, over the 640-byte limit for .jpg members")
        elif len(row["jpg"]) > 640:
            large.append(f"member {row['key']}.jpg is {len(row['jpg'])} bytes, over the 640-byte limit for .jpg "
                         "members")
        else:
            assert sample.members["jpg"] == row["jpg"]
        if len(row["caption"]) > 10:
            large.append(f"member {row['key']}.txt is {len(row['caption'])} bytes, over the 10-byte limit for .txt "
                         "members")
        else:
            assert sample.members["txt"] == row["caption"].encode()
        assert sample.too_large == large
