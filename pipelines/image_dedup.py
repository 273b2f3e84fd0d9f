"""``--dedup-images`` across shards: at a run's end, the kept texts of an image an earlier shard kept move to rejected/.

The rule: of the images with the same bytes (SHA-256), the one kept is the
first in (shard id, row) order that has a kept text; the kept texts of the
others go to rejected/ with reason ``duplicate image``. Within a shard the
pipeline applies it as it goes (``capfilt.pipelines.process``). Across shards
it cannot: a shard is judged and committed on its own, by whichever worker,
in whatever order, and no shard can wait for the others. So it runs after the
shards, in the run's summary step (``drop_duplicate_images``), over every
finished shard of the output folder:

1. read each finished shard's ``.capfilt/done/{shard}.images`` (the 64-bit hashes of
   its images with a kept text; ``capfilt.pipelines.stats.HashTally``) and
   find, per shard, the hashes that a shard with a smaller id holds too
   (``held_earlier``: one sort of all hashes, 8 bytes per kept image);
2. for each shard with such hashes, move the kept rows of those images
   (``move_rows``): record them in ``.capfilt/done/{shard}.dedup`` (their
   ``sample_id``s and sources), write rejected/ with them (reason
   ``duplicate image``, the image bytes left out, each row once), then kept/
   without them, each through a temporary file renamed into place.

The outcome is a function of the set of finished shards, not of the order
they ran in: a shard finished later with a smaller id takes the image from a
larger one at the next run's end (every run ends with this step, also a run
that had nothing left to do). It is idempotent: a step killed between its
renames leaves a row in both files until the next run's end finishes the
move; the record, written first, holds the moved rows once. The run's counts
are the shards' markers with their records applied (``apply_record``). A
shard committed again (two jobs on one shard) loses its record with its old
files, and the next run's end moves its rows again.

Cost: the sort holds about 40 bytes per kept image at its peak (under 500 MB
for 12 million); a shard with rows to move is read and written once more (kept/
streamed a row group at a time), ``THREADS`` shards at a time. Two different
images share a 64-bit hash with probability about n²/2⁶⁵ (4·10⁻⁶ for 12
million images); such a pair would lose its later image.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from capfilt.columns import IMAGE_COLUMNS
from capfilt.pipelines.layout import KEPT, REJECTED, OutputLayout, read_text
from capfilt.pipelines.parquet_writer import ROW_GROUP_ROWS
from capfilt.pipelines.schema import DUPLICATE_IMAGE, SOURCES
from capfilt.pipelines.stats import KEY_HASH_DTYPE, image_hash

THREADS = 8  # shards rewritten at a time (the work is file I/O and Parquet coding, which release the GIL)
# rejected/ (no image bytes) is rewritten whole, in row groups of this many rows; kept/ keeps ROW_GROUP_ROWS
REJECTED_GROUP_ROWS = 16 * ROW_GROUP_ROWS

log = logging.getLogger(__name__)


def held_earlier(shards: Iterable[tuple[str, bytes]]) -> dict[str, np.ndarray]:
    """From each shard's image hashes file: per shard id, its hashes (sorted) that a shard with a smaller id has.

    Shards without any such hash are left out.
    """
    names, parts = [], []
    for name, data in shards:
        names.append(name)
        parts.append(np.frombuffer(data, dtype=KEY_HASH_DTYPE))
    if not parts:
        return {}
    owner = np.repeat(np.arange(len(parts), dtype=np.int32), [part.size for part in parts])
    hashes = np.concatenate(parts)
    del parts  # the files' bytes
    rank = np.argsort(np.argsort(names, kind="stable")).astype(np.int32)  # each shard's place in id order
    order = np.lexsort((rank[owner], hashes))  # by hash, then by shard id: a hash's first entry is its smallest shard
    ordered = hashes[order]
    later = np.zeros(hashes.size, dtype=bool)
    later[order[1:]] = ordered[1:] == ordered[:-1]
    del order, ordered
    found = {}
    for index in np.unique(owner[later]):
        found[names[index]] = np.sort(hashes[later & (owner == index)])
    return found


def read_record(layout: OutputLayout, shard_id: str) -> dict[str, str]:
    """The rows moved out of a shard's kept/ so far: ``sample_id`` -> source (empty if none)."""
    path = layout.dedup_file(shard_id)
    return json.loads(read_text(path))["moved"] if FileSystems.exists(path) else {}


