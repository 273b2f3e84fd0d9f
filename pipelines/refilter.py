"""``capfilt refilter``: a new kept/rejected split of a CapFilt output from the scores it stored; no model runs.

Every text a run judged is in its kept/ or rejected/ with its ITM and ITC
scores, so another threshold, another ``--select`` or ``--dedup-images`` is a
matter of applying the selection rules (``capfilt.pipelines.selection``) to
those scores again. ``refilter(settings, OUT, OUT2)`` writes OUT2 with the
same layout, schema, markers, ``stats.json`` and ``report.html`` as
``capfilt bootstrap`` (``capfilt.pipelines.layout``, ``capfilt.pipelines.report``),
and its kept/ and rejected/ equal, row for row, those of a fresh run with
the new settings (same models, seeds and batch size): the captions and
scores of a fresh run are OUT's, and the rules are the pipeline's.

- ``threshold`` T, or ``keep_fraction`` F: the threshold that makes F of the
  web texts pass. F is a share of the *web texts*: of the N web texts judged
  in all OUT's finished shards, T is the ⌈F·N⌉-th highest score, found over
  all shards before any is rewritten. Every text, web or synthetic, whose
  score is at least T passes. Equal scores cannot be told apart by a
  threshold, so texts that tie with the cut-off all pass: the share of web
  texts that pass is ⌈F·N⌉/N, more only by such ties, and T depends on the
  scores alone (not on the order of shards or rows). T is recorded, so
  ``--threshold T`` gives the same split. Why web texts: they are the
  dataset's own pairs, the pool DataComp's filters keep a share of; a share
  of all texts would move with K, the synthetic captions per image.
- ``by`` ``itm`` (the paper's: the ITM match probability, 0 to 1) or ``itc``
  (the ITC cosine similarity of the filter's unimodal features, -1 to 1);
  by default the source run's (``itc`` for a run with a CLIP or SigLIP
  filter). ``--by itc --keep-fraction F`` is DataComp's CLIP-score filter
  (keep the pairs with the highest image-text cosine similarity) on the
  filter's own ITC head. With ``--select top-N`` texts are ranked by the
  same score. A source whose filter has no ITM head stores no ``itm_score``
  (null): ``by`` ``itm`` on it is an error that says so, before anything is
  written. A run without a threshold (``select`` top-N alone) is refiltered
  with one; ``--by itc --threshold -1`` passes every text, as no threshold
  does.
- ``select`` and ``dedup_images``: OUT's unless given.

Per shard (``refilter_shard``), vectorised with pyarrow and numpy, one shard
in memory at a time (its texts, and the image bytes of its kept/):

1. kept/ and rejected/ of OUT are read (kept/'s images apart), put in the
   pipeline's order (input row, then the web text and the captions by index,
   from ``sample_id``) and checked against the shard's marker: every text once,
   every score present;
2. the rules: the pipeline's own selection (``selection.select``: the
   threshold, duplicate texts, top N, then the shard's own duplicate images)
   over the shard's texts at once, counted by the pipeline's ``ShardStats``;
3. each text that is kept needs its image: the bytes of any kept row of OUT's
   shard with the same SHA-256, else the input shard's row, read by
   reference with the pipeline's own reader (``capfilt.pipelines.shards``,
   Parquet or webdataset): the input shard recorded in OUT's marker (``input``,
   also in every file's provenance) and the row in the ``sample_id``
   (``{shard}_{row:09d}_...``). An input that is not reachable, or whose row
   is not the image OUT judged (its SHA-256), is an error that names it,
   never a dropped text; ``input`` (``--input``) says where the input shards
   are now;
4. kept/, rejected/ and failed/ (rows unchanged) are written
   (``capfilt.pipelines.parquet_writer``) and committed with the shard's
   marker (its report examples chosen as the pipeline chooses them, among the
   texts whose image bytes are at hand), key hashes (OUT's) and kept-image
   hashes, as the pipeline commits a shard.

Then, with ``dedup_images``, the pipeline's cross-shard step
(``capfilt.pipelines.image_dedup``), and the summary. A rerun into the same
OUT2 skips finished shards; OUT2's ``_run.json`` holds its settings: OUT's,
with the new ``threshold``, ``by``, ``select`` and ``dedup_images``, and
``keep_fraction`` and ``refiltered_from`` (OUT). The same settings are in
every file's provenance and every row's ``capfilt_config``: a refiltered
row's config is a fresh run's plus those two keys.

A source of schema version 4 (markers in ``_done/``, kept/ and rejected/ without
``status`` and ``error_message``) is read as it is, and OUT2 is written in this
version: ``OutputLayout.existing`` finds its markers, ``schema.with_download_status``
adds the two columns, and OUT2's settings carry this ``schema_version``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from capfilt.columns import IMAGE_COLUMNS
from capfilt.console_progress import progress
from capfilt.pipelines import schema
from capfilt.pipelines.layout import FAILED, KEPT, REJECTED, RUN_FILE, OutputLayout, read_text
from capfilt.pipelines.image_dedup import drop_duplicate_images
from capfilt.pipelines.parquet_writer import ROW_GROUP_ROWS, write_groups, write_table
from capfilt.pipelines.report import example, write_summary
from capfilt.pipelines.selection import (
    BY_ITC, BY_ITM, KEPT_CODE, REASON_OF_CODE, SCORE_RANGES, SELECT_ALL, parse_select, select,
)
from capfilt.pipelines.shards import DamagedShardError, InputShard, ShardError, ShardReader, list_shards
from capfilt.pipelines.stats import ShardStats

BY = (BY_ITM, BY_ITC)
SCORE_COLUMNS = {BY_ITM: "itm_score", BY_ITC: "itc_score"}
# From version 3 rejected/ holds every removed text with its scores and reason; from version 4 a row's place (in
# sample_id, and where refilter finds its image in the input shard) is its place in key order.
MIN_SCHEMA_VERSION = 4
# The columns of kept/ (besides the image) and rejected/ (besides the reason) that refilter reads.
NEEDED_COLUMNS = {"sample_id", "key", "source", "source_index", "caption", "itm_score", "itc_score", "image_sha256",
                  "capfilt_config"}
# The settings a refilter adds to its source's (in _run.json, stats.json, every file's and row's config).
REFILTER_KEYS = ("keep_fraction", "refiltered_from")


class RefilterError(ValueError):
    """A source that cannot be refiltered, or an input it needs that is not there; the message says which."""


@dataclass(frozen=True)
class RefilterSettings:
    """What ``refilter`` changes; exactly one of ``threshold`` and ``keep_fraction``.

    - ``threshold``: a text passes when its score is at least this (an ITM probability in [0, 1], an ITC cosine in
      [-1, 1]); None: from ``keep_fraction``.
    - ``keep_fraction``: in (0, 1]: the threshold that makes this share of the web texts pass (the module's
      docstring); None: ``threshold`` is given.
    - ``by`` ``itm`` (the paper's filter) or ``itc`` (DataComp's CLIP score, on the filter's ITC head); None (the
      default): the source run's (``itm`` for a source of an older capfilt).
    - ``select`` (``all`` or ``top-N``) and ``dedup_images``: None (the default) keeps the source run's.
    - ``input``: where the source's input shards are now (a folder, glob or file; their ids are matched); None
      (the default): the paths the source recorded.
    """

    threshold: float | None = None
    keep_fraction: float | None = None
    by: str | None = None
    select: str | None = None
    dedup_images: bool | None = None
    input: str | None = None

    def __post_init__(self):
        if (self.threshold is None) == (self.keep_fraction is None):
            raise RefilterError("give either a threshold or a keep fraction (exactly one of them)")
        if self.by is not None:
            if self.by not in BY:
                raise RefilterError(f"by must be one of {BY}, not {self.by!r}")
            check_threshold(self.threshold, self.by)
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            raise RefilterError(f"the keep fraction is a share of the web texts in (0, 1], not {self.keep_fraction}")
        if self.select is not None:
            parse_select(self.select)


def check_threshold(threshold: float | None, by: str) -> None:
    """A ``RefilterError`` unless ``threshold`` (None: from a keep fraction) is in the range of the ``by`` score."""
    low, high = SCORE_RANGES[by]
    if threshold is not None and not low <= threshold <= high:
        raise RefilterError(f"a threshold on {SCORE_COLUMNS[by]} is in [{low}, {high}], not {threshold}")


@dataclass(frozen=True)
class Plan:
    """One refilter's resolved selection. ``settings`` (the output's ``_run.json``) is the source's settings
    with the new ``threshold``, ``by``, ``select``, ``dedup_images`` and ``REFILTER_KEYS``. Like ``BootstrapSettings`` it
    has what the selection (``selection.Rules``: ``threshold``, ``top_n``, ``dedup_images``) and the summary
    (``report.SummarySettings``: ``provenance()``, ``dedup_images``) read of a run's settings."""

    settings: dict

    @property
    def threshold(self) -> float | None:
        return self.settings["threshold"]

    @property
    def by(self) -> str:
        return self.settings["by"]

    @property
    def score_column(self) -> str:
        return SCORE_COLUMNS[self.by]

    @property
    def top_n(self) -> int | None:
        return parse_select(self.settings["select"])

    @property
    def dedup_images(self) -> bool:
        return self.settings["dedup_images"]

    def provenance(self) -> dict:
        return dict(self.settings)

    def config(self, source_config: dict) -> dict:
        """A source file's config (its settings and the sampling used) with this refilter's settings."""
        return {**source_config, **{k: self.settings[k] for k in ("schema_version", "threshold", "by", "select",
                                                                  "dedup_images", *REFILTER_KEYS)}}


