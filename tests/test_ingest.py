"""What DATA names, how URL lists are read and rewritten, and how input shards are found (no network)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.ingest import datasets, named, url_list
from capfilt.ingest.datasets import resolve
from capfilt.ingest.url_list import Columns, DatasetError, DatasetNotAvailableError, UrlList, write_url_list
from capfilt.columns import INPUT_COLUMNS, INPUT_ERROR, INPUT_STAGE, INPUT_URL
from capfilt.pipelines.shards import ShardError, ShardReader, list_shards


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def canonical(source, tmp_path, extra=()) -> list[dict]:
    assert isinstance(source, datasets.UrlListInput)
    target = tmp_path / "canonical.parquet"
    write_url_list(source.url_list, target, extra)
    rows = pq.read_table(target).to_pylist()
    for column in INPUT_COLUMNS:  # every line parsed, no URL refused
        assert [row.pop(column) for row in rows] == [None] * len(rows)
    return rows


def ok(**row) -> dict:
    """A canonical row that parsed and was not refused."""
    return {**row, INPUT_ERROR: None, INPUT_STAGE: None, INPUT_URL: None}


def bad(stage: str, error: str, capfilt_url: str | None = None, **row) -> dict:
    """A canonical row that fails before the download (``parse``) or instead of it (``download``)."""
    return {**row, INPUT_ERROR: error, INPUT_STAGE: stage, INPUT_URL: capfilt_url}


def test_demo_and_unknown_names():
    assert isinstance(resolve("demo"), datasets.DemoInput)
    with pytest.raises(DatasetError, match="neither a named dataset"):
        resolve("no-such-dataset")


@pytest.mark.parametrize("name", sorted(named.NAMED))
def test_named_dataset_offline_says_where_to_put_the_file(name, tmp_path):
    spec = named.NAMED[name]
    with pytest.raises(DatasetNotAvailableError) as error:
        resolve(name, cache=tmp_path, fetch=False)
    message = str(error.value)
    assert str(tmp_path / name) in message and spec.files[0][0] in message
    assert "DATA=/path/to/file" in message


def test_offline_environment_turns_fetching_off(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPFILT_OFFLINE", "1")
    with pytest.raises(DatasetNotAvailableError, match="CAPFILT_OFFLINE"):
        resolve("cc12m", cache=tmp_path)


def test_cc12m_and_cc3m_column_orders(tmp_path):
    (tmp_path / "cc12m").mkdir()
    (tmp_path / "cc12m" / "cc12m.tsv").write_text(
        "https://a.example/1.jpg\ta dog on a sofa\nhttps://a.example/2.jpg\t\"quoted\" caption\n")
    (tmp_path / "cc3m").mkdir()
    (tmp_path / "cc3m" / "GCC-training.tsv").write_text("a cat\thttps://b.example/1.jpg\n")
    assert canonical(resolve("cc12m", cache=tmp_path), tmp_path) == [
        {"url": "https://a.example/1.jpg", "caption": "a dog on a sofa"},
        {"url": "https://a.example/2.jpg", "caption": '"quoted" caption'},
    ]
    assert canonical(resolve("cc3m", cache=tmp_path), tmp_path) == [
        {"url": "https://b.example/1.jpg", "caption": "a cat"}]


def test_sbu_is_a_json_object_of_lists(tmp_path):
    (tmp_path / "sbu").mkdir()
    (tmp_path / "sbu" / "sbu-captions-all.json").write_text(json.dumps(
        {"image_urls": ["http://c.example/1.jpg", "http://c.example/2.jpg"], "captions": ["one", "two"],
         "user_ids": ["u1", "u2"]}))
    rows = canonical(resolve("sbu", cache=tmp_path), tmp_path)
    assert rows == [{"url": "http://c.example/1.jpg", "caption": "one"},
                    {"url": "http://c.example/2.jpg", "caption": "two"}]


@pytest.mark.parametrize(
    "name, content",
    [
        ("list.tsv", "url\tcaption\nhttp://d.example/1.jpg\tfirst\nhttp://d.example/2.jpg\tsecond\n"),
        ("list.csv", 'image_url,caption\nhttp://d.example/1.jpg,first\nhttp://d.example/2.jpg,"second"\n'),
        ("list.jsonl", '{"url": "http://d.example/1.jpg", "caption": "first"}\n'
                       '{"url": "http://d.example/2.jpg", "caption": "second"}\n'),
        ("list.json", json.dumps([{"url": "http://d.example/1.jpg", "caption": "first"},
                                  {"url": "http://d.example/2.jpg", "caption": "second"}])),
    ],
)
def test_local_url_lists(name, content, tmp_path):
    path = tmp_path / name
    path.write_text(content)
    assert canonical(resolve(str(path)), tmp_path) == [
        {"url": "http://d.example/1.jpg", "caption": "first"},
        {"url": "http://d.example/2.jpg", "caption": "second"},
    ]


def test_gzipped_headerless_tsv_and_plain_url_list(tmp_path):
    with gzip.open(tmp_path / "list.tsv.gz", "wt") as f:
        f.write("http://e.example/1.jpg\tone\n")
    assert canonical(resolve(str(tmp_path / "list.tsv.gz")), tmp_path) == [
        {"url": "http://e.example/1.jpg", "caption": "one"}]
    (tmp_path / "urls.txt").write_text("http://e.example/1.jpg\nhttp://e.example/2.jpg\n")
    assert canonical(resolve(str(tmp_path / "urls.txt")), tmp_path) == [
        {"url": "http://e.example/1.jpg", "caption": None}, {"url": "http://e.example/2.jpg", "caption": None}]


def test_rows_without_url_and_malformed_lines_are_kept(tmp_path):
    """A row without URL goes on to fail at download; a line that does not parse is kept with its reason."""
    path = tmp_path / "list.tsv"
    path.write_text("http://f.example/1.jpg\tok\n\tno url\n\nhttp://f.example/2.jpg\ttoo\tmany\tfields\n"
                    "http://f.example/3.jpg\nhttp://f.example/4.jpg\tlast\n")
    target = tmp_path / "out.parquet"
    summary = write_url_list(resolve(str(path)).url_list, target)
    assert summary == {"rows": 6, "without_url": 2, "malformed": 2, "refused": 0}
    rows = pq.read_table(target).to_pylist()
    assert rows == [
        ok(url="http://f.example/1.jpg", caption="ok"),
        ok(url="", caption="no url"),  # not refused: img2dataset fails it at download
        ok(url="", caption=""),  # the empty line 3: a row too, so that lines keep their numbers
        bad("parse", "malformed line 4 of list.tsv: expected 2 fields, got 4",
            url=None, caption="http://f.example/2.jpg\ttoo\tmany\tfields"),
        bad("parse", "malformed line 5 of list.tsv: expected 2 fields, got 1",
            url=None, caption="http://f.example/3.jpg"),
        ok(url="http://f.example/4.jpg", caption="last"),
    ]
    # The same list writes the same rows in the same order (img2dataset's keys are positions in it).
    write_url_list(resolve(str(path)).url_list, tmp_path / "again.parquet")
    assert pq.read_table(tmp_path / "again.parquet").to_pylist() == rows
    # With a header, the header is line 1; kept columns are null on a malformed row.
    csv = tmp_path / "list.csv"
    csv.write_text('url,caption,license\nhttp://f.example/1.jpg,"a, b",cc-by\nhttp://f.example/2.jpg,c,d,e\n')
    write_url_list(resolve(str(csv)).url_list, tmp_path / "csv.parquet", extra=("license",))
    assert pq.read_table(tmp_path / "csv.parquet").to_pylist()[1] == bad(
        "parse", "malformed line 3 of list.csv: expected 3 fields, got 4",
        url=None, caption="http://f.example/2.jpg,c,d,e", license=None)


def test_malformed_lines_keep_their_place_across_blocks(tmp_path, monkeypatch):
    """The canonical list is the file's rows in the file's order, however the parser splits it into blocks."""
    monkeypatch.setattr(url_list, "CSV_BLOCK_BYTES", 256)  # ~8 lines a block
    lines = [f"http://i.example/{i}.jpg\tcaption {i}" for i in range(120)]
    for i in (1, 2, 3, 30, 31, 64, 118, 119):  # runs of bad lines, at block edges too, and at the end
        lines[i] = f"http://i.example/{i}.jpg\tcaption\t{i}"
    path = tmp_path / "list.tsv"
    path.write_text("".join(line + "\n" for line in lines))
    summary = write_url_list(resolve(str(path)).url_list, tmp_path / "out.parquet")
    assert summary == {"rows": 120, "without_url": 0, "malformed": 8, "refused": 0}
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [row["caption"] if row[INPUT_ERROR] else f"{row['url']}\t{row['caption']}" for row in rows] == lines
    assert [row[INPUT_ERROR].split(":")[0] for row in rows if row[INPUT_ERROR]] == [
        f"malformed line {i + 1} of list.tsv" for i in (1, 2, 3, 30, 31, 64, 118, 119)]


def test_laion_style_parquet_with_kept_columns(tmp_path):
    folder = tmp_path / "laion"
    folder.mkdir()
    pq.write_table(pa.table({"URL": ["http://g.example/1.jpg"], "TEXT": ["a tree"], "NSFW": ["UNLIKELY"],
                             "similarity": [0.31]}), folder / "part-00000.parquet")
    source = resolve(str(folder))
    assert source.url_list.url_col == "URL" and source.url_list.caption_col == "TEXT"
    assert canonical(source, tmp_path, extra=("NSFW", "similarity")) == [
        {"url": "http://g.example/1.jpg", "caption": "a tree", "NSFW": "UNLIKELY", "similarity": 0.31}]
    with pytest.raises(DatasetError, match="no column"):
        canonical(resolve(str(folder)), tmp_path, extra=("LICENSE",))


def test_column_overrides(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("link_to_image,alt_text\nhttp://h.example/1.jpg,hello\n")
    with pytest.raises(DatasetError, match="--url-col"):
        resolve(str(path))
    source = resolve(str(path), columns=Columns(url="link_to_image", caption="alt_text"))
    assert canonical(source, tmp_path) == [{"url": "http://h.example/1.jpg", "caption": "hello"}]


def test_image_shards_are_taken_as_they_are(tmp_path):
    pq.write_table(pa.table({"key": ["0"], "jpg": [jpeg()], "caption": ["x"]}), tmp_path / "00000.parquet")
    assert resolve(str(tmp_path)) == datasets.ShardsInput(str(tmp_path))
    assert resolve(str(tmp_path / "00000.parquet")) == datasets.ShardsInput(str(tmp_path / "00000.parquet"))
    wds = tmp_path / "wds"
    wds.mkdir()
    with tarfile.open(wds / "00000.tar", "w") as tar:
        data = jpeg()
        info = tarfile.TarInfo("000000000.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert resolve(str(wds)) == datasets.ShardsInput(str(wds))
    rows = list(ShardReader(list_shards(wds)[0]).rows())
    assert [(r.key, r.status, r.image == data) for r in rows] == [("000000000", "success", True)]


def test_img2dataset_shards_without_stats_are_listed_and_flagged_never_left_out(tmp_path):
    for shard in ("00000", "00001"):
        pq.write_table(pa.table({"key": [shard], "jpg": [jpeg()]}), tmp_path / f"{shard}.parquet")
    (tmp_path / "00000_stats.json").write_text("{}")
    assert [(s.shard_id, s.stats_missing) for s in list_shards(tmp_path)] == [("00000", False), ("00001", True)]


def test_shard_errors(tmp_path):
    with pytest.raises(ShardError, match="no input shards"):
        list_shards(tmp_path)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        pq.write_table(pa.table({"key": ["0"], "jpg": [jpeg()]}), tmp_path / folder / "00000.parquet")
    with pytest.raises(ShardError, match="share the id"):
        list_shards([tmp_path / "a", tmp_path / "b"])
    pq.write_table(pa.table({"url": ["http://x.example/1.jpg"]}), tmp_path / "urls.parquet")
    with pytest.raises(ShardError, match="URL list"):
        ShardReader(list_shards(tmp_path / "urls.parquet")[0])


def test_an_odd_first_line_does_not_set_a_headerless_lists_width(tmp_path):
    """A headerless list's columns are counted over its first lines, not read off the first one alone: an
    extra tab in the first caption makes that line malformed, not every line after it."""
    lines = ["http://j.example/0.jpg\ta caption\twith a tab", *(f"http://j.example/{i}.jpg\tcaption {i}"
                                                                 for i in range(1, 6))]
    path = tmp_path / "list.tsv"
    path.write_text("".join(line + "\n" for line in lines))
    summary = write_url_list(resolve(str(path)).url_list, tmp_path / "out.parquet")
    assert summary == {"rows": 6, "without_url": 0, "malformed": 1, "refused": 0}
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert rows[0] == bad("parse", "malformed line 1 of list.tsv: expected 2 fields, got 3", url=None, caption=lines[0])
    assert [(row["url"], row["caption"]) for row in rows[1:]] == [
        (f"http://j.example/{i}.jpg", f"caption {i}") for i in range(1, 6)]
    # A quoted CSV field may hold the delimiter: it is one column, not two.
    csv = tmp_path / "list.csv"
    csv.write_text('http://j.example/1.jpg,"a, b"\nhttp://j.example/2.jpg,c\n')
    write_url_list(resolve(str(csv)).url_list, tmp_path / "csv.parquet")
    assert pq.read_table(tmp_path / "csv.parquet").to_pylist() == [
        ok(url="http://j.example/1.jpg", caption="a, b"), ok(url="http://j.example/2.jpg", caption="c")]


@pytest.mark.parametrize("fmt", ["tsv", "csv"])
def test_a_line_that_is_not_utf8_fails_alone_at_parse(fmt, tmp_path, monkeypatch):
    """One bad byte (here Latin-1's é) fails its own line, at stage parse, and the list goes on."""
    monkeypatch.setattr(url_list, "CSV_BLOCK_BYTES", 256)  # several blocks: line numbers hold across them
    sep = "\t" if fmt == "tsv" else ","
    lines = [f"http://u.example/{i}.jpg{sep}caption {i}".encode() for i in range(40)]
    lines[7] = f"http://u.example/7.jpg{sep}caf".encode() + b"\xe9 au lait"
    lines[31] = b"http://u.example/\xff31.jpg" + f"{sep}caption 31".encode()
    path = tmp_path / f"list.{fmt}"
    path.write_bytes(b"url" + sep.encode() + b"caption\n" + b"".join(line + b"\n" for line in lines))
    summary = write_url_list(resolve(str(path)).url_list, tmp_path / "out.parquet")
    assert summary == {"rows": 40, "without_url": 0, "malformed": 2, "refused": 0}
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["url"] for r in rows if r[INPUT_ERROR] is None] == [
        f"http://u.example/{i}.jpg" for i in range(40) if i not in (7, 31)]
    assert rows[7] == bad("parse", f"line 9 of list.{fmt} is not UTF-8: byte 0xe9 in column 'caption'",
                          url=None, caption=f"http://u.example/7.jpg{sep}caf\ufffd au lait")
    assert rows[31][INPUT_ERROR] == f"line 33 of list.{fmt} is not UTF-8: byte 0xff in column 'url'"
    assert rows[31]["url"] is None and rows[8]["caption"] == "caption 8"


