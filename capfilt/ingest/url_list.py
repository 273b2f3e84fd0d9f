"""Reading a URL list, whatever its format, into one canonical Parquet file for the download.

URL lists are rewritten into one canonical Parquet file (``url``,
``caption``, any columns asked for, then ``capfilt_error``, ``capfilt_stage``
and ``capfilt_url``), so that the download step reads one format whatever the
source's quirks (CC12M has no header, CC3M puts the caption first, SBU is a
JSON object of lists). Every source row becomes one row of it: a TSV/CSV line
that does not parse is kept as a row without URL whose ``capfilt_error`` says
why, and ends in ``failed/`` at stage ``parse``; a URL that capfilt does not
fetch (``capfilt.ingest.urls``: any scheme but http and https, loopback, private,
link-local and other non-public addresses) is kept as a row without URL,
the URL in ``capfilt_url`` and the reason in ``capfilt_error``, and ends in
``failed/`` at stage ``download`` without img2dataset ever seeing it.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from capfilt.columns import INPUT_COLUMNS, INPUT_ERROR, INPUT_STAGE, INPUT_URL
from capfilt.ingest.urls import refusals

log = logging.getLogger(__name__)

URL_LIST_SUFFIXES = (".tsv", ".csv", ".txt", ".json", ".jsonl")


URL_COLUMNS = ("url", "image_url", "image_urls", "imageurl", "link")


CAPTION_COLUMNS = ("caption", "captions", "text", "txt", "alt", "title", "description")


WRITE_BATCH_ROWS = 65_536


CSV_BLOCK_BYTES = 1 << 24  # pyarrow's CSV block size


class DatasetError(ValueError):
    """DATA names nothing capfilt can read, with what to do instead."""


class DatasetNotAvailableError(DatasetError, FileNotFoundError):
    """A named dataset's URL list is neither on disk nor fetchable (offline, moved, behind a login)."""


@dataclass(frozen=True)
class UrlList:
    """URL list files and how to read them: format, URL and caption columns (names, or indices without header)."""

    paths: tuple[Path, ...]
    format: str  # tsv, csv, txt, json, jsonl, parquet
    url_col: str | int
    caption_col: str | int | None
    header: bool = True


@dataclass(frozen=True)
class Columns:
    """Overrides for a URL list's columns; None means detect."""

    url: str | None = None
    caption: str | None = None
    no_caption: bool = False  # --no-caption: the list has no texts; images are captioned without a web text

    def __post_init__(self):
        if self.no_caption and self.caption is not None:
            raise DatasetError("give --caption-col or --no-caption, not both")


