"""Input shards: img2dataset's Parquet or webdataset shards, listed and read row by row.

A shard is the unit of work of the whole pipeline: one input file in, one
``kept``/``rejected``/``failed`` file each out, named after the input's stem.
Two layouts are read, both as img2dataset writes them:

- Parquet (``--output_format parquet``): one row per input URL, failures
  included (``status`` != ``success``, no image bytes), the image in a
  ``jpg`` (or ``png``/``webp``) column. A row whose ``capfilt_error`` is set
  failed before download: a URL list line that did not parse, or a URL that
  was refused (``capfilt.columns``).
- webdataset (``--output_format webdataset``): ``{shard}.tar`` with
  ``{key}.jpg``/``.txt``/``.json`` for each success, and beside it
  ``{shard}.parquet`` with the metadata of every row, failures included.
  A tar without that sidecar is read on its own (every sample a success).

Paths go through Beam's ``FileSystems``, so ``gs://`` and ``s3://`` work as
local paths do. A row's key is the input's ``key``; a row without one (no
key column, or a null key) gets ``{shard}_{row:09d}``, its place in the shard.

Damaged input. A Parquet shard is read row group by row group: a row group
that cannot be read becomes failed rows at stage ``read`` (with their keys,
URLs and captions when the columns other than the image still read, else
with ``{shard}_{row:09d}`` keys), and reading goes on with the next one. A
tar that breaks (a truncated member, a garbled header, bytes after its last
sample that are not tar's end-of-archive blocks) stops there: the sidecar's
rows after the break fail at ``read``; without a sidecar, the rows after it
are unknown. A Parquet file whose footer cannot be read (a truncated file) is
``DamagedShardError``: nothing of it can be read. Every such finding is in
``ShardReader.damage``, and the shard is recorded as damaged, not retried.

Which errors are the data's: an exception that pyarrow or tarfile raises on
bytes it did get (``ArrowInvalid``, an ``OSError`` such as "Couldn't
deserialize thrift", ``tarfile.ReadError``, ...) is permanent: rereading the
same bytes gives the same error. An exception that the file object itself
raises (the local disk, or a network error reading ``gs://`` that arrives as
``ConnectionError``, also an ``OSError``) is the storage's and may pass: it is
raised, and the shard is left unfinished and retried by the next run. Reads go
through ``_Storage``, which remembers its own errors, so the rule does not
depend on exception types that both sides share.

In a folder that img2dataset wrote, img2dataset writes ``{shard}_stats.json``
after the shard. A shard without it is processed, with a warning
(``InputShard.stats_missing``): when it reads whole, it is complete (its
download died after writing it, or the stats file was removed). When it does
not, its download is most likely still running, or died and will be redone by
img2dataset's next (incremental) run, so the shard is left unfinished (retried
by a rerun), never recorded as damaged nor skipped silently.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from capfilt.columns import IMAGE_COLUMNS, INPUT_COLUMNS, INPUT_ERROR, INPUT_STAGE, INPUT_URL
from capfilt.pipelines.schema import passthrough_fields

log = logging.getLogger(__name__)

SUCCESS = "success"
READ = "read"  # the stage of a row whose bytes could not be read (schema.STAGES)
READ_BATCH_ROWS = 256
TAR_LOOKAHEAD = 256  # samples a tar is read ahead to find a sidecar row's sample (they come in the sidecar's order)
TAR_TAIL_BYTES = 1 << 20  # at most this much of a tar after its last sample is checked to be end-of-archive zeros
MAX_DAMAGE_NOTES = 5  # damage descriptions kept per shard (the rest are counted)
# What pyarrow and tarfile raise on bytes that are not what they should be (when the file object raised nothing).
DATA_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError, tarfile.TarError, zlib.error)
_BASE_COLUMNS = ("key", "url", "caption", "status", "error_message", *INPUT_COLUMNS)


class ShardError(ValueError):
    """An input that is not a shard capfilt can read, with the reason."""


class DamagedShardError(Exception):
    """An input shard of which nothing can be read (its Parquet footer or schema): permanent, not a retry."""

    def __init__(self, path: str, error: str):
        super().__init__(f"{path}: {error}")
        self.path, self.error = path, error


@dataclass(frozen=True)
class InputShard:
    """One input file: a Parquet shard or a tar (with its metadata Parquet when img2dataset wrote one)."""

    shard_id: str  # the output files' stem
    path: str
    sidecar: str | None = None
    download_stats: str | None = None  # img2dataset's {shard}_stats.json, when there is one
    stats_missing: bool = False  # in an img2dataset folder but without its _stats.json: the download may be running

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
    input_error: str | None = None  # why the row fails before download or decoding: see ``input_stage``
    input_stage: str | None = None  # its stage: parse (also when null), download (a refused URL), read (damage)
    index: int = 0  # the row's place in its shard, from 0 (the sidecar's row for a tar)
    key_made: bool = False  # the input had no key for the row: ``key`` is ``row_key(shard, index)``


def row_key(shard_id: str, index: int) -> str:
    """The stable key of a row the input gives no key: its shard and place, ``{shard}_{row:09d}``."""
    return f"{shard_id}_{index:09d}"


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def without_addresses(text: str) -> str:
    """``text`` without memory addresses (`` at 0x7f...``), so that a rerun writes the same error text."""
    return _ADDRESS.sub("", text)


def error_text(error: BaseException) -> str:
    """``Type: message`` without memory addresses."""
    return without_addresses(f"{type(error).__name__}: {error}")


def describe(error: BaseException) -> str:
    """``error_text`` on one line: a damage note of the shard's."""
    return " ".join(error_text(error).split())


