"""Parquet files written a row group at a time: the size of a row group, and the writers that keep to it.

Every file a shard commits (kept/, rejected/, failed/) is written in row groups of ``ROW_GROUP_ROWS`` rows, by
the pipeline (``TableWriter``, rows as they are judged), by ``capfilt refilter`` (``write_table`` and
``write_groups``, a shard's table at once) and by ``--dedup-images``' rewrite of kept/
(``capfilt.pipelines.image_dedup``, which rewrites rejected/ in groups of 16 times as many rows). A row group is
what a reader decodes at a time: a row group of kept/ holds ``ROW_GROUP_ROWS`` images with their bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

ROW_GROUP_ROWS = 256  # rows per Parquet row group in every file a shard commits


def row_groups(table: pa.Table) -> Iterator[pa.Table]:
    """``table`` in slices of ``ROW_GROUP_ROWS`` rows (none for an empty table)."""
    for start in range(0, table.num_rows, ROW_GROUP_ROWS):
        yield table.slice(start, ROW_GROUP_ROWS)


def write_groups(path: str, schema: pa.Schema, groups: Iterable[pa.Table]) -> None:
    """A Parquet file at ``path`` with one row group per table of ``groups`` (a file without rows when empty)."""
    with FileSystems.create(path) as out, pq.ParquetWriter(out, schema) as writer:
        for group in groups:
            writer.write_table(group)


def write_table(path: str, table: pa.Table, schema: pa.Schema) -> None:
    """``table`` (of ``schema``) as a Parquet file in row groups of ``ROW_GROUP_ROWS`` rows."""
    write_groups(path, schema, row_groups(table))


class TableWriter:
    """Rows (dicts) appended to one Parquet file, written a row group (``ROW_GROUP_ROWS`` rows) at a time.

    With a ``background`` executor, a row group is encoded and written there while the caller goes on;
    at most one row group per file is in flight, and ``close`` waits for it (and raises its error).
    """

    def __init__(self, path: str, schema: pa.Schema, background: Executor | None = None):
        self.path, self.schema = path, schema
        self._file = FileSystems.create(path)
        self._writer = pq.ParquetWriter(self._file, schema)
        self._rows: list[dict] = []
        self._background = background
        self._pending: Future | None = None

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        self._wait()
        if self._background is None:
            self._write(rows)
        else:
            self._pending = self._background.submit(self._write, rows)

    def _write(self, rows: list[dict]) -> None:
        self._writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.flush()
            self._wait()
            self._writer.close()
        finally:
            self._file.close()