def list_format(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in (*URL_LIST_SUFFIXES, ".parquet"):
        if name.endswith(suffix):
            return suffix[1:]
    return None


def detect_url_list(files: list[Path], columns: Columns = Columns()) -> UrlList:
    """How to read local URL list files: their format, header and URL/caption columns.

    A list whose caption column is neither named (``--caption-col``) nor found is an error, not a run without web
    texts: ``--no-caption`` says so explicitly. A ``.txt`` list is URLs only by its format.
    """
    formats = {list_format(p) for p in files}
    if len(formats) != 1 or None in formats:
        raise DatasetError(f"URL list files must share one format ({', '.join(URL_LIST_SUFFIXES)}, .parquet): "
                           f"{', '.join(p.name for p in files[:5])}")
    fmt = formats.pop()
    if fmt == "txt":
        return UrlList(tuple(files), "txt", 0, None, header=False)
    if fmt in ("tsv", "csv"):
        line = _first_line(files[0])
        if fmt == "csv":  # quoted fields may hold commas, as _headerless_width reads them
            import csv

            first = next(csv.reader([line]), [])
        else:
            first = line.split("\t")
        fields = [f.strip().strip('"') for f in first]
        if any(_looks_like_url(f) for f in fields):  # no header: find the URL by its look (http(s) first)
            return _headerless(files, fmt, fields, columns)
        names = fields
    elif fmt == "parquet":
        names = pq.read_schema(files[0]).names
    elif fmt == "jsonl":
        names = list(json.loads(_first_line(files[0])))
    else:  # json: an object of lists or a list of objects
        names = list(_read_json(files[0]))
    url_col = _named(columns.url, names, "--url-col", files[0]) or _pick(names, URL_COLUMNS, "URL", files[0])
    caption_col = None
    if not columns.no_caption:
        caption_col = _named(columns.caption, names, "--caption-col", files[0]) or _pick(
            names, CAPTION_COLUMNS, None, files[0])
        if caption_col is None:
            raise DatasetError(
                f"{files[0]}: no caption column among its columns {names} (looked for {', '.join(CAPTION_COLUMNS)}); "
                "name it with --caption-col NAME, or give --no-caption to caption the images without web texts")
    return UrlList(tuple(files), fmt, url_col, caption_col, header=True)


def _named(column: str | None, names: list[str], flag: str, path: Path) -> str | None:
    """A column the user named, checked against the header (None when not named)."""
    if column is not None and column not in names:
        raise DatasetError(f"{path}: {flag} {column!r} is not one of its columns {names}")
    return column


def _headerless(files: list[Path], fmt: str, fields: list[str], columns: Columns) -> UrlList:
    """A TSV/CSV list without header: the URL column by its look, the caption the one other column (or named by
    index); a list of three or more columns needs ``--caption-col`` or ``--no-caption``."""
    width = _headerless_width(files[0], fmt)
    url_index = min((i for i, f in enumerate(fields) if _looks_like_url(f)),
                    key=lambda i: (not fields[i].startswith(("http://", "https://")), i))
    url_col = _index(columns.url, width, "--url-col", files[0]) if columns.url is not None else url_index
    others = [i for i in range(width) if i != url_col]
    caption_col = None
    if columns.caption is not None:
        caption_col = _index(columns.caption, width, "--caption-col", files[0])
    elif not columns.no_caption:
        if len(others) != 1:
            shown = ", ".join(f"{i}: {fields[i][:30]!r}" for i in range(min(width, len(fields))))
            raise DatasetError(
                f"{files[0]} has no header and {width} columns (first line: {shown}): column {url_col} holds the URLs; "
                "which holds the caption? Name it by index with --caption-col N, or give --no-caption to caption "
                "the images without web texts")
        caption_col = others[0]
    return UrlList(tuple(files), fmt, url_col, caption_col, header=False)


def _index(column: str, width: int, flag: str, path: Path) -> int:
    """A column named by index in a headerless list."""
    try:
        index = int(column)
    except ValueError:
        raise DatasetError(f"{path} has no header: {flag} takes a column index (0 to {width - 1}), "
                           f"not {column!r}") from None
    if not 0 <= index < width:
        raise DatasetError(f"{path} has {width} columns: {flag} {index} is not one of 0 to {width - 1}")
    return index


_URL_LOOK = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,15}://|data:", re.IGNORECASE)


def _looks_like_url(text: str) -> bool:
    """An http(s) URL, or one of another scheme (``file://``, ``ftp://``, ``data:``): those are refused at
    download, but a headerless list that starts with one is still a headerless list."""
    return _URL_LOOK.match(text) is not None


WIDTH_SAMPLE_LINES = 1000  # lines read to find a headerless list's number of columns


def _headerless_width(path: Path, fmt: str) -> int:
    """The number of columns of a headerless TSV/CSV/TXT list: the most common count over its first
    ``WIDTH_SAMPLE_LINES`` non-empty lines (ties: the larger), so that one odd line at the top (a caption with a
    tab in it) is recorded as malformed instead of making every other line malformed."""
    import csv
    from collections import Counter

    counts: Counter[int] = Counter()
    with _open_text(path, newline="") as f:
        lines = (line.rstrip("\r\n") for _, line in zip(range(WIDTH_SAMPLE_LINES), f))
        if fmt == "csv":  # quoted fields may hold commas
            counts.update(len(fields) for fields in csv.reader(line for line in lines if line))
        else:  # TSV and TXT lists are not quoted
            counts.update(line.count("\t") + 1 for line in lines if line)
    return max(counts, key=lambda width: (counts[width], width)) if counts else 1


def _open_text(path: Path, newline: str | None = None):
    """A URL list file as UTF-8 text, gunzipped when its name ends in ``.gz``."""
    # Bad bytes as U+FFFD: this reads the header and a sample of lines; the rows themselves are checked apart.
    return _open(path, "rt", encoding="utf-8", errors="replace", newline=newline)