HOSTILE_LINES = [  # (url, reason without the flag or None, reason with --allow-private-addresses or None)
    ("https://k.example/1.jpg", None, None),
    ("file:///etc/passwd", "refused: scheme 'file'", "refused: scheme 'file'"),
    ("ftp://k.example/2.jpg", "refused: scheme 'ftp'", "refused: scheme 'ftp'"),
    ("data:image/png;base64,iVBORw0KGgo=", "refused: scheme 'data'", "refused: scheme 'data'"),
    ("http://127.0.0.1:8000/3.jpg", "refused: 127.0.0.1 is a loopback address", None),
    ("http://169.254.169.254/latest/meta-data/", "refused: 169.254.169.254 is a cloud metadata address",
     "refused: 169.254.169.254 is a cloud metadata address"),
    ("http://localhost/4.jpg", "refused: localhost is a loopback name", None),
    ("http://10.0.0.7/5.jpg", "refused: 10.0.0.7 is a private address", None),
    ("HTTPS://K.EXAMPLE/6.jpg", None, None),
]


@pytest.mark.parametrize("allow", [False, True])
def test_refused_urls_are_kept_without_url_to_fail_at_download(allow, tmp_path, caplog):
    """A URL capfilt does not fetch loses its ``url`` (img2dataset never sees it) and keeps it in capfilt_url."""
    lines = [f"{url}\tcaption {i}" for i, (url, _, _) in enumerate(HOSTILE_LINES)]
    lines.insert(3, "https://k.example/7.jpg\tcaption\twith a tab")  # malformed: fails at parse
    path = tmp_path / "list.tsv"
    path.write_text("".join(line + "\n" for line in lines))
    target = tmp_path / "out.parquet"
    with caplog.at_level("WARNING", logger="capfilt.ingest.datasets"):
        summary = write_url_list(resolve(str(path)).url_list, target, allow_private_addresses=allow)
    table = pq.read_table(target)
    assert table.column_names == ["url", "caption", *INPUT_COLUMNS]
    rows = table.to_pylist()
    assert len(rows) == len(lines) == summary["rows"]
    assert rows.pop(3) == bad("parse", "malformed line 4 of list.tsv: expected 2 fields, got 3",
                              url=None, caption=lines[3])
    for i, (row, (url, refused, refused_with_flag)) in enumerate(zip(rows, HOSTILE_LINES)):
        reason = refused_with_flag if allow else refused
        assert row["caption"] == f"caption {i}"
        if reason is None:
            assert row == ok(url=url, caption=f"caption {i}")
        else:
            assert row["url"] is None and row[INPUT_URL] == url and row[INPUT_STAGE] == "download", row
            assert row[INPUT_ERROR].startswith(reason), row
    refused = sum((with_flag if allow else without) is not None for _, without, with_flag in HOSTILE_LINES)
    assert summary == {"rows": len(lines), "without_url": 0, "malformed": 1, "refused": refused}
    assert refused == (4 if allow else 7)
    assert f"{refused} refused URL(s)" in caplog.text and "stage download" in caplog.text


