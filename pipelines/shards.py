"""Input shards: img2dataset's Parquet or webdataset shards, listed and read row by row, in key order.

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

Paths are literal where they exist: a folder or file named ``a[1]`` or ``b*c``
is that folder or file, and a folder's shards are listed with its name taken
literally (``capfilt.pipelines.paths``). A location that does not exist and
holds ``*``, ``?`` or ``[`` is a glob (Beam's ``FileSystems.match``); its folder
part is literal when that folder exists (``data[1]/*.parquet``: the Parquet
files in the folder ``data[1]``).

Key order. img2dataset writes a shard's rows in the order their downloads
finish, not in the order of the URL list; its keys are the list's row
numbers, zero-padded, so sorting them as strings gives the list's order back
(an integer key column sorts as numbers). The reader yields the rows in key
order, and a row's ``index``, which the output's ``sample_id`` is made of, is
its place in that order: what is written does not depend on download timing.
Rows without a key (no key column, a null key, a key that cannot be read)
keep their place in the file, and the rows with keys fill the other places in
key order. The keys are read first (the key column; for a tar without sidecar,
its headers, seeking past the data where the file can seek). A shard already
in key order (capfilt's own outputs, the demo's shards) is then read in one stream,
as if there were no key pass. One that is not is read in file order too, each
row held in memory until the rows before it in key order have gone out. The
rows held are those read ahead of an earlier key still to come: in a download
shard, those that finished while an earlier URL was still downloading, which
is most of the shard when a URL near the start of the list timed out; at worst
the whole shard, images included, which img2dataset itself held in memory to
write it. Nothing is spilled to disk.

Mistyped columns. img2dataset's columns ``key``, ``url``, ``caption``,
``status``, ``error_message`` and capfilt's ``capfilt_*`` columns are strings
(an integer ``key`` column is taken as decimal text: the key stays the same
number); the image column is binary (or an HF ``Image`` struct). When a
column has another type (a ``caption`` of ints or of lists, a ``url`` of
ints), every row of the shard fails at stage ``read`` naming the column and
its type (``column caption is int64, not a string``), the column's values are
not written, and the rest of each row is; in a tar without sidecar a sample
whose ``.json`` holds a ``url`` or ``caption`` that is not a string fails the
same way. Each such column is a damage note of the shard's.

Tar members are read only up to a size: ``MAX_IMAGE_MEMBER_BYTES`` for an
image, ``MAX_TEXT_MEMBER_BYTES`` for a ``.txt`` or ``.json``; a larger one is
skipped without being read into memory and its sample fails at ``read``,
naming the member and its size. Members of other extensions are skipped.

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
by a rerun), never recorded as damaged nor skipped silently. Damage that an
unfinished download cannot leave (a mistyped column, a sample's bad ``.json``
or ``.txt``, an oversized member) does not count for that
(``ShardReader.unfinished_damage``).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from capfilt.columns import IMAGE_COLUMNS, INPUT_COLUMNS, INPUT_ERROR, INPUT_STAGE, INPUT_URL
from capfilt.pipelines.paths import glob_in, has_wildcards, is_remote
from capfilt.pipelines.schema import passthrough_fields

log = logging.getLogger(__name__)

SUCCESS = "success"
READ = "read"  # the stage of a row whose bytes could not be read (schema.STAGES)
READ_BATCH_ROWS = 256
TAR_LOOKAHEAD = 256  # samples a tar is read ahead to find a sidecar row's sample (they come in the sidecar's order)
TAR_TAIL_BYTES = 1 << 20  # at most this much of a tar after its last sample is checked to be end-of-archive zeros
MAX_DAMAGE_NOTES = 5  # damage descriptions kept per shard (the rest are counted)
# Tar members read at most (a larger one fails its sample at read, unread): an image well above what
# BootstrapSettings.max_image_pixels lets through as a JPEG, img2dataset's .txt and .json many times over.
MAX_IMAGE_MEMBER_BYTES = 64 << 20
MAX_TEXT_MEMBER_BYTES = 1 << 20
# What pyarrow and tarfile raise on bytes that are not what they should be (when the file object raised nothing).
DATA_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError, tarfile.TarError, zlib.error)
_BASE_COLUMNS = ("key", "url", "caption", "status", "error_message", *INPUT_COLUMNS)  # all strings


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
    index: int = 0  # the row's place in its shard in key order, from 0 (see the module's docstring)
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


def _is_dir(path: str) -> bool:
    """Whether ``path``, taken literally, is a folder (on an object store: a prefix that holds files)."""
    if not is_remote(path):
        return os.path.isdir(path)
    if path.endswith((".parquet", ".tar")):
        return False
    return not has_wildcards(path) or bool(glob_in(path, "*"))


def _match(pattern: str) -> list[str]:
    """The files a glob pattern matches; its folder part is literal when that folder exists."""
    folder, name = posixpath.split(pattern) if is_remote(pattern) else os.path.split(pattern)
    if folder and has_wildcards(folder) and _is_dir(folder):
        return glob_in(folder, name)
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def list_shards(location: str | os.PathLike | list) -> list[InputShard]:
    """The shards at a folder, a glob, a file or a list of them, sorted by id; ids must be unique.

    A location that exists is literal, whatever characters its name holds; one that does not and holds ``*``,
    ``?`` or ``[`` is a glob (``_match``).
    """
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
        tars = glob_in(folder, "*.tar")
        parquets = glob_in(folder, "*.parquet")
        stats = {_stem_of_stats(p): p for p in glob_in(folder, "*_stats.json")}  # img2dataset's per-shard stats
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
    if has_wildcards(location) and not FileSystems.exists(location):
        return [shard for path in _match(location) for shard in _shards_at(path)]
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


def _is_text(type_: pa.DataType) -> bool:
    if pa.types.is_dictionary(type_):
        return _is_text(type_.value_type)
    return pa.types.is_null(type_) or pa.types.is_string(type_) or pa.types.is_large_string(type_) or \
        pa.types.is_string_view(type_)


def _is_binary(type_: pa.DataType) -> bool:
    return pa.types.is_null(type_) or pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or \
        pa.types.is_binary_view(type_) or pa.types.is_fixed_size_binary(type_)


def mistyped_columns(schema: pa.Schema, image: str | None) -> dict[str, str]:
    """The columns capfilt reads whose type it cannot take, each with its error (see the module's docstring)."""
    wrong = {}
    for name in _BASE_COLUMNS:
        if name not in schema.names:
            continue
        type_ = schema.field(name).type
        if name == "key" and pa.types.is_integer(type_):
            continue  # taken as decimal text
        if not _is_text(type_):
            wrong[name] = f"column {name} is {type_}, not a string"
    if image is not None and image in schema.names:
        type_ = schema.field(image).type
        struct = pa.types.is_struct(type_) and type_.get_field_index("bytes") >= 0  # an HF datasets Image
        if not _is_binary(type_.field("bytes").type if struct else type_):
            wrong[image] = f"column {image} is {type_}, not binary image bytes"
    return wrong


def key_order(keys: Sequence | None) -> list[int] | None:
    """The file positions in key order: ``order[place]`` is the position of the row at ``place``; None when that
    is file order (``keys`` None: no row has a key).

    ``keys`` are the rows' keys in file order, None for a row without one. Rows without a key keep their place;
    the rows with keys fill the other places in key order (equal keys in file order).
    """
    if keys is None:
        return None
    keyed = [position for position, key in enumerate(keys) if key is not None]
    ordered = sorted(keyed, key=lambda position: (keys[position], position))
    if ordered == keyed:
        return None
    order = list(range(len(keys)))
    for place, position in zip(keyed, ordered):
        order[place] = position
    return order


def _in_order(rows: Iterator[InputRow], order: list[int], shard_id: str) -> Iterator[InputRow]:
    """``rows``, read in file order (``index`` their position), in ``order``, each held back only until the rows
    before it have gone out; ``index`` becomes the place (and a made key is made again from it).

    A position the file no longer gives (it broke where the key pass read on) is skipped at the end; a row the key
    pass did not see keeps its position.
    """
    place = {position: at for at, position in enumerate(order)}
    held: dict[int, InputRow] = {}
    at = 0

    def placed(row: InputRow) -> InputRow:
        row.index = place.get(row.index, row.index)
        if row.key_made:
            row.key = row_key(shard_id, row.index)
        return row

    for row in rows:
        held[row.index] = row
        while at < len(order) and order[at] in held:
            yield placed(held.pop(order[at]))
            at += 1
    for position in order[at:]:
        if position in held:
            yield placed(held.pop(position))
    for position in sorted(held):
        yield placed(held.pop(position))


class ShardReader:
    """Reads one shard's rows in key order; ``extra_fields`` and ``image_column`` describe its columns.

    ``damage`` lists what was found broken while reading (at most ``MAX_DAMAGE_NOTES``, ``damage_count`` in
    all; ``unfinished_damage`` of them of a kind an unfinished download leaves); ``rows_lost`` is True when rows
    may be missing that no output row stands for (a tar without sidecar that breaks). ``mistyped``: the columns
    whose type capfilt cannot take, each with its error. Raises ``DamagedShardError`` when nothing of the shard
    can be read.
    """

    def __init__(self, shard: InputShard):
        self.shard = shard
        self.damage: list[str] = []
        self.damage_count = 0
        self.unfinished_damage = 0
        self.rows_lost = False
        if shard.format == "parquet":
            self._metadata_schema = self._parquet_schema(shard.path)
            self.image_column = image_column(self._metadata_schema)
            if self.image_column is None:
                raise ShardError(
                    f"{shard.path} has no image column ({', '.join(IMAGE_COLUMNS)}): is it a URL list? "
                    "Give it as DATA to download it first."
                )
            self.mistyped = mistyped_columns(self._metadata_schema, self.image_column)
        else:
            self._metadata_schema = self._parquet_schema(shard.sidecar) if shard.sidecar else pa.schema([])
            self.image_column = "jpg"
            self.mistyped = mistyped_columns(self._metadata_schema, None)
        self.extra_fields = passthrough_fields(self._metadata_schema)
        self._mistyped_error = "; ".join(self.mistyped.values()) or None
        for error in self.mistyped.values():
            self._damaged(f"{error}: every row fails at read", unfinished=False)

    @staticmethod
    def _parquet_schema(path: str) -> pa.Schema:
        with FileSystems.open(path) as f:
            return _open_parquet(_Storage(f), path).schema_arrow

    def _damaged(self, note: str, unfinished: bool = True) -> None:
        """Note damage; ``unfinished``: of a kind an unfinished download leaves (a file cut short)."""
        self.damage_count += 1
        self.unfinished_damage += unfinished
        if len(self.damage) < MAX_DAMAGE_NOTES:
            self.damage.append(note)

    def rows(self) -> Iterator[InputRow]:
        """Every row, in key order (the module's docstring): the keys are read first, then the rows."""
        order = key_order(self._keys())
        rows = self.file_rows()
        yield from rows if order is None else _in_order(rows, order, self.shard.shard_id)

    def file_rows(self) -> Iterator[InputRow]:
        """Every row in file order, ``index`` its position in the file (the sidecar's row for a tar): the rows
        (and the ``sample_id`` rows) of output schema versions up to 3."""
        if self.shard.format == "parquet":
            with FileSystems.open(self.shard.path) as f:
                storage = _Storage(f)
                yield from self._parquet_rows(_open_parquet(storage, self.shard.path), storage, with_images=True)
        elif self.shard.sidecar:
            yield from self._tar_rows_with_sidecar()
        else:
            yield from self._tar_rows()

    def _keys(self) -> list | None:
        """Each row's key in file order (None: the row has none), or None when no row has one."""
        if self.shard.format == "parquet" or self.shard.sidecar:
            return self._parquet_keys(self.shard.path if self.shard.format == "parquet" else self.shard.sidecar)
        with FileSystems.open(self.shard.path) as tar_file:
            storage = _Storage(tar_file)
            keys = []
            try:
                for key in _tar_sample_keys(storage):
                    keys.append(key)
            except Exception as error:  # the rows pass finds and notes the same break
                if not _is_data_error(error, storage):
                    raise
            return keys

    def _parquet_keys(self, path: str) -> list | None:
        """The key column's values, row group by row group; a row group whose keys do not read has none."""
        if "key" not in self._metadata_schema.names or "key" in self.mistyped:
            return None
        keys: list = []
        with FileSystems.open(path) as f:
            storage = _Storage(f)
            parquet = _open_parquet(storage, path)
            for group in range(parquet.num_row_groups):
                expected = parquet.metadata.row_group(group).num_rows
                values = [None] * expected
                try:
                    column = parquet.read_row_group(group, columns=["key"]).column("key")
                    if len(column) == expected:
                        values = column.to_pylist()
                except Exception as error:  # the rows pass finds and notes the same damage
                    if not _is_data_error(error, storage):
                        raise
                keys += values
        return keys

    def _parquet_rows(self, parquet: pq.ParquetFile, storage: _Storage, with_images: bool) -> Iterator[InputRow]:
        """Every row, row group by row group; a row group that does not read fails at ``read``, the rest go on."""
        names = parquet.schema_arrow.names
        metadata = [n for n in _BASE_COLUMNS if n in names and n not in self.mistyped] + \
            [f.name for f in self.extra_fields]
        images = [self.image_column] if with_images and self.image_column not in self.mistyped else []
        index = 0
        for group in range(parquet.num_row_groups):
            expected = parquet.metadata.row_group(group).num_rows
            read, error = 0, None
            batches = parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[group], columns=metadata + images)
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
                    yield self._row(values, i, index)
                    index += 1
                read += batch.num_rows
            if error is None and read != expected:
                error = f"{read} rows where the footer says {expected}"
            if error is not None:
                yield from self._unreadable_rows(parquet, storage, group, read, expected, index, metadata, error)
                index += max(expected - read, 0)

    def _row(self, values: dict, i: int, index: int) -> InputRow:
        """Row ``i`` of ``values`` (the columns read; a mistyped one is not), at ``index``."""
        def value(column: str):
            return values[column][i] if column in values else None

        key, url, status = value("key"), value("url"), value("status")
        if url is None and "url" not in self.mistyped:  # a URL refused before download: img2dataset saw none
            url = value(INPUT_URL)
        row = InputRow(
            key=row_key(self.shard.shard_id, index) if key is None else str(key),
            url=url,
            caption=value("caption"),
            image=_image_bytes(value(self.image_column)),
            status=None if "status" in self.mistyped else status or SUCCESS,
            error=value("error_message"),
            extra={f.name: values[f.name][i] for f in self.extra_fields},
            input_error=value(INPUT_ERROR),
            input_stage=value(INPUT_STAGE),
            index=index,
            key_made=key is None,
        )
        if self._mistyped_error:  # before any other reason: the row cannot be read as it is
            row.image, row.input_error, row.input_stage = None, self._mistyped_error, READ
        return row

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
            row = self._row(values, i, index + i)
            if not row.input_error and row.status == SUCCESS:  # a failed download or refused URL stays what it is
                row.input_error, row.input_stage = reason, READ
            yield row

    def _tar_rows_with_sidecar(self) -> Iterator[InputRow]:
        """The sidecar's rows, each success with its sample from the tar (which holds them in the sidecar's order)."""
        with FileSystems.open(self.shard.sidecar) as meta, FileSystems.open(self.shard.path) as tar_file:
            meta_storage, tar_storage = _Storage(meta), _Storage(tar_file)
            parquet = _open_parquet(meta_storage, self.shard.sidecar)
            samples = _tar_samples(tar_storage)
            pending: dict[str, _Sample] = {}
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
                        sample = next(samples)
                    except StopIteration:
                        ended = True
                        break
                    except Exception as error:
                        if not _is_data_error(error, tar_storage):
                            raise
                        broken = describe(error)
                        self._damaged(f"the tar breaks after {row.index} sidecar rows: {broken}")
                        break
                    pending[sample.key] = sample
                if row.key in pending:
                    for earlier in list(pending):  # samples before this one: their sidecar rows are gone
                        if earlier == row.key:
                            break
                        del pending[earlier]
                    sample = pending.pop(row.key)
                    if sample.too_large:
                        self._oversized(row, sample)
                    else:
                        row.image = sample.members.get(self.image_column)  # None: fails at decode
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
                    sample = next(samples)
                except StopIteration:
                    return
                except Exception as error:
                    if not _is_data_error(error, storage):
                        raise
                    self._damaged(f"the tar breaks after {index} samples: {describe(error)}")
                    self.rows_lost = True
                    return
                yield self._tar_row(sample, index)
                index += 1

    def _tar_row(self, sample: _Sample, index: int) -> InputRow:
        key, members = sample.key, sample.members
        row = InputRow(key=key, url=None, caption=None, image=members.get(self.image_column), status=SUCCESS,
                       index=index)
        if sample.too_large:
            self._oversized(row, sample)
            return row
        try:
            meta = json.loads(members["json"]) if "json" in members else {}
            if not isinstance(meta, dict):
                raise ValueError(f"{key}.json holds a {type(meta).__name__}, not an object")
            row.url = meta.get("url")
            row.caption = members["txt"].decode("utf-8") if "txt" in members else meta.get("caption")
            for name, value in (("url", row.url), ("caption", row.caption)):
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{name} in {key}.json is {type(value).__name__}, not a string")
        except ValueError as error:  # JSON or UTF-8 that does not decode: this sample's bytes are damaged
            row.url = row.url if isinstance(row.url, str) else None
            row.caption = row.caption if isinstance(row.caption, str) else None
            row.image, row.input_error, row.input_stage = None, f"sample {key}: {describe(error)}", READ
            self._damaged(f"sample {key}: {describe(error)}", unfinished=False)
        return row

    def _oversized(self, row: InputRow, sample: _Sample) -> None:
        """Fail ``row`` at read: a member of its sample is larger than capfilt reads."""
        reason = f"sample {sample.key}: " + "; ".join(sample.too_large)
        row.image, row.input_error, row.input_stage = None, reason, READ
        self._damaged(reason, unfinished=False)


@dataclass
class _Sample:
    """One webdataset sample: its members' bytes by extension, and the members too large to read."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    too_large: list[str] = field(default_factory=list)


def _member_limit(extension: str) -> int | None:
    """The most bytes read of a member with this extension; None: not read (capfilt does not use it)."""
    if extension in IMAGE_COLUMNS:
        return MAX_IMAGE_MEMBER_BYTES
    return MAX_TEXT_MEMBER_BYTES if extension in ("txt", "json") else None


def _key_and_extension(member: tarfile.TarInfo) -> tuple[str, str]:
    """webdataset's rule: the member's name up to its first dot is its sample's key, the rest its extension."""
    key, _, extension = posixpath.basename(member.name).partition(".")
    return key, extension


def _tar_samples(fileobj: _Storage) -> Iterator[_Sample]:
    """Each webdataset sample, streaming, in file order; a member above its ``_member_limit`` is not read.

    Raises ``tarfile.ReadError`` where the tar breaks, also where tarfile itself would stop without a word (a
    garbled header after the first, a file cut at a member's end): the bytes after the last member must be
    tar's end-of-archive zeros. The sample being read when the tar breaks is not yielded (it may be partial).
    A member not read is sought past where the file can seek (local files, Beam's object store readers), else
    read through in tarfile's small blocks, never whole.
    """
    sample = None
    with tarfile.open(fileobj=fileobj, mode=_tar_mode(fileobj)) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, extension = _key_and_extension(member)
            if sample is None or key != sample.key:
                if sample is not None:
                    yield sample
                sample = _Sample(key)
            limit = _member_limit(extension)
            if limit is None:
                continue
            if member.size > limit:
                sample.too_large.append(f"member {member.name} is {member.size} bytes, over the {limit}-byte "
                                        f"limit for .{extension} members")
                continue
            sample.members[extension] = tar.extractfile(member).read()
        end = tar.offset
    _check_tar_end(fileobj, end)
    if sample is not None:
        yield sample


def _tar_mode(fileobj: _Storage) -> str:
    """tarfile's mode: random access (it seeks past data it does not read) where the file can seek, else a stream."""
    seekable = getattr(fileobj, "seekable", None)
    return "r:" if seekable is not None and seekable() else "r|"


def _tar_sample_keys(fileobj: _Storage) -> Iterator[str]:
    """The samples' keys in file order, from the members' headers; the data is skipped (sought past, where the
    file can seek). Raises where the headers stop reading."""
    key = None
    with tarfile.open(fileobj=fileobj, mode=_tar_mode(fileobj)) as tar:
        while (member := tar.next()) is not None:
            if member.isfile() and _key_and_extension(member)[0] != key:
                key = _key_and_extension(member)[0]
                yield key


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

