"""CapFilt on one shard: read → decode → caption → filter → write → commit.

Everything a shard needs happens here, in one worker, so that image bytes
never travel between workers. The steps are the paper's:

1. decode each image straight to the models' input size (and check its
   size), in a pool of threads that works ahead of the models
   (``prefetch.ordered_map``); URL list lines that did not parse fail at
   stage ``parse``, rows img2dataset could not download at stage
   ``download``;
2. the captioner writes K synthetic captions per image (nucleus sampling,
   p = 0.9), in fixed-size batches, each image sampled with its own seed, from
   the run's seed and its key (``BootstrapSettings.sample_seed``): its captions
   do not depend on its batch or its place in the shard;
3. the filter scores the web text and every synthetic caption of an image
   against that image (one image encoding); the selection rules
   (``capfilt.pipelines.selection.select``, a batch of images at a time, the
   same code ``capfilt refilter`` runs) remove the texts whose score is
   below the threshold (the ITM match probability; by ``itc``, for a CLIP or
   SigLIP filter without an ITM head, the ITC cosine similarity; no threshold
   with ``--select top-N`` alone), then duplicate texts of the image and,
   with ``--select top-N``, all but its N best by that score; with ``--dedup-images``, an
   image whose bytes the shard already kept loses its kept texts (reason
   ``duplicate image``; across shards: ``capfilt.pipelines.image_dedup``, at
   the run's end);
4. kept pairs, removed texts and failed rows go to the shard's three files,
   which ``OutputLayout.commit`` moves into place before writing the marker.
   Parquet row groups (``capfilt.pipelines.parquet_writer``) are encoded and
   written in a thread behind the models.

A model error on a batch is retried image by image, so that one bad image
fails alone (stage ``caption`` or ``filter``); when every image of a batch
(or of the shard) fails, the error is the model's or the machine's, not the
data's, and the shard fails (it is not marked done, and a rerun retries it).

Damaged input (``capfilt.pipelines.shards``): rows that cannot be read fail
at stage ``read``, the rest are processed, and the marker records the damage
(``damaged``), so that the shard is done and listed, not retried forever. A
shard of which nothing reads is marked done and damaged without output files.
A damaged shard without img2dataset's ``_stats.json`` is most likely still
being downloaded: it fails instead (``IncompleteInputError``) and a rerun
retries it, unless its damage is of a kind no download leaves (a mistyped
column, an oversized tar member: ``ShardReader.unfinished_damage``). Rows
come in key order (``ShardReader.rows``). Each row's keys go into the
marker's duplicate count and the key hashes file
(``capfilt.pipelines.stats.KeyTally``), each image with a kept text into the
image hashes file; each output row gets its ``sample_id``
(``capfilt.pipelines.schema``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from capfilt.columns import INPUT_STAGE
from capfilt.images import DecodedImage, ImagePreprocessor, decode_for_model, recorded_orientation
from capfilt.pipelines import schema
from capfilt.pipelines.layout import FAILED, KEPT, REJECTED, OutputLayout, progress_path, remove_progress, write_text
from capfilt.pipelines.parquet_writer import TableWriter
from capfilt.pipelines.prefetch import ordered_map
from capfilt.pipelines.report import example
from capfilt.pipelines.selection import KEPT_CODE, REASON_OF_CODE, select
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import (
    SUCCESS, DamagedShardError, InputRow, InputShard, ShardReader, error_text, expected_rows, without_addresses,
)
from capfilt.pipelines.stats import ShardStats
from capfilt.pipelines.worker_models import Models

# Seconds between updates of a running shard's progress file (read by Progress); the first is after the first batch.
PROGRESS_EVERY_S = 3.0
DECODE_AHEAD_BATCHES = 2  # decoded images held ahead of the models, in batches: bounds memory, hides decoding

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """A row that cannot be judged, and the stage where that was found."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


class ModelStageError(RuntimeError):
    """A model failed on every image of a batch: not the data's fault; the shard is retried later."""