def test_refusals_in_a_parquet_list_keep_the_extra_columns(tmp_path):
    folder = tmp_path / "laion"
    folder.mkdir()
    pq.write_table(pa.table({"URL": ["http://g.example/1.jpg", "http://[::ffff:169.254.169.254]/", None],
                             "TEXT": ["a", "b", "c"], "NSFW": ["UNLIKELY", "NSFW", None]}),
                   folder / "part-00000.parquet")
    target = tmp_path / "out.parquet"
    summary = write_url_list(resolve(str(folder)).url_list, target, extra=("NSFW",))
    assert summary == {"rows": 3, "without_url": 1, "malformed": 0, "refused": 1}
    table = pq.read_table(target)
    assert table.column_names == ["url", "caption", "NSFW", *INPUT_COLUMNS]
    rows = table.to_pylist()
    assert rows[0] == ok(url="http://g.example/1.jpg", caption="a", NSFW="UNLIKELY")
    assert rows[1] == bad("download", rows[1][INPUT_ERROR], capfilt_url="http://[::ffff:169.254.169.254]/",
                          url=None, caption="b", NSFW="NSFW")
    assert "169.254.169.254" in rows[1][INPUT_ERROR] and "refused even with" in rows[1][INPUT_ERROR]
    assert rows[2] == ok(url=None, caption="c", NSFW=None)  # no URL: not refused, img2dataset fails it