def read_run_settings(layout: OutputLayout) -> dict:
    """The source's ``_run.json``: a CapFilt output of schema ``MIN_SCHEMA_VERSION`` or later, else a
    ``RefilterError``."""
    path = FileSystems.join(layout.root.rstrip("/"), RUN_FILE)
    if not FileSystems.exists(path):
        raise RefilterError(f"{layout.root} is not a CapFilt output folder (it has no {RUN_FILE})")
    settings = json.loads(read_text(path))
    _check_version(settings.get("schema_version"), path)
    return settings


def _check_version(version, where: str) -> None:
    if not isinstance(version, int) or version < MIN_SCHEMA_VERSION:
        raise RefilterError(
            f"{where} is of output schema version {version}: refilter needs version {MIN_SCHEMA_VERSION} or later "
            "(rejected/ with every removed text's scores, rows in key order). Run bootstrap again into a new folder")


def web_scores(layout: OutputLayout, shard_ids: list[str], column: str) -> np.ndarray:
    """The ``column`` score of every web text in kept/ and rejected/ of these shards (one float32 array)."""
    parts = []
    for shard_id in shard_ids:
        kept_path, rejected_path = layout.output(KEPT, shard_id), layout.output(REJECTED, shard_id)
        if not FileSystems.exists(kept_path):  # a damaged input shard of which nothing could be read
            continue
        kept = _read(kept_path, ["sample_id", "source", column])
        rejected = _read(rejected_path, ["sample_id", "source", column])
        again = pc.is_in(rejected.column("sample_id"), value_set=kept.column("sample_id"))  # a move killed halfway
        for table in (kept, rejected.filter(pc.invert(again))):
            web = table.filter(pc.equal(table.column("source"), schema.WEB)).column(column)
            if web.null_count:
                raise RefilterError(f"shard {shard_id} of {layout.root} has web texts without {column}: it holds no "
                                    "scores to refilter by")
            parts.append(web.to_numpy().astype(np.float32))
    return np.concatenate(parts) if parts else np.empty(0, np.float32)