def _open(path: Path, mode: str, **options):
    """``path`` opened in ``mode``, gunzipped when its name ends in ``.gz``."""
    return (gzip.open if path.name.endswith(".gz") else open)(path, mode, **options)


def _first_line(path: Path) -> str:
    with _open_text(path) as f:
        return f.readline().rstrip("\r\n")


def _only_one_line(path: Path) -> bool:
    """Whether the file holds nothing after its first line (a header and no rows)."""
    with _open_text(path) as f:
        f.readline()
        return f.read(1) == ""


def _pick(names: list[str], candidates: tuple[str, ...], required: str | None, path: Path) -> str | None:
    lowered = {name.lower(): name for name in names}
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    if required:
        raise DatasetError(f"{path}: no {required} column among {names}; name it with --url-col")
    return None


def _read_json(path: Path) -> dict[str, list]:
    with _open_text(path) as f:
        data = json.load(f)
    return _json_columns(data, path)


def _json_columns(data, path: Path) -> dict[str, list]:
    """A JSON list of records or an object of lists, as columns."""
    if isinstance(data, list) and all(isinstance(record, dict) for record in data):  # a list of records
        keys = list(dict.fromkeys(k for record in data for k in record))
        return {k: [record.get(k) for record in data] for k in keys}
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return data
    raise DatasetError(f"{path}: expected a JSON list of records or an object of lists")


def write_url_list(url_list: UrlList, target: str | Path, extra: tuple[str, ...] = (),
                   allow_private_addresses: bool = False, allow_networks: tuple[str, ...] = ()) -> dict:
    """Rewrite ``url_list`` as one Parquet file: ``url``, ``caption``, the ``extra`` columns, then
    ``capfilt_error``, ``capfilt_stage`` and ``capfilt_url`` (``capfilt.columns.INPUT_COLUMNS``).

    Every row is kept, in the source's order, and the three ``capfilt_*`` columns are null on a good row:

    - a row without a URL (empty or whitespace) as it is: img2dataset records it as a failed download,
      so that it is accounted for in ``failed/``;
    - a CSV/TSV line that does not parse (too many or too few fields, bytes that are not UTF-8): ``url``
      null, the line's text as ``caption``, the reason in ``capfilt_error`` (``malformed line 7 of
      urls.tsv: expected 2 fields, got 3``) and ``capfilt_stage`` ``parse``;
    - a URL that ``capfilt.ingest.urls.check_url`` refuses (a scheme other than http and https, a loopback,
      private, link-local or otherwise non-public address, an internal name): ``url`` null, so that
      img2dataset never fetches it, the URL in ``capfilt_url``, the reason in ``capfilt_error``
      (``refused: scheme 'file' (capfilt fetches only http and https URLs)``) and ``capfilt_stage``
      ``download``. ``allow_private_addresses`` (``--allow-private-addresses``) lets loopback and private
      addresses and internal names through; link-local addresses (the cloud metadata service's
      169.254.169.254) stay refused. ``allow_networks`` (``--allow-network CIDR``) lets just the addresses
      of those networks through (``capfilt.ingest.urls.refused_address``).

    The pipeline writes the last two kinds to ``failed/`` at their stage. Returns the counts: ``rows``
    (all of them, malformed and refused included), ``without_url``, ``malformed`` and ``refused``.
    Written through a temporary name.
    """
    kept = [name for name in extra if name in INPUT_COLUMNS]
    if kept:
        raise DatasetError(f"{kept[0]!r} is capfilt's own column of the URL list; it cannot be kept")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    summary = {"rows": 0, "without_url": 0, "malformed": 0, "refused": 0}
    writer = None
    try:
        for table in _tables(url_list, extra, summary):
            parsed = pc.is_null(table[INPUT_ERROR])
            has_url = pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(table["url"]), ""), False)
            summary["without_url"] += pc.sum(pc.and_(parsed, pc.invert(has_url))).as_py() or 0
            summary["rows"] += table.num_rows
            table = _with_refusals(table, allow_private_addresses, allow_networks, summary)
            if writer is None:
                writer = pq.ParquetWriter(partial, table.schema)
            writer.write_table(table)
        if writer is None:
            raise DatasetError(f"{', '.join(map(str, url_list.paths))}: no rows")
        writer.close()
        writer = None
        os.replace(partial, target)
    finally:
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
    if summary["without_url"] or summary["malformed"] or summary["refused"]:
        log.warning("URL list: %(without_url)d row(s) without URL (they will fail to download), "
                    "%(malformed)d malformed line(s) (they go to failed/ at stage parse), "
                    "%(refused)d refused URL(s) (not fetched: a scheme other than http/https or a non-public "
                    "address; they go to failed/ at stage download)", summary)
    return summary