@pytest.mark.parametrize("column", INPUT_COLUMNS)
def test_capfilts_own_columns_cannot_be_kept(column, tmp_path):
    path = tmp_path / "list.csv"
    path.write_text(f"url,caption,{column}\nhttp://h.example/1.jpg,hello,x\n")
    with pytest.raises(DatasetError, match="capfilt's own column"):
        write_url_list(resolve(str(path)).url_list, tmp_path / "out.parquet", extra=(column,))


def test_download_carries_capfilts_columns_into_the_shards(tmp_path):
    """img2dataset is asked to keep capfilt_error, capfilt_stage and capfilt_url (no download happens here)."""
    from capfilt.ingest.download import DownloadSettings, img2dataset_arguments

    path = tmp_path / "list.tsv"
    path.write_text("url\tcaption\tlicense\nfile:///etc/passwd\ta\tx\nhttp://l.example/1.jpg\tb\ty\n")
    write_url_list(resolve(str(path)).url_list, tmp_path / "list.parquet", extra=("license",))
    arguments = img2dataset_arguments(tmp_path / "list.parquet", tmp_path / "shards", DownloadSettings(), ("license",))
    assert arguments["save_additional_columns"] == ["license", *INPUT_COLUMNS]
    # A list written before capfilt_stage and capfilt_url existed carries what it has.
    pq.write_table(pa.table({"url": ["http://l.example/1.jpg"], "caption": ["b"], INPUT_ERROR: [None]},
                            schema=pa.schema([("url", pa.string()), ("caption", pa.string()),
                                              (INPUT_ERROR, pa.string())])), tmp_path / "old.parquet")
    arguments = img2dataset_arguments(tmp_path / "old.parquet", tmp_path / "old-shards", DownloadSettings())
    assert arguments["save_additional_columns"] == [INPUT_ERROR]


