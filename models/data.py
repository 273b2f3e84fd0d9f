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
"""

from __future__ import annotations

import glob
import hashlib
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from capfilt.images import decode_image
from capfilt.models.augment import AugmentConfig, transform
from capfilt.pipelines.schema import IMAGE_COLUMNS
from capfilt.tokenizer import pre_caption

# img2dataset's image columns (its --encode_format, as capfilt's pipelines list them), then a plain "image".
IMAGE_CANDIDATES = (*IMAGE_COLUMNS, "jpeg", "image")


@dataclass(frozen=True)
class DataConfig:
    """What is read and how batches are made; defaults are BLIP pre-training's."""

    data: tuple[str, ...] = ()  # Parquet files, folders of them or glob patterns
    batch_size: int = 2880  # global batch: 2880 for ViT-B pre-training (paper §4.1)
    streams: int = 0  # file streams per global batch; 0 = one per process. Fix it to compare runs across world sizes
    shuffle: bool = True  # shuffle the file order each epoch and the rows within each block
    block_rows: int = 1024  # rows read (and shuffled) at a time per stream: bounds memory
    max_words: int = 30  # captions cut to 30 words (BLIP's pre_caption)
    max_tokens: int = 30  # token length, padded/truncated: 30 pre-training, 40 captioner, 35 filter (BLIP)
    prompt: str = ""  # prepended to every caption: "a picture of " for the captioner (BLIP)
    workers: int = 4  # threads that decode and augment images
    prefetch: int = 2  # batches prepared ahead of the training step
    # What makes two pairs positives for ITC/ITM when same_image_positives is on: "image", the same image
    # bytes (BLIP's retrieval fine-tuning: COCO's five captions of an image); "text", the same normalised
    # caption (worlds where many images share one exact caption, such as the shapes world, whose in-batch
    # "negatives" would otherwise often be correct captions).
    positives: str = "image"

    def __post_init__(self):
        if self.positives not in ("image", "text"):
            raise ValueError(f"positives must be 'image' or 'text', not {self.positives!r}")


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
        if os.path.isdir(pattern):
            files.update(glob.glob(os.path.join(pattern, "**", "*.parquet"), recursive=True))
        else:
            files.update(glob.glob(pattern, recursive=True))
    if not files:
        raise FileNotFoundError(f"no Parquet files match {list(patterns)}")
    return sorted(files)


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


def steps_in_epoch(files: list[str], config: DataConfig, streams: int, epoch: int, seed: int) -> int:
    """Global batches in ``epoch``, from the files' footers (a stream's rows with an image / its share)."""
    counts = {path: count_rows(path) for path in files}
    rows = [sum(counts[path] for path in stream_files)
            for stream_files in epoch_streams(files, streams, epoch, seed, config.shuffle)]
    return min(rows) // (config.batch_size // streams)


@dataclass
class RawSample:
    image: bytes
    text: str
    seed: int


class Stream:
    """One stream's samples in order; ``position`` is always just past the last sample yielded."""

    def __init__(self, files: list[str], index: int, epoch: int, seed: int, config: DataConfig,
                 position: StreamPosition = StreamPosition()):
        self.files, self.index, self.epoch, self.seed, self.config = files, index, epoch, seed, config
        self.position = position

    def __iter__(self) -> Iterator[RawSample]:
        start = self.position
        for file_index in range(start.file, len(self.files)):
            skip = start.row if file_index == start.file else 0
            yield from self._file_samples(file_index, skip)
            self.position = StreamPosition(file_index + 1, 0)

    def _file_samples(self, file_index: int, skip: int) -> Iterator[RawSample]:
        path = self.files[file_index]
        parquet = pq.ParquetFile(path)
        layout = detect_layout(parquet.schema_arrow.names, path)
        columns = [layout.image, layout.text] + ([layout.status] if layout.status else [])
        block_start = 0
        for block_index, block in enumerate(parquet.iter_batches(batch_size=self.config.block_rows, columns=columns)):
            rows = block.num_rows
            if block_start + rows <= skip:
                block_start += rows
                continue
            rng = np.random.default_rng([self.seed, self.epoch, self.index, file_index, block_index])
            order = rng.permutation(rows) if self.config.shuffle else np.arange(rows)
            images, texts = block.column(layout.image).to_pylist(), block.column(layout.text).to_pylist()
            statuses = block.column(layout.status).to_pylist() if layout.status else None
            for k in range(max(skip - block_start, 0), rows):
                i = int(order[k])
                self.position = StreamPosition(file_index, block_start + k + 1)
                image = images[i].get("bytes") if isinstance(images[i], dict) else images[i]
                if not image or not isinstance(texts[i], str) or (statuses and statuses[i] != "success"):
                    continue
                yield RawSample(image, texts[i], seed_for(self.seed, self.epoch, self.index, file_index,
                                                          block_start + i))
            block_start += rows


def image_id(data: bytes) -> int:
    """A 63-bit id of an image's bytes: pairs with the same id show the same image."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class EpochLoader:
    """This rank's batches for one epoch, prepared ahead by a background thread.

    Iterating yields ``Batch`` objects until one of this rank's streams runs
    out (the trainer then asks every rank whether all still have a batch).
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
        self._queue: queue.Queue = queue.Queue(maxsize=max(config.prefetch, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self._queue.get()
            if item is None:
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
            with ThreadPoolExecutor(max(self.config.workers, 1)) as pool:
                iterators = [iter(stream) for stream in self.streams]
                while not self._stop.is_set():
                    batch = self._make_batch(iterators, pool)
                    if batch is None:
                        break
                    self._put(batch)
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

    def _make_batch(self, iterators, pool) -> Batch | None:
        samples = []
        for iterator in iterators:
            taken = self._take(iterator, pool)
            if taken is None:
                return None
            samples += taken
        captions = [pre_caption(text, self.config.max_words) for _, text, _ in samples]
        texts = [self.config.prompt + caption for caption in captions]
        if self.config.positives == "text":
            ids = [image_id(caption.encode("utf-8")) for caption in captions]
        else:
            ids = [ident for _, _, ident in samples]
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.config.max_tokens,
                                return_tensors="pt")
        return Batch(
            pixel_values=torch.stack([pixels for pixels, _, _ in samples]),
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            image_ids=torch.tensor(ids),
            positions={stream.index: stream.position for stream in self.streams},
        )

    def _take(self, iterator, pool) -> list | None:
        """``chunk`` decodable samples from one stream (``None`` once it runs out)."""
        taken = []
        while len(taken) < self.chunk:
            raw = [sample for _, sample in zip(range(self.chunk - len(taken)), iterator)]
            if len(raw) < self.chunk - len(taken):
                return None
            for sample, pixels in zip(raw, pool.map(self._pixels, raw)):
                if pixels is not None:
                    taken.append((pixels, sample.text, image_id(sample.image)))
        return taken

    def _pixels(self, sample: RawSample) -> torch.Tensor | None:
        try:
            image = decode_image(sample.image)
        except ValueError:
            return None
        return transform(image, self.image_size, self.augment, np.random.default_rng(sample.seed))