def keep_fraction_threshold(scores: np.ndarray, fraction: float) -> float:
    """The threshold at which ``fraction`` of ``scores`` pass: the ⌈fraction·N⌉-th highest score (ties with it pass
    too, so a threshold cannot cut between equal scores)."""
    if not scores.size:
        raise RefilterError("the source has no web texts: a keep fraction of the web texts cannot be met")
    if np.isnan(scores).any():
        raise RefilterError("the source has scores that are not numbers (NaN)")
    keep = min(scores.size, max(1, math.ceil(fraction * scores.size - 1e-9)))  # the tolerance: 0.3 * 10 is 3.0000...4
    return float(np.partition(scores, scores.size - keep)[scores.size - keep])


def check_scored(source: OutputLayout, shard_ids: list[str], column: str, run_settings: dict) -> None:
    """A ``RefilterError`` when the source stores no ``column`` (``itm_score`` of a filter without an ITM head),
    found in the first shard with files (one column read), before anything is written."""
    for shard_id in shard_ids:
        paths = [path for path in (source.output(KEPT, shard_id), source.output(REJECTED, shard_id))
                 if FileSystems.exists(path)]
        if not paths:  # a damaged input shard of which nothing could be read
            continue
        scores = [_read(path, [column]).column(column) for path in paths]
        if not sum(len(s) for s in scores):  # no judged text (every row failed): the next shard tells
            continue
        if all(s.null_count == len(s) for s in scores):
            other = BY_ITC if column == SCORE_COLUMNS[BY_ITM] else BY_ITM
            raise RefilterError(
                f"{source.root} stores no {column}: its filter {run_settings.get('filter')!r} "
                f"({run_settings.get('filter_family', 'blip')}) has no such head; refilter it --by {other}")
        return