def test_a_headerless_list_that_starts_with_a_refused_url_is_still_headerless(tmp_path):
    """The first line's URL is file: (refused at download): the list has no header all the same, and every line
    is a row; an http(s) field is taken as the URL before a field of another scheme."""
    path = tmp_path / "list.tsv"
    path.write_text("file:///etc/passwd\tthe first caption\nhttps://k.example/1.jpg\ta second caption\n")
    url_list = resolve(str(path)).url_list
    assert (url_list.header, url_list.url_col, url_list.caption_col) == (False, 0, 1)
    summary = write_url_list(url_list, tmp_path / "out.parquet")
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert summary["rows"] == 2 and summary["refused"] == 1
    assert rows[0]["url"] is None and rows[0][INPUT_URL] == "file:///etc/passwd"
    assert rows[0][INPUT_STAGE] == "download" and rows[1]["url"] == "https://k.example/1.jpg"
    both = tmp_path / "both.tsv"
    both.write_text("ftp://k.example/x.jpg\thttps://k.example/2.jpg\n")
    assert resolve(str(both)).url_list.url_col == 1


def test_a_bad_jsonl_line_fails_alone_at_parse(tmp_path):
    """Bytes that are not UTF-8, a line that is not JSON, one that is not an object: each its own failed row, in
    its place; empty lines are no rows; the good lines go on (pyarrow's reader used to stop the whole list)."""
    path = tmp_path / "list.jsonl"
    path.write_bytes(b'{"url": "https://k.example/1.jpg", "caption": "one", "n": 1}\n'
                     b'{"url": "https://k.example/2.jpg", "caption": "caf\xe9"}\n'
                     b'\n'
                     b'{"url": "https://k.example/3.jpg", "caption": broken}\n'
                     b'["https://k.example/4.jpg"]\n'
                     b'{"url": "https://k.example/5.jpg", "caption": 5, "n": "five"}\n')
    summary = write_url_list(resolve(str(path)).url_list, tmp_path / "out.parquet", extra=("n",))
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert summary == {"rows": 5, "without_url": 0, "malformed": 3, "refused": 0}
    assert [r["url"] for r in rows] == ["https://k.example/1.jpg", None, None, None, "https://k.example/5.jpg"]
    assert [r[INPUT_STAGE] for r in rows] == [None, "parse", "parse", "parse", None]
    assert rows[1][INPUT_ERROR] == "line 2 of list.jsonl is not UTF-8: byte 0xe9 at offset 50"
    assert rows[1]["caption"] == '{"url": "https://k.example/2.jpg", "caption": "caf\ufffd"}'
    assert rows[2][INPUT_ERROR].startswith("line 4 of list.jsonl is not JSON: ")
    assert rows[3][INPUT_ERROR] == "line 5 of list.jsonl is not a JSON object"
    assert (rows[4]["caption"], rows[0]["n"], rows[4]["n"]) == ("5", "1", "five")  # mixed types: as text


