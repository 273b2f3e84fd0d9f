"""Streaming image-text batches from Parquet files, deterministic and resumable.

Layouts, told apart by their column names (the image column is the first of
``jpg``, ``png``, ``webp``, ``jpeg`` (img2dataset's ``encode_format``) or ``image``):

- **capfilt** (the pipelines' ``kept/*.parquet``, or any table with ``text``
  and ``source``): the pair's text in ``text`` (a web text or a synthetic
  caption; ``caption`` there is the original web text and is not used).
  Every row is used: the pipeline kept only what the filter accepted.
- **img2dataset** (``--output_format parquet``): the text in ``caption``.
  Rows whose ``status`` is not ``success`` (img2dataset keeps failed
  downloads, with a null image) are skipped.
- **image-text**: any other table with an image column and ``text``.

An image column may also hold a struct with a ``bytes`` field (the Hugging
Face ``datasets`` image type). Rows with no image, no text or bytes that do
not decode are skipped (the next row of the same stream takes their place).

How a global batch is made: the files (one epoch's order: shuffled with the
seed and the epoch when ``shuffle``) are dealt to ``streams`` streams, file
``i`` to stream ``i % streams``; a stream reads its files one after another,
``block_rows`` rows at a time (rows shuffled within a block). A global batch
is ``batch_size / streams`` samples from each stream in stream order. Rank
``r`` of ``W`` reads only streams ``r*S/W ... (r+1)*S/W - 1``, i.e. its
contiguous slice of every global batch; so with the same ``streams`` any
number of processes sees the same global batches, and memory stays one block
per stream whatever the dataset's size. An epoch ends when a stream runs out.

Each sample's augmentation seed is derived from (seed, epoch, stream, file,
row), and a stream's position is (file, rows read): a resumed run continues
with exactly the batches an uninterrupted one would have seen.

Files that cannot be read (a truncated file without its footer, a garbled
data page) stop training with ``BadParquetFile``, which names the file and
row group. With ``skip_bad_files`` (``--skip-bad-files``) they are left out
instead, deterministically: a file whose footer does not read is left out of
the file list at the start (``check_files``); a row group that fails while a
stream reads it is skipped (``Skipped``, carried by the batch it fell in) and
the stream goes on with the next row group. What is skipped depends only on
the file's bytes, never on when the run started, so a resume still replays
the uninterrupted run's batches.
"""

from __future__ import annotations

import glob
import hashlib
import multiprocessing
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from capfilt.images import decode_image
from capfilt.models.augment import augmented_image, normalise
from capfilt.models.config import AugmentConfig, DataConfig
from capfilt.columns import IMAGE_COLUMNS
from capfilt.tokenizer import pre_caption

TOKEN_CACHE_SIZE = 200_000  # distinct texts whose token ids a loader keeps (a few hundred bytes each)

# img2dataset's image columns (its --encode_format, as capfilt's pipelines list them), then a plain "image".
IMAGE_CANDIDATES = (*IMAGE_COLUMNS, "jpeg", "image")
# What pyarrow raises on bytes it cannot read: OSError (thrift, decompression, I/O) or an ArrowException
# (ArrowInvalid: no footer, a 0-byte file). A file with the wrong columns (detect_layout) is a plain ValueError:
# a mistake in --data, never skipped.
READ_ERRORS = (OSError, pa.ArrowException)


class BadParquetFile(ValueError):
    """A Parquet file, or one of its row groups, that pyarrow cannot read: the message names it and the way on."""

    def __init__(self, path: str, error: BaseException | str, row_group: int | None = None, note: str = ""):
        self.path, self.row_group, self.error = path, row_group, _error_text(error)
        where = path if row_group is None else f"{path}, row group {row_group}"
        super().__init__(f"{where}: cannot be read ({self.error}){note}. Repair or remove the file, or pass "
                         "--skip-bad-files (DataConfig.skip_bad_files) to leave out what cannot be read "
                         "(logged and counted; a resume stays exact)")