def _with_refusals(table: pa.Table, allow_private_addresses: bool, allow_networks: tuple[str, ...],
                   summary: dict) -> pa.Table:
    """One block of the canonical list with ``capfilt_stage`` and ``capfilt_url``: the URLs that
    ``capfilt.ingest.urls`` refuses are taken out of ``url`` (a malformed row has none) and fail at stage download."""
    url, error = table["url"].combine_chunks(), table[INPUT_ERROR].combine_chunks()
    reasons = refusals(url, allow_private_addresses, allow_networks)
    refused = pc.is_valid(reasons)
    summary["refused"] += pc.sum(refused).as_py() or 0
    no_string = pa.scalar(None, pa.string())
    stage = pc.if_else(refused, pa.scalar("download"),
                       pc.if_else(pc.is_valid(error), pa.scalar("parse"), no_string))
    columns = {name: table[name] for name in table.column_names if name not in INPUT_COLUMNS}
    columns["url"] = pc.if_else(refused, no_string, url)
    return pa.table({**columns, INPUT_ERROR: pc.if_else(refused, reasons, error), INPUT_STAGE: stage,
                     INPUT_URL: pc.if_else(refused, url, no_string)})


def _decoded(raw: pa.Table, first: int, path: Path, delimiter: str) -> tuple[pa.Table, dict[int, tuple[str, str]]]:
    """A block of a CSV/TSV list (binary columns) as strings; ``first`` is the file's number of its first row.

    Also returns the rows with bytes that are not UTF-8: row -> (reason, the line's text). Such a row keeps its
    place, its fields decoded with U+FFFD for the bad bytes (``_select`` turns it into one that fails at stage
    ``parse``). The whole block is checked at once; only a block with a bad byte is decoded value by value.
    """
    try:
        return raw.cast(pa.schema([(name, pa.string()) for name in raw.column_names])), {}
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass
    columns = {name: raw[name].to_pylist() for name in raw.column_names}
    reasons: dict[int, str] = {}
    for name, values in columns.items():
        for row, value in enumerate(values):
            if value is None:
                continue
            try:
                values[row] = value.decode("utf-8")
            except UnicodeDecodeError as error:
                values[row] = value.decode("utf-8", errors="replace")
                reasons.setdefault(row, f"line {first + row} of {path.name} is not UTF-8: byte "
                                        f"0x{value[error.start]:02x} in column {name!r}")
    table = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    return table, {row: (reason, delimiter.join(columns[name][row] or "" for name in columns))
                   for row, reason in reasons.items()}


def _select(table: pa.Table, url_list: UrlList, extra: tuple[str, ...],
            undecodable: dict[int, tuple[str, str]] | None = None) -> pa.Table:
    """``url``, ``caption`` (as strings) and the ``extra`` columns of one block of a URL list.

    Rows that ``_decoded`` found not UTF-8 (``undecodable``) get no URL, their line's text (bad bytes as
    U+FFFD) as caption and the reason in ``capfilt_error``: they fail at stage ``parse``.
    """
    names = table.column_names

    def column(col):
        name = names[col] if isinstance(col, int) else col
        if name not in names:
            raise DatasetError(f"{url_list.paths[0]}: no column {col!r} (columns: {names})")
        return table[name].cast(pa.string())

    missing = [name for name in extra if name not in names]
    if missing:
        raise DatasetError(f"{url_list.paths[0]}: no column(s) {missing} to keep (columns: {names})")
    url = column(url_list.url_col)
    caption = pa.nulls(len(url), pa.string()) if url_list.caption_col is None else column(url_list.caption_col)
    selected = pa.table({"url": url, "caption": caption, **{name: table[name] for name in extra},
                         INPUT_ERROR: pa.nulls(len(url), pa.string())})
    if not undecodable:
        return selected
    rows = selected.to_pylist()
    for row, (reason, text) in undecodable.items():
        rows[row] = {"url": None, "caption": text, **{name: None for name in extra}, INPUT_ERROR: reason}
    return pa.Table.from_pylist(rows, schema=selected.schema)