def test_a_json_value_that_is_not_utf8_fails_its_row_and_a_broken_document_names_the_file(tmp_path):
    path = tmp_path / "list.json"
    path.write_bytes(b'{"image_urls": ["https://k.example/1.jpg", "https://k.example/2.jpg"], '
                     b'"captions": ["one", "caf\xe9"]}')
    summary = write_url_list(resolve(str(path)).url_list, tmp_path / "out.parquet")
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert summary["rows"] == 2 and summary["malformed"] == 1
    assert rows[0]["url"] == "https://k.example/1.jpg" and rows[0][INPUT_ERROR] is None
    assert rows[1]["url"] is None and rows[1][INPUT_STAGE] == "parse"
    assert rows[1][INPUT_ERROR] == "record 2 of list.json is not UTF-8: byte 0xe9 in 'captions'"
    broken = tmp_path / "broken.json"
    broken.write_text('{"image_urls": ["https://k.example/1.jpg"], "captions": ["one"]')
    url_list = UrlList((broken,), "json", "image_urls", "captions", header=True)
    with pytest.raises(DatasetError, match="broken.json: not a JSON document"):
        write_url_list(url_list, tmp_path / "out2.parquet")


def test_a_damaged_first_shard_does_not_decide_what_the_folder_is(tmp_path):
    """The folder's kind is read from the first Parquet file that reads; a damaged one is left to the pipeline
    (which records it), and a folder where none reads is an error that names the files."""
    (tmp_path / "00000.parquet").write_bytes(b"PAR1 cut short")
    pq.write_table(pa.table({"key": ["1"], "jpg": [jpeg()]}), tmp_path / "00001.parquet")
    assert isinstance(resolve(str(tmp_path)), datasets.ShardsInput)
    (tmp_path / "00001.parquet").write_bytes(b"not parquet either")
    with pytest.raises(DatasetError, match="no Parquet file of 2 can be read: .*00000.parquet"):
        resolve(str(tmp_path))


@pytest.mark.parametrize("content", ["url\tcaption\n", "url\tcaption", "url\tcaption\r\n"])
def test_a_list_with_a_header_and_no_rows_is_a_clear_error(content, tmp_path):
    path = tmp_path / "list.tsv"
    path.write_text(content)
    with pytest.raises(DatasetError, match="list.tsv: no rows"):
        write_url_list(resolve(str(path)).url_list, tmp_path / "out.parquet")