def make_plan(settings: RefilterSettings, source: OutputLayout, run_settings: dict, shard_ids: list[str]) -> Plan:
    """The output's settings: the source's, with the selection ``settings`` asks for (``by``: the source's unless
    given)."""
    by = settings.by or run_settings.get("by") or BY_ITM
    check_threshold(settings.threshold, by)
    check_scored(source, shard_ids, SCORE_COLUMNS[by], run_settings)
    threshold = settings.threshold
    if settings.keep_fraction is not None:
        threshold = keep_fraction_threshold(web_scores(source, shard_ids, SCORE_COLUMNS[by]), settings.keep_fraction)
    select = run_settings.get("select", SELECT_ALL) if settings.select is None else settings.select
    dedup = bool(run_settings.get("dedup_images", False)) if settings.dedup_images is None else settings.dedup_images
    return Plan({**run_settings, "schema_version": schema.SCHEMA_VERSION, "threshold": threshold, "select": select,
                 "dedup_images": dedup, "by": by,
                 "keep_fraction": settings.keep_fraction, "refiltered_from": source.root})


def _read(path: str, columns: list[str] | None = None) -> pa.Table:
    """The Parquet file at ``path``; one that does not read is a ``ValueError`` naming the file (pyarrow names
    a ``<Buffer>``)."""
    with FileSystems.open(path) as f:
        try:
            return pq.read_table(f, columns=columns)
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{path} cannot be read ({' '.join(str(error).split())}): replace it from a copy, or "
                             "delete its shard's marker (.capfilt/done/SHARD.json) in the source and rerun capfilt "
                             "bootstrap there, which writes the shard again") from None


def _plain(schema_: pa.Schema) -> pa.Schema:
    """A schema read from a file without pyarrow's own metadata (capfilt's and HF datasets' keys stay)."""
    metadata = {k: v for k, v in (schema_.metadata or {}).items() if k != b"ARROW:schema"}
    return schema_.with_metadata(metadata)


def _rows_of(sample_ids: pa.ChunkedArray, shard_id: str, path: str) -> np.ndarray:
    """The input row of each ``sample_id`` (``{shard}_{row:09d}_{source}{index}``)."""
    prefix = f"{shard_id}_"
    if len(sample_ids) and not pc.all(pc.starts_with(sample_ids, prefix)).as_py():
        raise RefilterError(f"{path} has sample_ids that are not of shard {shard_id} ({prefix}<row>_...)")
    digits = pc.utf8_slice_codeunits(sample_ids, len(prefix), len(prefix) + 9)
    try:
        return pc.cast(digits, pa.int64()).to_numpy()
    except pa.ArrowInvalid:
        raise RefilterError(f"{path} has sample_ids without their row ({prefix}<9 digits>_...)") from None