def _tables(url_list: UrlList, extra: tuple[str, ...], summary: dict):
    for path in url_list.paths:
        fmt = url_list.format
        if fmt in ("tsv", "csv", "txt"):
            yield from _csv_tables(path, url_list, extra, summary)
        elif fmt == "parquet":
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=WRITE_BATCH_ROWS):
                yield _select(pa.Table.from_batches([batch]), url_list, extra)
        elif fmt == "jsonl":
            yield from _jsonl_tables(path, url_list, extra, summary)
        elif fmt == "json":
            yield _json_table(path, url_list, extra, summary)
        else:
            raise DatasetError(f"unknown URL list format {fmt!r}")


def _records_table(records: list[dict], url_list: UrlList, extra: tuple[str, ...]) -> pa.Table:
    """JSON records -> a table of the URL list's columns: URL and caption as text, extra columns as they infer."""
    def text(value):
        return value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    columns = {}
    for name in dict.fromkeys(c for c in (url_list.url_col, url_list.caption_col, *extra) if c is not None):
        values = [record.get(name) for record in records]
        if name in extra:
            try:
                columns[name] = pa.array(values)
                continue
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: kept as JSON text
                pass
        columns[name] = pa.array([text(v) for v in values], pa.string())
    return pa.table(columns)


def _not_utf8(data: bytes, where: str) -> str | None:
    """Why ``data`` is not UTF-8 (``where`` names the line or file), or None."""
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as error:
        return f"{where} is not UTF-8: byte 0x{data[error.start]:02x} at offset {error.start}"


def _jsonl_tables(path: Path, url_list: UrlList, extra: tuple[str, ...], summary: dict):
    """A JSON Lines list, line by line: a line that is not UTF-8, not JSON or not an object fails alone at
    stage ``parse`` (its text, bad bytes as U+FFFD, as caption); empty lines are no rows. One bad line used to
    stop pyarrow's reader, and with it the whole job."""
    records: list[dict] = []
    bad: dict[int, tuple[str, str]] = {}
    with _open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            where = f"line {number} of {path.name}"
            reason = _not_utf8(line, where)
            record = None
            if reason is None:
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        reason = f"{where} is not a JSON object"
                except ValueError as error:
                    reason = f"{where} is not JSON: {error}"
            if reason is not None:
                bad[len(records)] = (reason, line.decode("utf-8", errors="replace"))
                record = {}
            records.append(record)
            if len(records) == WRITE_BATCH_ROWS:
                summary["malformed"] += len(bad)
                yield _select(_records_table(records, url_list, extra), url_list, extra, bad)
                records, bad = [], {}
    if records:
        summary["malformed"] += len(bad)
        yield _select(_records_table(records, url_list, extra), url_list, extra, bad)


_BAD_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as ``surrogateescape`` decodes it


def _json_table(path: Path, url_list: UrlList, extra: tuple[str, ...], summary: dict) -> pa.Table:
    """A JSON list (an object of lists, or a list of records): one document, so a syntax error is the file's
    (a ``DatasetError`` naming it); a value with bytes that are not UTF-8 fails its row alone at ``parse``."""
    with _open(path, "rb") as f:
        data = f.read()
    try:
        document = json.loads(data.decode("utf-8", errors="surrogateescape"))
    except ValueError as error:
        raise DatasetError(f"{path}: not a JSON document: {error}") from None
    columns = _json_columns(document, path)
    reasons: dict[int, str] = {}
    if _not_utf8(data, path.name):
        for name, values in columns.items():
            for row, value in enumerate(values):
                found = _BAD_BYTE.search(value) if isinstance(value, str) else None
                if found:
                    byte = ord(found.group()) - 0xDC00
                    reasons.setdefault(row, f"record {row + 1} of {path.name} is not UTF-8: byte 0x{byte:02x} in "
                                            f"{name!r}")
                    values[row] = _BAD_BYTE.sub("\ufffd", value)
    # Each failed record's text: the record as JSON, its bad bytes as U+FFFD.
    bad = {row: (reason, json.dumps({n: columns[n][row] for n in columns}, ensure_ascii=False))
           for row, reason in reasons.items()}
    summary["malformed"] += len(bad)
    rows = len(next(iter(columns.values()), []))
    records = [{name: columns[name][row] for name in columns} for row in range(rows)]
    return _select(_records_table(records, url_list, extra), url_list, extra, bad)