def _error_text(error: BaseException | str) -> str:
    """An error on one line (pyarrow's thrift errors span several)."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())


@dataclass(frozen=True)
class Skipped:
    """Data left out with ``skip_bad_files``: a whole file (``row_group`` None) or rows ``start..end`` of a row group.

    A file's rows are unknown when its footer does not read (``start == end == 0``).
    """

    path: str
    row_group: int | None
    start: int
    end: int
    error: str

    @property
    def rows(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        if self.row_group is None:
            return f"{self.path} (unreadable: {self.error})"
        return f"{self.path}, row group {self.row_group}, rows {self.start}-{self.end - 1} ({self.error})"


@dataclass(frozen=True)
class Layout:
    """Which columns hold the image and the text, and a status column to honour (img2dataset)."""

    name: str
    image: str
    text: str
    status: str | None = None


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream stands within an epoch: ``file`` (index in its file list), ``row`` rows read there."""

    file: int = 0
    row: int = 0


@dataclass
class Batch:
    """One rank's slice of a global batch, and each of its streams' positions after it."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_ids: torch.Tensor
    positions: dict[int, StreamPosition] = field(default_factory=dict)
    # What this rank's streams skipped (skip_bad_files) while reading this batch's rows, in stream order.
    skipped: list[Skipped] = field(default_factory=list)
    # With DataConfig.negatives: each row's negative text (padded like input_ids) and whether it has one.
    negative_ids: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None
    has_negative: torch.Tensor | None = None


def trim_padding(batch: Batch, length: int | None = None) -> Batch:
    """The batch with its token columns cut to ``length`` (default: its longest text, negatives included).

    Captions are padded to ``max_tokens`` (what BLIP's tokenizer call does),
    but a padded position is masked everywhere (attention, ITC's [CLS], LM
    labels), so cutting the common padding changes no loss beyond float
    rounding and saves its compute: short captions padded to a long
    ``max_tokens`` train faster cut (bench/bench_frozen_vit_step.py).
    Texts are right-padded (``_encode``). Across ranks, pass the ranks'
    largest length: ITM gathers token ids, which needs one length.
    """
    if length is None:
        length = longest_text(batch)
    cut = {name: getattr(batch, name)[:, :length] for name in ("input_ids", "attention_mask", "negative_ids",
                                                               "negative_mask") if getattr(batch, name) is not None}
    return replace(batch, **cut)


def longest_text(batch: Batch) -> int:
    """The most tokens (attention mask ones) of any text in the batch, its negatives included."""
    masks = [batch.attention_mask] + ([batch.negative_mask] if batch.negative_mask is not None else [])
    return max(int(mask.sum(dim=1).max()) for mask in masks)


def seed_for(*parts: int) -> int:
    """A 32-bit seed mixed from non-negative integers (seed, epoch, step, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def detect_layout(names: list[str], source: str | Path = "") -> Layout:
    """The layout of a table with these column names; a clear error when it has no image or no text."""
    image = next((name for name in IMAGE_CANDIDATES if name in names), None)
    if image is None:
        raise ValueError(f"{source}: no image column ({', '.join(IMAGE_CANDIDATES)}) among {names}. "
                         "(capfilt's rejected/ and failed/ files hold no images: train on its kept/ files)")
    if "text" in names and "source" in names:
        return Layout("capfilt", image, "text")
    if "caption" in names:
        return Layout("img2dataset", image, "caption", "status" if "status" in names else None)
    if "text" in names:
        return Layout("image-text", image, "text")
    raise ValueError(f"{source}: no text column (text or caption) among {names}")


def find_files(patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Every Parquet file named by ``patterns`` (files, folders, globs), sorted; an error if none."""
    files = set()
    for pattern in patterns:
        if os.path.isdir(pattern):  # a folder's name is literal, wildcard characters included
            files.update(glob.glob(os.path.join(glob.escape(pattern), "**", "*.parquet"), recursive=True))
        elif os.path.isfile(pattern):
            files.add(pattern)
        else:
            files.update(glob.glob(pattern, recursive=True))
    if not files:
        raise FileNotFoundError(f"no Parquet files match {list(patterns)}")
    return sorted(files)


def check_files(files: list[str], skip_bad_files: bool = False) -> tuple[dict[str, int], list[Skipped]]:
    """Each readable file's rows with an image (``count_rows``), and the files whose footer cannot be read.

    Without ``skip_bad_files`` the first unreadable file is a ``BadParquetFile`` error instead.
    """
    counts, unreadable = {}, []
    for path in files:
        try:
            counts[path] = count_rows(path)
        except READ_ERRORS as error:
            if not skip_bad_files:
                raise BadParquetFile(path, error) from error
            unreadable.append(Skipped(path, None, 0, 0, _error_text(error)))
    return counts, unreadable


def count_rows(path: str) -> int:
    """Rows of ``path`` with an image, from the footer's statistics (failed downloads have a null image)."""
    metadata = pq.ParquetFile(path).metadata
    layout = detect_layout(metadata.schema.to_arrow_schema().names, path)
    leaf = next(i for i in range(metadata.num_columns) if metadata.schema.column(i).path.split(".")[0] == layout.image)
    nulls = 0
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(leaf).statistics
        if statistics is not None and statistics.has_null_count:
            nulls += statistics.null_count
    return metadata.num_rows - nulls


def epoch_streams(files: list[str], streams: int, epoch: int, seed: int, shuffle: bool) -> list[list[str]]:
    """The files of each stream in ``epoch``: the epoch's file order dealt round-robin."""
    if len(files) < streams:
        raise ValueError(f"{len(files)} Parquet file(s) cannot feed {streams} streams; "
                         "use fewer streams (or processes) or split the data into more files")
    order = np.random.default_rng([seed, epoch]).permutation(len(files)) if shuffle else range(len(files))
    ordered = [files[i] for i in order]
    return [ordered[s::streams] for s in range(streams)]


def steps_in_epoch(files: list[str], config: DataConfig, streams: int, epoch: int, seed: int,
                   counts: dict[str, int] | None = None) -> int:
    """Global batches in ``epoch``, from the files' footers (a stream's rows with an image / its share).

    ``counts``: rows per file already counted (``check_files``); the trainer passes 0 for a file a resumed run
    keeps in its list but can no longer read. Rows in row groups skipped later are counted: like undecodable
    images, they end an epoch a little early, the same way in a run and its resume.
    """
    counts = {path: count_rows(path) for path in files} if counts is None else counts
    rows = [sum(counts[path] for path in stream_files)
            for stream_files in epoch_streams(files, streams, epoch, seed, config.shuffle)]
    return min(rows) // (config.batch_size // streams)


@dataclass
class RawSample:
    image: bytes
    text: str
    seed_parts: tuple[int, ...]  # (seed, epoch, stream, file, row): the augmentation seed, mixed only when used
    negative: str | None = None  # the row's known-wrong text (DataConfig.negatives)


class Stream:
    """One stream's samples in order; ``position`` is always just past the last sample yielded.

    ``skipped`` collects what ``skip_bad_files`` left out since the loader last took it: only what lies at or
    past the position the stream started from, so a resumed stream does not report again what the run that
    wrote the checkpoint already reported.
    """

    def __init__(self, files: list[str], index: int, epoch: int, seed: int, config: DataConfig,
                 position: StreamPosition = StreamPosition()):
        self.files, self.index, self.epoch, self.seed, self.config = files, index, epoch, seed, config
        self.position = position
        self.skipped: list[Skipped] = []

    def take_skipped(self) -> list[Skipped]:
        """What was skipped since the last call (the loader attaches it to the batch being filled)."""
        taken, self.skipped = self.skipped, []
        return taken

    def __iter__(self) -> Iterator[RawSample]:
        start = self.position
        for file_index in range(start.file, len(self.files)):
            skip = start.row if file_index == start.file else 0
            yield from self._file_samples(file_index, skip)
            self.position = StreamPosition(file_index + 1, 0)

    def _file_samples(self, file_index: int, skip: int) -> Iterator[RawSample]:
        path = self.files[file_index]
        try:
            parquet = pq.ParquetFile(path)
        except READ_ERRORS as error:  # readable when the run started (check_files), not any more
            if not self.config.skip_bad_files:
                raise BadParquetFile(path, error) from error
            self.skipped.append(Skipped(path, None, 0, 0, _error_text(error)))
            return
        layout = detect_layout(parquet.schema_arrow.names, path)
        columns = [layout.image, layout.text] + ([layout.status] if layout.status else [])
        if self.config.negatives:
            if self.config.negatives not in parquet.schema_arrow.names:
                raise ValueError(f"{path}: no negatives column {self.config.negatives!r} "
                                 f"among {parquet.schema_arrow.names}")
            columns.append(self.config.negatives)
        for block_index, block_start, block in _blocks(parquet, path, columns, self.config):
            if isinstance(block, Skipped):
                self.position = StreamPosition(file_index, block.end)
                if block.end > skip:  # not passed before a resume: reported now
                    self.skipped.append(block)
                continue
            rows = block.num_rows
            if block_start + rows <= skip:
                continue
            rng = np.random.default_rng([self.seed, self.epoch, self.index, file_index, block_index])
            order = rng.permutation(rows) if self.config.shuffle else np.arange(rows)
            images, texts = block.column(layout.image).to_pylist(), block.column(layout.text).to_pylist()
            statuses = block.column(layout.status).to_pylist() if layout.status else None
            negatives = block.column(self.config.negatives).to_pylist() if self.config.negatives else None
            for k in range(max(skip - block_start, 0), rows):
                i = int(order[k])
                self.position = StreamPosition(file_index, block_start + k + 1)
                image = images[i].get("bytes") if isinstance(images[i], dict) else images[i]
                if not image or not isinstance(texts[i], str) or (statuses and statuses[i] != "success"):
                    continue
                yield RawSample(image, texts[i], (self.seed, self.epoch, self.index, file_index, block_start + i),
                                negatives[i] if negatives else None)


def _blocks(parquet: pq.ParquetFile, path: str, columns: list[str], config: DataConfig):
    """A file's blocks as (block index, first row, record batch): ``block_rows`` rows at a time, across row groups.

    When pyarrow fails, the row group at fault is found by reading the row groups one by one from the one that
    holds the failed block's first row: the first that fails alone. Without ``skip_bad_files`` that is a
    ``BadParquetFile`` naming it. With it, the rows before it come as one more block (or several, each at most
    ``block_rows``), then a ``Skipped`` in place of a block for its unread rows, and reading goes on from the
    next row group, block indices counting on. All of it is a function of the file's bytes: a resumed stream,
    which reads its file again from the start, meets the same failure at the same row and skips the same rows.
    """
    metadata = parquet.metadata
    sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    ends = np.cumsum(sizes)
    group, row, index = 0, 0, 0  # the first row group of the current read; the file row and block index next
    while group < len(sizes):
        # The whole file in one read when nothing fails: the very blocks this loader always read.
        batches = parquet.iter_batches(batch_size=config.block_rows, columns=columns,
                                       row_groups=list(range(group, len(sizes))) if group else None)
        while True:
            try:
                block = next(batches, None)
            except READ_ERRORS as error:
                failed = error
                break
            if block is None:
                return
            yield index, row, block
            index, row = index + 1, row + block.num_rows
        first = int(np.searchsorted(ends, row, side="right"))  # the row group holding the failed block's first row
        bad = next((g for g in range(first, len(sizes)) if not _reads(parquet, g, columns, config)), None)
        if bad is None:
            raise BadParquetFile(path, failed, min(first, len(sizes) - 1), note=f"; reading from row {row} failed "
                                 "but every row group from there reads on its own (a passing I/O error?)") from failed
        if not config.skip_bad_files:
            raise BadParquetFile(path, failed, bad) from failed
        bad_start = int(ends[bad]) - sizes[bad]
        if row < bad_start:  # the good rows in front of the bad row group: read again, cut into blocks from `row`
            kept = parquet.iter_batches(batch_size=config.block_rows, columns=columns,
                                        row_groups=list(range(first, bad)))
            for block in _recut(kept, row - (int(ends[first]) - sizes[first]), config.block_rows):
                yield index, row, block
                index, row = index + 1, row + block.num_rows
        yield index, row, Skipped(path, bad, row, int(ends[bad]), _error_text(failed))
        row, group = int(ends[bad]), bad + 1


def _recut(batches: Iterator[pa.RecordBatch], drop: int, size: int) -> Iterator[pa.RecordBatch]:
    """``batches`` without their first ``drop`` rows, cut into record batches of ``size`` rows (the last shorter).

    Holds at most about two blocks at a time.
    """
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        if drop >= batch.num_rows:
            drop -= batch.num_rows
            continue
        held.append(batch.slice(drop))
        count, drop = count + batch.num_rows - drop, 0
        while count >= size:
            table = pa.Table.from_batches(held)
            yield table.slice(0, size).combine_chunks().to_batches()[0]
            held, count = [b for b in table.slice(size).to_batches() if b.num_rows], count - size
    if count:
        yield pa.Table.from_batches(held).combine_chunks().to_batches()[0]


def _reads(parquet: pq.ParquetFile, group: int, columns: list[str], config: DataConfig) -> bool:
    """Whether row group ``group`` reads on its own (block by block: memory stays a block)."""
    try:
        for _ in parquet.iter_batches(batch_size=config.block_rows, columns=columns, row_groups=[group]):
            pass
    except READ_ERRORS:
        return False
    return True


def image_id(data: bytes) -> int:
    """A 63-bit id of an image's bytes: pairs with the same id show the same image."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class EpochLoader:
    """This rank's batches for one epoch, prepared ahead by a background thread.

    Iterating yields ``Batch`` objects until one of this rank's streams runs
    out (the trainer then asks every rank whether all still have a batch).
    Once it has run out, ``tail_skipped`` holds what was skipped while trying
    to fill the batch that could not be completed (``Batch.skipped`` the rest).
    """

    def __init__(self, files: list[str], config: DataConfig, tokenizer, image_size: int, augment: AugmentConfig,
                 *, seed: int, epoch: int, streams: int, rank: int, world_size: int,
                 positions: dict[int, StreamPosition] | None = None):
        if config.batch_size % streams or streams % world_size:
            raise ValueError(f"the global batch {config.batch_size} must split evenly over {streams} streams, "
                             f"and the streams over {world_size} processes")
        per_rank = streams // world_size
        stream_files = epoch_streams(files, streams, epoch, seed, config.shuffle)
        positions = positions or {}
        self.streams = [Stream(stream_files[s], s, epoch, seed, config, positions.get(s, StreamPosition()))
                        for s in range(rank * per_rank, (rank + 1) * per_rank)]
        self.chunk = config.batch_size // streams
        self.config, self.tokenizer, self.image_size, self.augment = config, tokenizer, image_size, augment
        self._token_cache: dict[str, list[int]] = {}
        self.finished, self.tail_skipped = False, []
        self._queue: queue.Queue = queue.Queue(maxsize=max(config.prefetch, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self._queue.get()
            if item is None:
                self.finished = True
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass

    def _produce(self) -> None:
        try:
            workers = max(self.config.workers, 1)
            # Processes outlive the epoch (starting them costs seconds); threads are started per epoch.
            pool = decoding_processes(workers) if self.config.worker_processes else ThreadPoolExecutor(workers)
            try:
                iterators = [iter(stream) for stream in self.streams]
                while not self._stop.is_set():
                    batch = self._make_batch(iterators, pool, workers)
                    if batch is None:
                        self.tail_skipped = [item for stream in self.streams for item in stream.take_skipped()]
                        break
                    self._put(batch)
            finally:
                if not self.config.worker_processes:
                    pool.shutdown()
        except BrokenProcessPool as error:
            _PROCESS_POOLS.pop(workers, None)  # the next epoch starts a fresh pool
            self._put(error)
        except BaseException as error:  # surfaced in the training loop
            self._put(error)
        self._put(None)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def _make_batch(self, iterators, pool, workers: int) -> Batch | None:
        samples = self._take(iterators, pool, workers)
        if samples is None:
            return None
        captions = [pre_caption(text, self.config.max_words) for _, text, _, _ in samples]
        if self.config.positives == "text":
            ids = [image_id(caption.encode("utf-8")) for caption in captions]
        else:
            ids = [ident for _, _, ident, _ in samples]
        input_ids, attention_mask = self._encode([self.config.prompt + caption for caption in captions])
        batch = Batch(
            pixel_values=normalise(np.stack([pixels for pixels, _, _, _ in samples])),
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_ids=torch.tensor(ids),
            positions={stream.index: stream.position for stream in self.streams},
            skipped=[item for stream in self.streams for item in stream.take_skipped()],
        )
        if self.config.negatives:
            negatives = [text if isinstance(text, str) and text.strip() else None for _, _, _, text in samples]
            batch.negative_ids, batch.negative_mask = self._encode(
                [self.config.prompt + pre_caption(text, self.config.max_words) if text else "" for text in negatives])
            batch.has_negative = torch.tensor([text is not None for text in negatives])
        return batch

    def _take(self, iterators, pool, workers: int) -> list | None:
        """``chunk`` decodable samples from each stream, in stream order (``None`` once one runs out).

        All streams' images are decoded in one ``map``; a stream whose images
        did not decode reads on until it has its ``chunk``.
        """
        taken: list[list] = [[] for _ in iterators]
        while True:
            raw = []
            for s, iterator in enumerate(iterators):
                wanted = self.chunk - len(taken[s])
                got = [sample for _, sample in zip(range(wanted), iterator)]
                if len(got) < wanted:
                    return None
                raw += [(s, sample) for sample in got]
            if not raw:
                return [sample for stream in taken for sample in stream]
            jobs = [(sample.image, sample.seed_parts, self.image_size, self.augment) for _, sample in raw]
            for (s, sample), pixels in zip(raw, pool.map(decode_sample, jobs, chunksize=-(-len(jobs) // workers))):
                if pixels is not None:
                    taken[s].append((pixels, sample.text, image_id(sample.image), sample.negative))

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, padded to ``max_tokens``: what the tokenizer's batch call gives.

        Each distinct text is tokenized once per epoch (a cache of up to
        ``TOKEN_CACHE_SIZE`` texts): BERT's Python tokenizer is slow per text,
        and runs in the one thread that assembles batches.
        """
        length = self.config.max_tokens
        input_ids = torch.full((len(texts), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self._token_cache.get(text)
            if ids is None:
                ids = self.tokenizer(text, truncation=True, max_length=length)["input_ids"]
                if len(self._token_cache) >= TOKEN_CACHE_SIZE:
                    self._token_cache.clear()
                self._token_cache[text] = ids
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        return input_ids, attention_mask


_PROCESS_POOLS: dict[int, ProcessPoolExecutor] = {}


def decoding_processes(workers: int) -> ProcessPoolExecutor:
    """This process's pool of ``workers`` decoding processes, started on first use and kept for later epochs."""
    if workers not in _PROCESS_POOLS:
        # spawn: safe whatever threads (torch, CUDA) the training process runs
        _PROCESS_POOLS[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=_ignore_ctrl_c)
    return _PROCESS_POOLS[workers]


def close_decoding_processes() -> None:
    """Stop every decoding process this process started (the trainer calls this when a run ends)."""
    while _PROCESS_POOLS:
        _, pool = _PROCESS_POOLS.popitem()
        pool.shutdown(wait=True, cancel_futures=True)


def decode_sample(job: tuple[bytes, tuple[int, ...], int, AugmentConfig]) -> np.ndarray | None:
    """One image, decoded and augmented, as uint8 ``[size, size, 3]`` (``None`` if its bytes do not decode).

    Runs in a worker; uint8 rather than normalised floats moves a quarter of the bytes back from a process.
    """
    image_bytes, seed_parts, size, augment = job
    try:
        image = decode_image(image_bytes)
    except ValueError:
        return None
    rng = np.random.default_rng(seed_for(*seed_parts)) if augment.augment or augment.render_jitter else None
    return np.asarray(augmented_image(image, size, augment, rng))


def _ignore_ctrl_c() -> None:
    """A terminal's Ctrl-C reaches every process of its group: the decoding processes leave it to the trainer,
    which stops between steps and saves a checkpoint (a pool whose processes died first would break that step)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