@dataclass
class Inputs:
    """Where a source's input shards are: as it recorded them, or under ``override`` (``--input``)."""

    source: OutputLayout
    override: str | None = None
    _listed: dict | None = None

    def shard(self, marker: dict) -> InputShard:
        shard_id, recorded = marker["shard"], marker.get("input") or ""
        where = f"(recorded in {self.source.marker(shard_id)}; a relative path is relative to the folder bootstrap " \
                "ran in)"
        if self.override is not None:
            if self._listed is None:
                try:
                    self._listed = {s.shard_id: s for s in list_shards(self.override)}
                except ShardError as error:
                    raise RefilterError(f"--input {self.override}: {error}") from None
            if shard_id not in self._listed:
                raise RefilterError(f"--input {self.override} has no input shard {shard_id} (the source's was "
                                    f"{recorded})")
            return self._listed[shard_id]
        try:
            found = list_shards(recorded) if recorded and FileSystems.exists(recorded) else []
        except ShardError:
            found = []
        if len(found) != 1 or found[0].shard_id != shard_id:
            raise RefilterError(f"the input shard {recorded!r} of shard {shard_id} is not reachable {where}: texts "
                                "the new split keeps need its image bytes. Give --input with the folder its input "
                                "shards are in now")
        return found[0]

    def images(self, marker: dict, wanted: dict[int, str]) -> dict[str, bytes]:
        """The bytes of the input rows ``wanted`` (row -> the SHA-256 the source recorded for it), by SHA-256."""
        shard = self.shard(marker)
        found: dict[str, bytes] = {}
        try:
            reader = ShardReader(shard)
            rows = reader.rows()
            try:
                for row in rows:
                    sha = wanted.get(row.index)
                    if sha is None:
                        continue
                    if row.image is None or hashlib.sha256(row.image).hexdigest() != sha:
                        raise RefilterError(f"row {row.index} of the input shard {shard.path} is not the image "
                                            f"{sha[:16]}... that {self.source.root} judged: the input changed since")
                    found[sha] = row.image
                    if len(found) == len(wanted):
                        break
            finally:
                rows.close()
        except (DamagedShardError, ShardError, OSError) as error:
            raise RefilterError(f"cannot read the input shard {shard.path}: {error}") from None
        missing = sorted(row for row, sha in wanted.items() if sha not in found)
        if missing:
            raise RefilterError(f"the input shard {shard.path} has no image for row(s) {missing[:5]} that "
                                f"{self.source.root} judged")
        return found


@dataclass
class SourceShard:
    """One finished shard of the source, read: its kept/ (with the images), rejected/ and failed/ files, their
    provenance and the name of kept/'s image column."""

    kept: pa.Table
    rejected: pa.Table
    failed: pa.Table
    provenance: dict
    image: str


def read_source_shard(source: OutputLayout, shard_id: str) -> SourceShard:
    """A shard's three files in ``source``, checked to be CapFilt kept/ and rejected/ files refilter can split."""
    paths = {kind: source.output(kind, shard_id) for kind in (KEPT, REJECTED, FAILED)}
    kept, rejected, failed = (_read(paths[kind]) for kind in (KEPT, REJECTED, FAILED))
    kept, rejected = schema.with_download_status(kept), schema.with_download_status(rejected)  # version 4's lack them
    provenance = schema.read_provenance(kept.schema)
    _check_version(provenance.get("schema_version"), paths[KEPT])
    image = next((name for name in kept.schema.names if name in IMAGE_COLUMNS), None)
    pair_names = set(rejected.schema.names) - {"reason"}
    if image is None or NEEDED_COLUMNS - pair_names or set(kept.schema.names) - {image} != pair_names:
        raise RefilterError(f"{paths[KEPT]} and {paths[REJECTED]} are not CapFilt kept/ and rejected/ files of "
                            f"schema version {MIN_SCHEMA_VERSION} or later (lacking "
                            f"{sorted(NEEDED_COLUMNS - pair_names)})")
    return SourceShard(kept, rejected, failed, provenance, image)


def _judged_texts(kept: pa.Table, rejected: pa.Table, shard_id: str, path: str) -> tuple[pa.Table, np.ndarray]:
    """Every judged text of a shard once (kept/'s without the image, then rejected/'s without ``reason``) in the
    pipeline's order: by input row, then the web text, then the captions by index; and each text's input row."""
    pair_names = [name for name in rejected.schema.names if name != "reason"]
    again = pc.is_in(rejected.column("sample_id"), value_set=kept.column("sample_id"))  # a move killed halfway
    rejected = rejected.filter(pc.invert(again))
    texts = pa.concat_tables([kept.select(pair_names).replace_schema_metadata(None),
                              rejected.select(pair_names).replace_schema_metadata(None)])
    rows = _rows_of(texts.column("sample_id"), shard_id, path)
    synthetic = pc.not_equal(texts.column("source"), schema.WEB).to_numpy()
    order = np.lexsort((texts.column("source_index").to_numpy(), synthetic, rows))
    texts = texts.take(pa.array(order))
    ids = texts.column("sample_id")
    if texts.num_rows > 1 and pc.any(pc.equal(ids.slice(1), ids.slice(0, texts.num_rows - 1))).as_py():
        raise RefilterError(f"{path}: shard {shard_id} holds a text twice in kept/ and rejected/")
    return texts, rows[order]