def _csv_tables(path: Path, url_list: UrlList, extra: tuple[str, ...], summary: dict):
    delimiter = {"tsv": "\t", "csv": ",", "txt": "\t"}[url_list.format]
    if url_list.header:
        header = _first_line(path).split(delimiter)
        names = [n.strip().strip('"') for n in header]
        skip = 1
        if _only_one_line(path):  # pyarrow cannot skip the header of a file that ends without a line break
            return
    else:
        width = _headerless_width(path, url_list.format)
        names = [f"f{i}" for i in range(width)]
        skip = 0
    malformed: list[tuple[int | None, dict]] = []  # (record number, row) of lines that did not parse, in order

    def keep_malformed(row) -> str:
        line = "?" if row.number is None else row.number
        malformed.append((row.number, {"url": None, "caption": row.text, INPUT_ERROR: (
            f"malformed line {line} of {path.name}: expected {row.expected_columns} fields, "
            f"got {row.actual_columns}")}))
        summary["malformed"] += 1
        return "skip"  # from the parsed block; it is put back in its place below

    # All strings, like the parsed blocks' columns after _select.
    malformed_schema = pa.schema([(name, pa.string()) for name in ("url", "caption", *extra, INPUT_ERROR)])
    reader = pa_csv.open_csv(
        path,
        # One thread: the parser then numbers the rows (header included), so that a malformed line has its number.
        read_options=pa_csv.ReadOptions(column_names=names, skip_rows=skip, block_size=CSV_BLOCK_BYTES,
                                        use_threads=False),
        # TSV lists are not quoted (a caption may start with a quote mark); CSV files are. Empty lines are rows
        # (without URL: they fail at download), so that the numbers are the file's line numbers.
        parse_options=pa_csv.ParseOptions(delimiter=delimiter, quote_char='"' if url_list.format == "csv" else False,
                                          invalid_row_handler=keep_malformed, ignore_empty_lines=False),
        # Bytes, not strings: a line that is not UTF-8 must fail alone (``_decoded``), not stop the whole list.
        convert_options=pa_csv.ConvertOptions(column_types={n: pa.binary() for n in names},
                                              strings_can_be_null=False),
    )
    record = skip + 1  # the number of the next row of the file
    for batch in reader:  # a block's malformed rows are known before its batch comes (the parser reads ahead)
        raw = pa.Table.from_batches([batch])
        pieces, start = [], 0
        while start < raw.num_rows:  # the file's order: each malformed row at its own number
            taken = 0
            while taken < len(malformed) and (malformed[taken][0] is None or malformed[taken][0] <= record + taken):
                taken += 1
            if taken:
                pieces.append(pa.Table.from_pylist([row for _, row in malformed[:taken]], schema=malformed_schema))
                del malformed[:taken]
                record += taken
            next_bad = malformed[0][0] if malformed and malformed[0][0] is not None else None
            good = raw.num_rows - start if next_bad is None else min(raw.num_rows - start, next_bad - record)
            block, undecodable = _decoded(raw.slice(start, good), record, path, delimiter)
            summary["malformed"] += len(undecodable)
            pieces.append(_select(block, url_list, extra, undecodable))
            start, record = start + good, record + good
        if not pieces:  # an empty block: its lines were all malformed (they come in their place above or below)
            pieces.append(_select(_decoded(raw, record, path, delimiter)[0], url_list, extra))
        yield pa.concat_tables(pieces)
    if malformed:  # after the last parsed row (or in a file where no row parsed)
        yield pa.Table.from_pylist([row for _, row in malformed], schema=malformed_schema)
