"""Input shards: img2dataset's Parquet or webdataset shards, listed and read row by row.

A shard is the unit of work of the whole pipeline: one input file in, one
``kept``/``rejected``/``failed`` file each out, named after the input's stem.
Two layouts are read, both as img2dataset writes them:

- Parquet (``--output_format parquet``): one row per input URL, failures
  included (``status`` != ``success``, no image bytes), the image in a
  ``jpg`` (or ``png``/``webp``) column. A row whose ``capfilt_error`` is set
  is a URL list line that did not parse (``schema.INPUT_ERROR``).
- webdataset (``--output_format webdataset``): ``{shard}.tar`` with
  ``{key}.jpg``/``.txt``/``.json`` for each success, and beside it
  ``{shard}.parquet`` with the metadata of every row, failures included.
  A tar without that sidecar is read on its own (every sample a success).

Paths go through Beam's ``FileSystems``, so ``gs://`` and ``s3://`` work as
local paths do. In a folder that img2dataset wrote, a shard without its
``{shard}_stats.json`` is still being written (or its download died) and is
left out.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from capfilt.pipelines.schema import IMAGE_COLUMNS, INPUT_ERROR, passthrough_fields

log = logging.getLogger(__name__)

SUCCESS = "success"
READ_BATCH_ROWS = 256


class ShardError(ValueError):
    """An input that is not a shard capfilt can read, with the reason."""


@dataclass(frozen=True)
class InputShard:
    """One input file: a Parquet shard or a tar (with its metadata Parquet when img2dataset wrote one)."""

    shard_id: str  # the output files' stem
    path: str
    sidecar: str | None = None

    @property
    def format(self) -> str:
        return "webdataset" if self.path.endswith(".tar") else "parquet"


@dataclass
class InputRow:
    """One input row: an image (or the reason there is none), its web text and metadata."""

    key: str
    url: str | None
    caption: str | None
    image: bytes | None
    status: str  # img2dataset's status; 'success' when the input has none
    error: str | None = None
    extra: dict = field(default_factory=dict)  # pass-through columns
    input_error: str | None = None  # why the URL list line did not parse (the row then has no URL)


def _stem(path: str) -> str:
    name = posixpath.basename(path)
    return name[: -len(".parquet")] if name.endswith(".parquet") else name[: -len(".tar")]


def _glob(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _is_dir(path: str) -> bool:
    if "://" not in path:
        return os.path.isdir(path)
    return not path.endswith((".parquet", ".tar")) and not any(ch in path for ch in "*?[")


def list_shards(location: str | os.PathLike | list) -> list[InputShard]:
    """The shards at a folder, a glob, a file or a list of them, sorted by id; ids must be unique."""
    locations = [location] if isinstance(location, (str, os.PathLike)) else list(location)
    shards: list[InputShard] = []
    for loc in locations:
        shards += _shards_at(str(loc))
    if not shards:
        raise ShardError(f"no input shards (*.parquet or *.tar) at {', '.join(map(str, locations))}")
    ids = [s.shard_id for s in shards]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ShardError(f"two input shards share the id(s) {duplicates}: output files are named after the shard")
    return sorted(shards, key=lambda s: s.shard_id)


def _shards_at(location: str) -> list[InputShard]:
    if _is_dir(location):
        folder = location.rstrip("/")
        tars = _glob(folder + "/*.tar")
        parquets = _glob(folder + "/*.parquet")
        stats = {_stem_of_stats(p) for p in _glob(folder + "/*_stats.json")}  # img2dataset's per-shard stats
        if tars:
            sidecars = {_stem(p): p for p in parquets}
            shards = [InputShard(_stem(t), t, sidecars.get(_stem(t))) for t in tars]
        else:
            shards = [InputShard(_stem(p), p) for p in parquets]
        if stats:  # written by img2dataset: only shards whose stats file exists are complete
            unfinished = [s.shard_id for s in shards if s.shard_id not in stats]
            if unfinished:
                log.warning("skipping %d shard(s) without img2dataset's _stats.json (unfinished): %s",
                            len(unfinished), ", ".join(unfinished[:10]))
            shards = [s for s in shards if s.shard_id in stats]
        return shards
    if any(ch in location for ch in "*?["):
        return [shard for path in _glob(location) for shard in _shards_at(path)]
    if not FileSystems.exists(location):
        raise ShardError(f"no such input: {location}")
    if location.endswith(".tar"):
        sidecar = location[: -len(".tar")] + ".parquet"
        return [InputShard(_stem(location), location, sidecar if FileSystems.exists(sidecar) else None)]
    if location.endswith(".parquet"):
        return [InputShard(_stem(location), location)]
    raise ShardError(f"{location}: an input shard is a .parquet or a .tar file")


def _stem_of_stats(path: str) -> str:
    return posixpath.basename(path)[: -len("_stats.json")]


def image_column(schema: pa.Schema) -> str | None:
    """The image bytes column of an img2dataset Parquet schema, if any."""
    return next((name for name in IMAGE_COLUMNS if name in schema.names), None)


class ShardReader:
    """Reads one shard's rows in order; ``extra_fields`` and ``image_column`` describe its columns."""

    def __init__(self, shard: InputShard):
        self.shard = shard
        if shard.format == "parquet":
            self._metadata_schema = self._parquet_schema(shard.path)
            self.image_column = image_column(self._metadata_schema)
            if self.image_column is None:
                raise ShardError(
                    f"{shard.path} has no image column ({', '.join(IMAGE_COLUMNS)}): is it a URL list? "
                    "Give it as DATA to download it first."
                )
        else:
            self._metadata_schema = self._parquet_schema(shard.sidecar) if shard.sidecar else pa.schema([])
            self.image_column = "jpg"
        self.extra_fields = passthrough_fields(self._metadata_schema)

    @staticmethod
    def _parquet_schema(path: str) -> pa.Schema:
        with FileSystems.open(path) as f:
            return pq.ParquetFile(f).schema_arrow

    def rows(self) -> Iterator[InputRow]:
        if self.shard.format == "parquet":
            with FileSystems.open(self.shard.path) as f:
                yield from self._parquet_rows(pq.ParquetFile(f), with_images=True)
        elif self.shard.sidecar:
            yield from self._tar_rows_with_sidecar()
        else:
            yield from self._tar_rows()

    def _parquet_rows(self, parquet: pq.ParquetFile, with_images: bool) -> Iterator[InputRow]:
        names = parquet.schema_arrow.names
        extra = [f.name for f in self.extra_fields]
        index = 0
        for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS):
            columns = batch.to_pydict()
            for i in range(batch.num_rows):
                yield InputRow(
                    key=str(columns["key"][i]) if "key" in names else f"{self.shard.shard_id}_{index:09d}",
                    url=columns["url"][i] if "url" in names else None,
                    caption=columns["caption"][i] if "caption" in names else None,
                    image=columns[self.image_column][i] if with_images else None,
                    status=(columns["status"][i] if "status" in names else None) or SUCCESS,
                    error=columns["error_message"][i] if "error_message" in names else None,
                    extra={name: columns[name][i] for name in extra},
                    input_error=columns[INPUT_ERROR][i] if INPUT_ERROR in names else None,
                )
                index += 1

    def _tar_rows_with_sidecar(self) -> Iterator[InputRow]:
        with FileSystems.open(self.shard.sidecar) as meta, FileSystems.open(self.shard.path) as tar_file:
            samples = _tar_samples(tar_file)
            pending: dict[str, dict[str, bytes]] = {}
            for row in self._parquet_rows(pq.ParquetFile(meta), with_images=False):
                if row.status != SUCCESS:
                    yield row
                    continue
                while row.key not in pending:  # the tar holds successes in the sidecar's order
                    try:
                        key, members = next(samples)
                    except StopIteration:
                        break
                    pending[key] = members
                row.image = pending.pop(row.key, {}).get(self.image_column)  # None: fails at decode
                yield row

    def _tar_rows(self) -> Iterator[InputRow]:
        with FileSystems.open(self.shard.path) as tar_file:
            for key, members in _tar_samples(tar_file):
                meta = json.loads(members["json"]) if "json" in members else {}
                caption = members["txt"].decode("utf-8") if "txt" in members else meta.get("caption")
                yield InputRow(key=key, url=meta.get("url"), caption=caption,
                               image=members.get(self.image_column), status=SUCCESS)


def _tar_samples(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each webdataset sample, streaming, in file order."""
    key, members = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = posixpath.basename(member.name)
            member_key, _, extension = name.partition(".")
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            members[extension] = tar.extractfile(member).read()
    if key is not None:
        yield key, members