def _check_judged(texts: pa.Table, marker: dict, source: OutputLayout, column: str) -> None:
    """The texts are those the shard's marker counts (per source), each with the score ``column`` it is judged by
    (a filter without an ITM head stores no ``itm_score``, and needs none)."""
    shard_id = marker["shard"]
    sources = texts.column("source")
    judged = {name: pc.sum(pc.equal(sources, name)).as_py() or 0 for name in schema.SOURCES}
    expected = {name: marker["kept"][name] + marker["rejected"][name] for name in schema.SOURCES}
    if judged != expected:
        raise RefilterError(f"shard {shard_id} of {source.root}: kept/ and rejected/ hold {judged} texts, its marker "
                            f"counts {expected}: the folder is not what its run wrote")
    if texts.column(column).null_count:
        raise RefilterError(f"shard {shard_id} of {source.root} has texts without {column}: nothing to refilter by")


def _image_starts(rows: np.ndarray) -> np.ndarray:
    """Where each image's texts start among texts grouped by input row (``rows``)."""
    return np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if rows.size else np.empty(0, np.int64)


def _select(plan: Plan, texts: pa.Table, rows: np.ndarray, stats: ShardStats) -> np.ndarray:
    """Each text's outcome code under the plan: the pipeline's selection (``selection.select``) over the whole
    shard, counted in ``stats`` as the pipeline counts a batch."""
    starts = _image_starts(rows)
    captions = texts.column("caption")
    codes = select(plan, np.diff(np.r_[starts, rows.size]), texts.column(plan.score_column).to_numpy(),
                   lambda start, stop: captions.slice(start, stop - start).to_pylist(),
                   texts.column("image_sha256").take(pa.array(starts, pa.int64())).to_pylist(), stats.kept_images)
    stats.images = len(starts)
    stats.add_texts(texts.column("source").to_numpy(zero_copy_only=False), texts.column(plan.score_column).to_numpy(),
                    codes)
    stats.web_missing = stats.images - stats.kept[schema.WEB] - stats.rejected[schema.WEB]
    return codes


@dataclass
class ImagePool:
    """The image bytes at hand for a shard: its source kept/'s, then those fetched from the input shard, in one
    large_binary array (64-bit offsets: a shard's images may pass 2 GiB), and where each SHA-256's bytes are."""

    data: pa.ChunkedArray
    at: dict[str, int]

    def take(self, shas: list[str]) -> pa.Array:
        """The bytes of these images (each at hand), as a binary array."""
        index = pa.array([self.at[sha] for sha in shas], pa.int64())
        return self.data.take(index).combine_chunks().cast(pa.binary())

    def get(self, sha: str) -> bytes | None:
        return self.data[self.at[sha]].as_py() if sha in self.at else None


def _kept_images(texts: pa.Table, rows: np.ndarray, codes: np.ndarray) -> dict[str, int]:
    """The images with a kept text: SHA-256 -> the first input row that has it, in the order of the kept texts."""
    keep = np.flatnonzero(codes == KEPT_CODE)
    shas = texts.column("image_sha256").take(pa.array(keep, pa.int64())).to_pylist()
    first: dict[str, int] = {}
    for sha, row in zip(shas, rows[keep].tolist()):
        first.setdefault(sha, row)
    return first


def _image_pool(shard: SourceShard, wanted: dict[str, int], inputs: Inputs, marker: dict) -> ImagePool:
    """The bytes of the images ``wanted`` (SHA-256 -> its first input row): from source kept/ (any row with the same
    SHA-256), else read from the input shard's row."""
    kept = shard.kept
    firsts = pa.table({"sha": kept.column("image_sha256"), "at": pa.array(np.arange(kept.num_rows))}) \
        .group_by("sha", use_threads=False).aggregate([("at", "min")])
    at = dict(zip(firsts.column("sha").to_pylist(), firsts.column("at_min").to_pylist()))
    missing = {row: sha for sha, row in wanted.items() if sha not in at}
    fetched = inputs.images(marker, missing) if missing else {}
    order = list(fetched)
    chunks = [chunk.cast(pa.large_binary()) for chunk in pc.struct_field(kept.column(shard.image), "bytes").chunks]
    data = pa.chunked_array(chunks + [pa.array([fetched[sha] for sha in order], pa.large_binary())],
                            type=pa.large_binary())
    return ImagePool(data, {**at, **{sha: kept.num_rows + j for j, sha in enumerate(order)}})