class IncompleteInputError(RuntimeError):
    """A damaged shard without img2dataset's _stats.json: most likely still being downloaded; retried later."""


@dataclass
class Judged:
    """A decoded input row on its way through the models: its bytes stay in ``row``, no full-size pixels."""

    row: InputRow
    image: DecodedImage
    sha256: str = ""  # hex SHA-256 of the image bytes, hashed in the decode thread

    def pixels(self, preprocessor: ImagePreprocessor) -> torch.Tensor:
        return self.image.for_model(preprocessor)


def decode(row: InputRow, settings: BootstrapSettings, preprocessors: Sequence[ImagePreprocessor]) -> Judged:
    """The row's image, decoded to the models' inputs, or a ``SampleError`` (stage ``decode`` or ``size``)."""
    if not row.image:
        raise SampleError("decode", "no image bytes")
    try:
        with Image.open(io.BytesIO(row.image)) as header:  # reads the header only
            width, height = header.size
    except Exception as error:
        raise SampleError("decode", f"cannot decode image: {error_text(error)}") from None
    if min(width, height) < settings.min_image_size:
        raise SampleError("size", f"image is {width}x{height}, below min_image_size {settings.min_image_size}")
    if width * height > settings.max_image_pixels:
        raise SampleError("size", f"image is {width}x{height}, above max_image_pixels {settings.max_image_pixels}")
    try:
        decoded = decode_for_model(row.image, preprocessors, orientation=_orientation(row))
        return Judged(row, decoded, hashlib.sha256(row.image).hexdigest())
    except ValueError as error:
        raise SampleError("decode", without_addresses(str(error))) from None


def per_image(call: Callable[[list], list], items: list, what: str) -> list[tuple[object, str | None]]:
    """``call`` on the batch; if it fails, on each item alone: (result, None) or (None, error) per item."""
    try:
        results = call(items)
        return [(result, None) for result in results]
    except Exception as batch_error:  # noqa: BLE001 - any model error is retried image by image
        if isinstance(batch_error, (MemoryError, torch.OutOfMemoryError)):  # the machine, not the data
            raise
        if len(items) == 1:
            return [(None, error_text(batch_error))]
        outcomes = []
        for item in items:
            try:
                outcomes.append((call([item])[0], None))
            except Exception as error:  # noqa: BLE001
                outcomes.append((None, error_text(error)))
        if all(error is not None for _, error in outcomes):
            raise ModelStageError(f"the {what} failed on every image of a batch: {error_text(batch_error)}") \
                from batch_error
        return outcomes