class _Storage:
    """A file object that remembers the errors its own calls raise: those are the storage's, not the data's."""

    def __init__(self, file):
        self._file = file
        self.error: BaseException | None = None

    def _call(self, name: str, *args):
        try:
            return getattr(self._file, name)(*args)
        except Exception as error:
            self.error = error
            raise

    def read(self, *args):
        return self._call("read", *args)

    def readinto(self, buffer):
        return self._call("readinto", buffer)

    def seek(self, *args):
        return self._call("seek", *args)

    def tell(self):
        return self._call("tell")

    def __getattr__(self, name):
        return getattr(self._file, name)


def _is_data_error(error: BaseException, storage: _Storage) -> bool:
    """Whether ``error``, raised reading through ``storage``, is the bytes' fault (permanent), not the storage's."""
    if storage.error is not None or isinstance(error, MemoryError):
        return False
    return isinstance(error, DATA_ERRORS)


def _open_parquet(storage: _Storage, path: str) -> pq.ParquetFile:
    """The Parquet file's reader (its footer read), or ``DamagedShardError`` when the footer is not Parquet."""
    try:
        return pq.ParquetFile(storage)
    except Exception as error:
        if _is_data_error(error, storage):
            raise DamagedShardError(path, describe(error)) from error
        raise


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
        stats = {_stem_of_stats(p): p for p in _glob(folder + "/*_stats.json")}  # img2dataset's per-shard stats
        if tars:
            sidecars = {_stem(p): p for p in parquets}
            shards = [InputShard(_stem(t), t, sidecars.get(_stem(t))) for t in tars]
        else:
            shards = [InputShard(_stem(p), p) for p in parquets]
        shards = [replace(s, download_stats=stats.get(s.shard_id)) for s in shards]
        if stats:  # written by img2dataset, which writes a shard's stats file after the shard
            missing = [s.shard_id for s in shards if s.shard_id not in stats]
            if missing:
                log.warning("%d shard(s) in %s have no img2dataset _stats.json (%s): their download may still be "
                            "running, or have died. They are processed; one that cannot be read is left unfinished "
                            "(rerun after the download), not recorded as damaged", len(missing), folder,
                            ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
            shards = [replace(s, stats_missing=s.shard_id not in stats) for s in shards]
        return shards
    if any(ch in location for ch in "*?["):
        return [shard for path in _glob(location) for shard in _shards_at(path)]
    if not FileSystems.exists(location):
        raise ShardError(f"no such input: {location}")
    stats = posixpath.join(posixpath.dirname(location), _stem(location) + "_stats.json")
    stats = stats if FileSystems.exists(stats) else None
    if location.endswith(".tar"):
        sidecar = location[: -len(".tar")] + ".parquet"
        return [InputShard(_stem(location), location, sidecar if FileSystems.exists(sidecar) else None, stats)]
    if location.endswith(".parquet"):
        return [InputShard(_stem(location), location, download_stats=stats)]
    raise ShardError(f"{location}: an input shard is a .parquet or a .tar file")


def _stem_of_stats(path: str) -> str:
    return posixpath.basename(path)[: -len("_stats.json")]


def expected_rows(shard: InputShard) -> int | None:
    """The rows img2dataset says it wrote for the shard (its _stats.json ``count``), if it says."""
    if not shard.download_stats:
        return None
    try:
        with FileSystems.open(shard.download_stats) as f:
            count = json.loads(f.read()).get("count")
        return count if isinstance(count, int) else None
    except Exception as error:  # noqa: BLE001 - a courtesy for the damage report only
        log.debug("could not read %s: %s", shard.download_stats, error)
        return None


def image_column(schema: pa.Schema) -> str | None:
    """The image bytes column of an img2dataset Parquet schema, if any."""
    return next((name for name in IMAGE_COLUMNS if name in schema.names), None)


def _image_bytes(value: bytes | dict | None) -> bytes | None:
    """An image column's bytes: img2dataset's binary, or an HF datasets ``Image`` struct (capfilt's own kept/)."""
    return value.get("bytes") if isinstance(value, dict) else value


class ShardReader:
    """Reads one shard's rows in order; ``extra_fields`` and ``image_column`` describe its columns.

    ``damage`` lists what was found broken while reading (at most ``MAX_DAMAGE_NOTES``, ``damage_count`` in
    all); ``rows_lost`` is True when rows may be missing that no output row stands for (a tar without
    sidecar that breaks). Raises ``DamagedShardError`` when nothing of the shard can be read.
    """

    def __init__(self, shard: InputShard):
        self.shard = shard
        self.damage: list[str] = []
        self.damage_count = 0
        self.rows_lost = False
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
            return _open_parquet(_Storage(f), path).schema_arrow

    def _damaged(self, note: str) -> None:
        self.damage_count += 1
        if len(self.damage) < MAX_DAMAGE_NOTES:
            self.damage.append(note)

    def rows(self) -> Iterator[InputRow]:
        if self.shard.format == "parquet":
            with FileSystems.open(self.shard.path) as f:
                storage = _Storage(f)
                yield from self._parquet_rows(_open_parquet(storage, self.shard.path), storage, with_images=True)
        elif self.shard.sidecar:
            yield from self._tar_rows_with_sidecar()
        else:
            yield from self._tar_rows()

    def _parquet_rows(self, parquet: pq.ParquetFile, storage: _Storage, with_images: bool) -> Iterator[InputRow]:
        """Every row, row group by row group; a row group that does not read fails at ``read``, the rest go on."""
        names = parquet.schema_arrow.names
        metadata = [n for n in _BASE_COLUMNS if n in names] + [f.name for f in self.extra_fields]
        columns = metadata + ([self.image_column] if with_images else [])
        index = 0
        for group in range(parquet.num_row_groups):
            expected = parquet.metadata.row_group(group).num_rows
            read, error = 0, None
            batches = parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[group], columns=columns)
            while True:
                try:
                    batch = next(batches, None)
                except Exception as failure:
                    if not _is_data_error(failure, storage):
                        raise
                    error = describe(failure)
                    break
                if batch is None:
                    break
                values = batch.to_pydict()
                for i in range(batch.num_rows):
                    yield self._row(values, i, index, with_images)
                    index += 1
                read += batch.num_rows
            if error is None and read != expected:
                error = f"{read} rows where the footer says {expected}"
            if error is not None:
                yield from self._unreadable_rows(parquet, storage, group, read, expected, index, metadata, error)
                index += max(expected - read, 0)

    def _row(self, values: dict, i: int, index: int, with_images: bool) -> InputRow:
        key = values["key"][i] if "key" in values else None
        url = values["url"][i] if "url" in values else None
        if url is None and INPUT_URL in values:  # a URL refused before download: img2dataset saw none
            url = values[INPUT_URL][i]
        return InputRow(
            key=row_key(self.shard.shard_id, index) if key is None else str(key),
            url=url,
            caption=values["caption"][i] if "caption" in values else None,
            image=_image_bytes(values[self.image_column][i]) if with_images else None,
            status=(values["status"][i] if "status" in values else None) or SUCCESS,
            error=values["error_message"][i] if "error_message" in values else None,
            extra={f.name: values[f.name][i] for f in self.extra_fields},
            input_error=values[INPUT_ERROR][i] if INPUT_ERROR in values else None,
            input_stage=values[INPUT_STAGE][i] if INPUT_STAGE in values else None,
            index=index,
            key_made=key is None,
        )

    def _unreadable_rows(self, parquet: pq.ParquetFile, storage: _Storage, group: int, read: int, expected: int,
                         index: int, metadata: list[str], error: str) -> Iterator[InputRow]:
        """The rows of a row group that did not read: their metadata if it reads without the image, failed at read."""
        count = max(expected - read, 0)
        self._damaged(f"row group {group} (rows {index}-{index + count - 1}) cannot be read: {error}")
        values = None
        try:
            table = parquet.read_row_group(group, columns=metadata)
            if table.num_rows == expected:
                values = table.slice(read).to_pydict()
        except Exception as failure:
            if not _is_data_error(failure, storage):
                raise
        reason = f"row group {group} of the input shard cannot be read: {error}"
        for i in range(count):
            if values is None:
                yield InputRow(key=row_key(self.shard.shard_id, index + i), url=None, caption=None, image=None,
                               status=SUCCESS, extra={f.name: None for f in self.extra_fields}, input_error=reason,
                               input_stage=READ, index=index + i, key_made=True)
                continue
            row = self._row(values, i, index + i, with_images=False)
            if not row.input_error and row.status == SUCCESS:  # a failed download or refused URL stays what it is
                row.input_error, row.input_stage = reason, READ
            yield row

    def _tar_rows_with_sidecar(self) -> Iterator[InputRow]:
        """The sidecar's rows, each success with its sample from the tar (which holds them in the sidecar's order)."""
        with FileSystems.open(self.shard.sidecar) as meta, FileSystems.open(self.shard.path) as tar_file:
            meta_storage, tar_storage = _Storage(meta), _Storage(tar_file)
            parquet = _open_parquet(meta_storage, self.shard.sidecar)
            samples = _tar_samples(tar_storage)
            pending: dict[str, dict[str, bytes]] = {}
            broken, ended = None, False
            for row in self._parquet_rows(parquet, meta_storage, with_images=False):
                if row.status != SUCCESS or row.input_error:
                    yield row
                    continue
                if row.key_made:
                    row.input_error, row.input_stage = "the sidecar has no key for this row: no sample to read", READ
                    self._damaged(f"sidecar row {row.index} has no key")
                    yield row
                    continue
                while row.key not in pending and broken is None and not ended and len(pending) < TAR_LOOKAHEAD:
                    try:
                        key, members = next(samples)
                    except StopIteration:
                        ended = True
                        break
                    except Exception as error:
                        if not _is_data_error(error, tar_storage):
                            raise
                        broken = describe(error)
                        self._damaged(f"the tar breaks after {row.index} sidecar rows: {broken}")
                        break
                    pending[key] = members
                if row.key in pending:
                    for earlier in list(pending):  # samples before this one: their sidecar rows are gone
                        if earlier == row.key:
                            break
                        del pending[earlier]
                    row.image = pending.pop(row.key).get(self.image_column)  # None: fails at decode
                elif broken is not None:
                    row.input_error, row.input_stage = f"the tar breaks before this sample: {broken}", READ
                else:
                    row.input_error = (f"a success in the sidecar, but its sample is not in the tar (within "
                                       f"{TAR_LOOKAHEAD} samples of where it belongs)")
                    row.input_stage = READ
                    self._damaged(f"sample {row.key} (sidecar row {row.index}) is not in the tar")
                yield row

    def _tar_rows(self) -> Iterator[InputRow]:
        """A tar without sidecar: each sample a success; the rows after a break are unknown."""
        with FileSystems.open(self.shard.path) as tar_file:
            storage = _Storage(tar_file)
            samples = _tar_samples(storage)
            index = 0
            while True:
                try:
                    key, members = next(samples)
                except StopIteration:
                    return
                except Exception as error:
                    if not _is_data_error(error, storage):
                        raise
                    self._damaged(f"the tar breaks after {index} samples: {describe(error)}")
                    self.rows_lost = True
                    return
                yield self._tar_row(key, members, index)
                index += 1

    def _tar_row(self, key: str, members: dict[str, bytes], index: int) -> InputRow:
        row = InputRow(key=key, url=None, caption=None, image=members.get(self.image_column), status=SUCCESS,
                       index=index)
        try:
            meta = json.loads(members["json"]) if "json" in members else {}
            if not isinstance(meta, dict):
                raise ValueError(f"{key}.json holds a {type(meta).__name__}, not an object")
            row.url = meta.get("url")
            row.caption = members["txt"].decode("utf-8") if "txt" in members else meta.get("caption")
        except ValueError as error:  # JSON or UTF-8 that does not decode: this sample's bytes are damaged
            row.image, row.input_error, row.input_stage = None, f"sample {key}: {describe(error)}", READ
            self._damaged(f"sample {key}: {describe(error)}")
        return row


def _tar_samples(fileobj: _Storage) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each webdataset sample, streaming, in file order.

    Raises ``tarfile.ReadError`` where the tar breaks, also where tarfile itself would stop without a word (a
    garbled header after the first, a file cut at a member's end): the bytes after the last member must be
    tar's end-of-archive zeros. The sample being read when the tar breaks is not yielded (it may be partial).
    """
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
        end = tar.offset
    _check_tar_end(fileobj, end)
    if key is not None:
        yield key, members


def _check_tar_end(fileobj: _Storage, end: int) -> None:
    """Raise ``tarfile.ReadError`` unless the bytes from ``end`` (after the last member) are end-of-archive zeros."""
    seekable = getattr(fileobj, "seekable", None)
    if seekable is None or not seekable():
        return  # cannot look back: tarfile's own checks only
    fileobj.seek(end)
    tail = fileobj.read(TAR_TAIL_BYTES)
    if tail.strip(b"\0"):
        raise tarfile.ReadError(f"the bytes at offset {end} are not a tar header (garbled, or a member cut short)")
    if len(tail) < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"it ends at byte {end} without tar's end-of-archive blocks (cut short)")