def apply_record(marker: dict, record: dict[str, str]) -> dict:
    """A shard's marker with the rows its record moved counted as rejected (``duplicate image``), not kept."""
    if not record:
        return marker
    marker = json.loads(json.dumps(marker))  # a deep copy
    for source in SOURCES:
        moved = sum(1 for s in record.values() if s == source)
        marker["kept"][source] -= moved
        marker["rejected"][source] += moved
        marker["rejected_reasons"][DUPLICATE_IMAGE][source] += moved
    return marker


def move_rows(layout: OutputLayout, shard_id: str, hashes: np.ndarray) -> int:
    """Move the kept rows of ``shard_id`` whose image hash is in ``hashes`` (sorted) to its rejected/; the rows
    moved now (0 when none is left in kept/)."""
    kept_path, rejected_path = layout.output(KEPT, shard_id), layout.output(REJECTED, shard_id)
    if not FileSystems.exists(kept_path):  # a damaged shard of which nothing could be read
        return 0
    with FileSystems.open(kept_path) as f:
        kept_file = pq.ParquetFile(f)
        names = kept_file.schema_arrow.names
        image = next(name for name in names if name in IMAGE_COLUMNS)
        kept = kept_file.read(columns=[name for name in names if name != image])
    row_hashes = np.fromiter((image_hash(h) for h in kept.column("image_sha256").to_pylist()), dtype=KEY_HASH_DTYPE,
                             count=kept.num_rows)
    mask = np.isin(row_hashes, hashes)
    if not mask.any():
        return 0
    moved = kept.filter(pa.array(mask))
    record = {**read_record(layout, shard_id),
              **dict(zip(moved.column("sample_id").to_pylist(), moved.column("source").to_pylist()))}
    layout.write_atomically(layout.dedup_file(shard_id), json.dumps({"moved": record}, sort_keys=True) + "\n")

    folder = layout.temp_dir(shard_id)
    temp_rejected, temp_kept = FileSystems.join(folder, "rejected.parquet"), FileSystems.join(folder, "kept.parquet")
    try:
        with FileSystems.open(rejected_path) as f:
            rejected = pq.read_table(f)
        again = pc.is_in(rejected.column("sample_id"), value_set=moved.column("sample_id"))  # a killed move's
        earlier = rejected.filter(pc.invert(again))
        moved = moved.append_column("reason", pa.array([DUPLICATE_IMAGE] * moved.num_rows, pa.string()))
        moved = moved.select(rejected.schema.names).cast(rejected.schema)
        _write(temp_rejected, pa.concat_tables([earlier, moved]))
        with FileSystems.open(kept_path) as f, FileSystems.create(temp_kept) as out:
            kept_file = pq.ParquetFile(f)
            with pq.ParquetWriter(out, kept_file.schema_arrow) as writer:
                start = 0
                for batch in kept_file.iter_batches(batch_size=ROW_GROUP_ROWS):
                    keep = ~mask[start:start + batch.num_rows]
                    start += batch.num_rows
                    if keep.any():
                        writer.write_batch(batch.filter(pa.array(keep)))
        layout.replace_files([temp_rejected, temp_kept], [rejected_path, kept_path])  # rejected/ first: no row is lost
    finally:
        layout.discard(folder)
    return int(mask.sum())


def _write(path: str, table: pa.Table) -> None:
    with FileSystems.create(path) as out:
        pq.write_table(table, out, row_group_size=REJECTED_GROUP_ROWS)


def drop_duplicate_images(layout: OutputLayout) -> dict:
    """Apply the rule across every finished shard of ``layout``; returns ``{"shards": n, "texts": n}`` moved now."""
    shard_ids = sorted(layout.done_ids())
    held = held_earlier(layout.read_image_hashes(shard_ids))
    with ThreadPoolExecutor(THREADS, thread_name_prefix="capfilt-dedup") as pool:
        moved = dict(zip(held, pool.map(lambda shard: move_rows(layout, shard, held[shard]), held)))
    done = {shard: n for shard, n in moved.items() if n}
    if done:
        log.info("duplicate images across shards: %d kept texts of %d shard(s) moved to rejected/",
                 sum(done.values()), len(done))
    return {"shards": len(done), "texts": sum(done.values())}