class ShardWriter:
    """The kept, rejected and failed files of one shard, under a temporary folder."""

    def __init__(self, folder: str, reader: ShardReader, settings: BootstrapSettings, models: Models):
        config = {**settings.provenance(), "sampling": models.sampling}  # what made these rows
        provenance = {"config": config, "models": models.provenance(), "input": reader.shard.path}
        extra = reader.extra_fields
        self.folder = folder
        self.shard_id = reader.shard.shard_id
        self.image_column = reader.image_column
        schemas = {
            KEPT: schema.kept_schema(extra, self.image_column),
            REJECTED: schema.rejected_schema(extra),
            FAILED: schema.failed_schema(extra),
        }
        self.files = {kind: FileSystems.join(folder, f"{kind}.parquet") for kind in schemas}
        self._background = ThreadPoolExecutor(1, thread_name_prefix="capfilt-write")  # writes behind the models
        self.writers = {kind: TableWriter(self.files[kind], schema.with_provenance(s, provenance), self._background)
                        for kind, s in schemas.items()}
        self.provenance_columns = {"captioner": settings.captioner, "filter": settings.filter,
                                   "capfilt_config": json.dumps(config, sort_keys=True)}

    def fail(self, row: InputRow, stage: str, error: str) -> None:
        self.writers[FAILED].add({
            "sample_id": schema.sample_id(self.shard_id, row.index), "key": row.key, "url": row.url,
            "web_text": row.caption, "stage": stage, "error": error, "status": row.status, **row.extra,
        })

    def pair(self, judged: Judged, text: str, source: str, index: int, itm: float | None, itc: float,
             reason: str | None) -> None:
        """One judged text: kept (``reason`` None, with the image) or rejected for ``reason``; ``itm`` None (null)
        from a filter without an ITM head."""
        row = judged.row
        record = {
            "sample_id": schema.sample_id(self.shard_id, row.index, source, index), "key": row.key, "url": row.url,
            "caption": text, "text": text, "web_text": row.caption, "source": source, "source_index": index,
            "itm_score": itm, "itc_score": itc, "image_sha256": judged.sha256, "width": judged.image.width,
            "height": judged.image.height, **self.provenance_columns, **schema.DOWNLOADED, **row.extra,
        }
        if reason is None:
            record[self.image_column] = schema.image_value(row.image)
        else:
            record["reason"] = reason
        self.writers[KEPT if reason is None else REJECTED].add(record)

    def close(self) -> None:
        try:
            errors = []
            for writer in self.writers.values():
                try:
                    writer.close()
                except Exception as error:  # noqa: BLE001 - close every file, then raise the first error
                    errors.append(error)
            if errors:
                raise errors[0]
        finally:
            self._background.shutdown(wait=True)


def _orientation(row: InputRow) -> int | None:
    """The EXIF orientation img2dataset recorded for the row (its ``exif`` column): it drops the tag itself."""
    exif = row.extra.get("exif")
    return recorded_orientation(exif) if isinstance(exif, str) else None


def web_text(row: InputRow) -> str | None:
    """The web text to judge, or None when the input has none (empty or missing)."""
    text = row.caption
    return text if text is not None and text.strip() else None