def _write_kept(path: str, schema_: pa.Schema, image: str, kept: pa.Table, pool: ImagePool) -> None:
    """kept/: the kept texts with their images (bytes from ``pool``, no path), a row group at a time."""
    fields = list(schema_.field(image).type)
    shas = kept.column("image_sha256").to_pylist()

    def groups():
        for start in range(0, kept.num_rows, ROW_GROUP_ROWS):
            part = kept.slice(start, ROW_GROUP_ROWS)
            data = pool.take(shas[start:start + ROW_GROUP_ROWS])
            struct = pa.StructArray.from_arrays([data, pa.nulls(len(data), pa.string())], fields=fields)
            yield pa.Table.from_arrays([pa.chunked_array([struct]) if name == image else part.column(name)
                                        for name in schema_.names], schema=schema_)

    write_groups(path, schema_, groups())


def _write_files(folder: str, plan: Plan, shard: SourceShard, texts: pa.Table, codes: np.ndarray,
                 pool: ImagePool) -> dict[str, str]:
    """The new kept/, rejected/ and failed/ (its rows unchanged) of a shard under ``folder``, with the plan's
    settings in their provenance and in every row's ``capfilt_config``; their paths by kind."""
    config = plan.config(shard.provenance.get("config", {}))
    provenance = {**{k: v for k, v in shard.provenance.items() if k != "schema_version"}, "config": config}
    texts = texts.set_column(texts.schema.get_field_index("capfilt_config"), "capfilt_config",
                             pa.array([json.dumps(config, sort_keys=True)] * texts.num_rows, pa.string()))
    schemas = {kind: schema.with_provenance(_plain(table.schema), provenance)
               for kind, table in ((KEPT, shard.kept), (REJECTED, shard.rejected), (FAILED, shard.failed))}
    files = {kind: FileSystems.join(folder, f"{kind}.parquet") for kind in (KEPT, REJECTED, FAILED)}
    keep, dropped = np.flatnonzero(codes == KEPT_CODE), np.flatnonzero(codes != KEPT_CODE)
    _write_kept(files[KEPT], schemas[KEPT], shard.image, texts.take(pa.array(keep, pa.int64())), pool)
    rejected = texts.take(pa.array(dropped, pa.int64())).append_column(
        "reason", pa.array(REASON_OF_CODE[codes[dropped]].tolist(), pa.string()))
    write_table(files[REJECTED], rejected.select(schemas[REJECTED].names).cast(schemas[REJECTED]), schemas[REJECTED])
    write_table(files[FAILED], shard.failed.cast(schemas[FAILED]), schemas[FAILED])
    return files


def _take_samples(plan: Plan, stats: ShardStats, texts: pa.Table, codes: np.ndarray, pool: ImagePool) -> None:
    """The report's examples, chosen as the pipeline chooses them (``ShardStats.wanted_samples``) among the texts
    whose image bytes are at hand."""
    shas = texts.column("image_sha256")
    usable = pc.is_in(shas, value_set=pa.array(list(pool.at), pa.string())).to_numpy(zero_copy_only=False)
    picks = stats.wanted_samples(texts.column("source").to_numpy(zero_copy_only=False), codes == KEPT_CODE, usable)
    for i in picks:
        row = texts.slice(i, 1).to_pylist()[0]
        stats.samples.append(example(row["key"], row["caption"], row["source"], row[plan.score_column],
                                     REASON_OF_CODE[codes[i]], pool.get(row["image_sha256"]), row.get("exif"),
                                     plan.by))


def _shard_stats(marker: dict) -> ShardStats:
    """A shard's stats as its source marker has them before any text is judged: rows, failed rows, damage, keys."""
    stats = ShardStats(shard=marker["shard"], input=marker.get("input", ""), rows=marker["rows"],
                       damaged=marker.get("damaged"))
    stats.failed.update(marker["failed"])
    stats.keys.duplicates = marker["duplicate_keys"]["rows"]
    stats.keys.examples = list(marker["duplicate_keys"]["examples"])
    return stats