class ShardJob:
    """One attempt at one shard."""

    def __init__(self, shard: InputShard, models: Models, settings: BootstrapSettings, layout: OutputLayout):
        self.shard, self.models, self.settings, self.layout = shard, models, settings, layout
        self.stats = ShardStats(shard=shard.shard_id, input=shard.path, run=layout.run, by=settings.by)
        self._progress_written: float | None = None  # not yet: the first batch writes it
        self._size: int | None = None  # the shard's rows, as img2dataset recorded them (for the ETA)
        self.preprocessors = (models.captioner.preprocess, models.filter.preprocess)

    def run(self) -> dict:
        start = time.perf_counter()
        try:
            reader = ShardReader(self.shard)
        except DamagedShardError as damage:
            return self.unreadable(damage)
        writer = ShardWriter(self.layout.temp_dir(self.shard.shard_id), reader, self.settings, self.models)
        self._size = expected_rows(self.shard)
        try:
            batch: list[Judged] = []
            batch_index = 0
            ahead = DECODE_AHEAD_BATCHES * self.settings.batch_size
            for row, admitted in ordered_map(self.admit, reader.rows(), self.settings.decode_threads, ahead):
                self.stats.rows += 1
                self.stats.keys.add(row.key)
                if not isinstance(admitted, Judged):
                    self.failed(row, *admitted, writer)
                    continue
                batch.append(admitted)
                if len(batch) == self.settings.batch_size:
                    self.judge(batch, batch_index, writer)
                    batch, batch_index = [], batch_index + 1
                    self.report_progress(writer.folder)
            if batch:
                self.judge(batch, batch_index, writer)
            model_failures = self.stats.failed["caption"] + self.stats.failed["filter"]
            if model_failures and not self.stats.images:  # e.g. batch size 1 with a broken model
                raise ModelStageError(f"the models failed on all {model_failures} image(s) of the shard")
            if reader.unfinished_damage:  # not a mistyped column: a rerun would find it again
                self.incomplete_download("; ".join(reader.damage))
            writer.close()
        except BaseException:
            remove_progress(writer.folder)  # a failed attempt's rows no longer count as running
            try:
                writer.close()
            except Exception as error:  # noqa: BLE001 - the first error is the one to report
                log.debug("closing shard %s's files after an error: %s", self.shard.shard_id, error)
            self.layout.discard(writer.folder)
            raise
        self.stats.seconds = time.perf_counter() - start
        if reader.damage_count:
            self.stats.damaged = self.damage_record(reader.damage, reader.damage_count, complete=not reader.rows_lost)
        self.stats.check(self.settings.num_captions)
        marker = {**self.stats.to_dict(), "sampling": self.models.sampling}
        self.layout.commit(self.shard.shard_id, writer.files, marker, keys=self.stats.keys.hashes_file(),
                           images=self.stats.kept_images.hashes_file())
        return marker

    def incomplete_download(self, damage: str) -> None:
        """Raise ``IncompleteInputError`` for damage in a shard without img2dataset's stats file."""
        if self.shard.stats_missing:
            raise IncompleteInputError(
                f"{self.shard.path} cannot be read whole ({damage}), and it has no img2dataset _stats.json: its "
                "download is most likely still running (or died, and img2dataset's next run redoes it); rerun once "
                "the download is over")

    def damage_record(self, errors: list[str], count: int, complete: bool) -> dict:
        """The marker's ``damaged``: what was broken, whether every row is still in the output, img2dataset's count."""
        return {"errors": list(errors), "more_errors": count - len(errors), "all_rows_accounted": complete,
                "rows_expected": expected_rows(self.shard)}

    def unreadable(self, damage: DamagedShardError) -> dict:
        """A shard of which nothing can be read: no output files, a marker that says it is damaged."""
        self.incomplete_download(damage.error)
        self.stats.damaged = self.damage_record([damage.error], 1, complete=False)
        self.stats.check(self.settings.num_captions)
        marker = {**self.stats.to_dict(), "sampling": self.models.sampling}
        self.layout.commit_damaged(self.shard.shard_id, marker)
        log.error("input shard %s is damaged, nothing of it can be read: %s", self.shard.path, damage.error)
        return marker

    def report_progress(self, folder: str) -> None:
        """After the first batch and then every ``PROGRESS_EVERY_S``, the rows read so far and the shard's size (None
        where unknown) into the attempt's progress file (for ``Progress``). Its reader keeps its last good read, so
        a rewrite caught midway does no harm."""
        now = time.monotonic()
        if self._progress_written is not None and now - self._progress_written < PROGRESS_EVERY_S:
            return
        self._progress_written = now
        try:
            write_text(progress_path(folder), json.dumps({"rows": self.stats.rows, "total": self._size}))
        except Exception as error:  # noqa: BLE001 - progress is a courtesy: never fail a shard over it
            log.debug("could not write progress of shard %s: %s", self.shard.shard_id, error)

    def admit(self, row: InputRow) -> Judged | tuple[str, str]:
        """The decoded row, or the (stage, error) it fails with; runs in a decode thread."""
        if row.input_error:  # a URL list line that did not parse, or a URL refused: img2dataset saw no URL
            stage = row.input_stage or "parse"  # older URL lists have no stage column: their errors are parse's
            if stage not in schema.STAGES:
                return "parse", f"{row.input_error} (unknown {INPUT_STAGE} {stage!r})"
            return stage, row.input_error
        if row.status != SUCCESS:
            return "download", row.error or row.status
        try:
            return decode(row, self.settings, self.preprocessors)
        except SampleError as error:
            return error.stage, str(error)

    def failed(self, row: InputRow, stage: str, error: str, writer: ShardWriter) -> None:
        writer.fail(row, stage, error)
        self.stats.failed[stage] += 1
        return None

    def judge(self, batch: list[Judged], batch_index: int, writer: ShardWriter) -> None:
        """Caption, filter and write one batch, the shard's ``batch_index``-th (which changes no caption)."""
        k = self.settings.num_captions
        captions = per_image(lambda items: self._caption(items, k), batch, "captioner")
        captioned = []
        for judged, (texts, error) in zip(batch, captions):
            if error is not None:
                self.failed(judged.row, "caption", error, writer)
            else:
                captioned.append((judged, texts))
        candidates = [(judged, self._candidates(judged, synthetic)) for judged, synthetic in captioned]
        scored = []
        for (judged, texts), (text_scores, error) in zip(candidates, per_image(self._score, candidates, "filter")):
            if error is not None:
                self.failed(judged.row, "filter", error, writer)
            else:
                scored.append((judged, texts, text_scores))
        self.keep_or_reject(scored, writer)

    def keep_or_reject(self, scored: list[tuple[Judged, list, list]], writer: ShardWriter) -> None:
        """The selection (``selection.select``) on the judged images of a batch, each as (image, its candidates
        (source, index, text), their scores); every text written, counted and, while the report wants one, an
        example."""
        candidates = [candidate for _, texts, _ in scored for candidate in texts]
        scores = [score for _, _, text_scores in scored for score in text_scores]
        judged_by = [getattr(score, self.settings.by) for score in scores]  # what rule 1 and top-N read
        codes = select(self.settings, [len(texts) for _, texts, _ in scored], judged_by,
                       lambda start, stop: [text for _, _, text in candidates[start:stop]],
                       [judged.sha256 for judged, _, _ in scored], self.stats.kept_images)
        self.stats.images += len(scored)
        self.stats.web_missing += sum(1 for _, texts, _ in scored if texts[0][0] != schema.WEB)
        self.stats.add_texts([source for source, _, _ in candidates], judged_by, codes)
        images = [judged for judged, texts, _ in scored for _ in texts]
        why = REASON_OF_CODE[codes].tolist()
        for judged, (source, index, text), score, reason in zip(images, candidates, scores, why):
            writer.pair(judged, text, source, index, score.itm, score.itc, reason)
        for i in self.stats.wanted_samples([source for source, _, _ in candidates], codes == KEPT_CODE):
            (source, _, text), row = candidates[i], images[i].row
            self.stats.samples.append(example(row.key, text, source, judged_by[i], why[i], row.image,
                                              row.extra.get("exif"), self.settings.by))

    def _caption(self, items: Sequence[Judged], k: int) -> list[list[str]]:
        captioner = self.models.captioner
        pixels = torch.stack([judged.pixels(captioner.preprocess) for judged in items])
        seeds = [self.settings.sample_seed(judged.row.key) for judged in items]
        captions = captioner.caption_pixels(pixels, num_captions=k, seeds=seeds)
        if len(captions) != len(items) or any(len(c) != k for c in captions):
            raise ValueError(f"the captioner returned {[len(c) for c in captions]} captions for {len(items)} images, "
                             f"K={k}")
        return captions

    @staticmethod
    def _candidates(judged: Judged, synthetic: list[str]) -> list[tuple[str, int, str]]:
        """(source, index, text) for the web text (if any) and each synthetic caption."""
        web = web_text(judged.row)
        texts = [(schema.WEB, 0, web)] if web is not None else []
        return texts + [(schema.SYNTHETIC, i, caption) for i, caption in enumerate(synthetic)]

    def _score(self, items: Sequence[tuple[Judged, list]]) -> list:
        filter_ = self.models.filter
        pixels = torch.stack([judged.pixels(filter_.preprocess) for judged, _ in items])
        texts = [[text for _, _, text in candidates] for _, candidates in items]
        scores = filter_.score_pixels(pixels, texts)
        if [len(s) for s in scores] != [len(t) for t in texts]:
            raise ValueError("the filter returned a different number of scores than texts")
        return scores


def process_shard(shard: InputShard, models: Models, settings: BootstrapSettings, layout: OutputLayout) -> dict:
    """CapFilt one shard and commit its output; returns its stats (the marker's content)."""
    return ShardJob(shard, models, settings, layout).run()