def refilter_shard(plan: Plan, source: OutputLayout, target: OutputLayout, marker: dict, inputs: Inputs) -> dict:
    """Refilter one finished shard of ``source`` into ``target`` and commit it, with its marker (the stats as the
    pipeline's ``ShardStats`` has them before the cross-shard step); returns the marker."""
    started = time.perf_counter()
    shard_id = marker["shard"]
    kept_path = source.output(KEPT, shard_id)
    if not FileSystems.exists(kept_path):
        if marker.get("damaged"):  # a damaged input shard of which nothing could be read: no files, as in source
            target.commit_damaged(shard_id, marker)
            return marker
        raise RefilterError(f"{kept_path} is missing, but {source.marker(shard_id)} says the shard is done")
    shard = read_source_shard(source, shard_id)
    # 1. Every judged text once, in the pipeline's order, as the shard's marker counts them, with its scores.
    texts, rows = _judged_texts(shard.kept, shard.rejected, shard_id, kept_path)
    _check_judged(texts, marker, source, plan.score_column)
    # 2. The rules, and the counts.
    stats = _shard_stats(marker)
    stats.by = plan.by  # its histogram: of the score that judges
    stats.run = target.run  # this job's shards: the report's "this job" time
    codes = _select(plan, texts, rows, stats)
    stats.check(int(plan.settings["num_captions"]))  # every input row and every text accounted for
    # 3. The image of each kept text: from source kept/, else the input shard's row.
    pool = _image_pool(shard, _kept_images(texts, rows, codes), inputs, marker)
    # 4. Write and commit.
    folder = target.temp_dir(shard_id)
    try:
        files = _write_files(folder, plan, shard, texts, codes, pool)
        _take_samples(plan, stats, texts, codes, pool)
        stats.seconds = time.perf_counter() - started
        new_marker = {**stats.to_dict(), "sampling": marker.get("sampling")}
        target.commit(shard_id, files, new_marker, keys=_key_hashes(source, shard_id),
                      images=stats.kept_images.hashes_file())
    except BaseException:
        target.discard(folder)
        raise
    return new_marker


def _key_hashes(source: OutputLayout, shard_id: str) -> bytes | None:
    """The source shard's key hashes file (``.capfilt/done/{shard}.keys``), None when it has none."""
    path = source.keys_file(shard_id)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return f.read()


def _same_folder(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def refilter(settings: RefilterSettings, source: str, out: str, report: bool = True,
             show_progress: bool = False) -> dict:
    """Write ``out`` from ``source``'s stored scores with ``settings``; returns its stats (``stats.json``).

    Resumes: shards finished in ``out`` by an earlier refilter with the same settings are kept. ``show_progress``:
    shards done so far on stderr (``capfilt.console_progress``), as the command line does.
    """
    if _same_folder(source, out):
        raise RefilterError(f"--out {out} is the source folder: write the new split to a folder of its own")
    source_layout = OutputLayout.existing(source)  # an output of schema version 4 has its markers in _done/
    run_settings = read_run_settings(source_layout)
    markers = source_layout.read_markers()
    if not markers:
        raise RefilterError(f"{source} has no finished shard (no {source}/{source_layout.done}/*.json) to refilter")
    plan = make_plan(settings, source_layout, run_settings, [m["shard"] for m in markers])
    layout = OutputLayout(out)
    layout.claim(plan.provenance())
    layout.sweep_temp()
    layout = layout.start_run(local=True)
    inputs = Inputs(source_layout, settings.input)
    try:
        with progress(len(markers), "refilter" if show_progress else None, unit="shard") as advance:
            for marker in markers:
                if not layout.is_done(marker["shard"]):
                    refilter_shard(plan, source_layout, layout, marker, inputs)
                advance(1)
        if plan.dedup_images:
            drop_duplicate_images(layout)
        return write_summary(layout, plan, len(markers), report=report)
    finally:
        layout.end_run()


def unfinished_in_source(source: str) -> list[str]:
    """The shards the source's own stats.json lists as unfinished: they are not refiltered."""
    layout = OutputLayout.existing(source)
    if not FileSystems.exists(layout.stats_file):
        return []
    errors = json.loads(read_text(layout.stats_file))["shards"]["errors"]
    done = layout.done_ids()
    return sorted(e["shard"] for e in errors if e["shard"] not in done)
