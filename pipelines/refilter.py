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
  (the ITC cosine similarity of the filter's unimodal features, -1 to 1).
  ``--by itc --keep-fraction F`` is DataComp's CLIP-score filter (keep the
  pairs with the highest image-text cosine similarity) on the filter's own
  ITC head. With ``--select top-N`` texts are ranked by the same score.
- ``select`` and ``dedup_images``: OUT's unless given.

Per shard (``refilter_shard``), vectorised with pyarrow and numpy, one shard
in memory at a time (its texts, and the image bytes of its kept/):

1. kept/ and rejected/ of OUT are read (kept/'s images apart), put in the
   pipeline's order (input row, then the web text and the captions by index,
   from ``sample_id``) and checked against the shard's marker: every text once,
   every score present;
2. the rules: a text's score against T for every text at once; an image
   with two or more texts that pass goes through ``selection.reasons`` (rules
   1-3 in full: duplicate texts, top N), an image with one or none cannot
   lose a text to rules 2-3. Then the shard's own duplicate images (rule 4,
   each image kept at its first row with a kept text, by the 64-bit hash the
   pipeline uses);
3. each text that is kept needs its image: the bytes of any kept row of OUT's
   shard with the same SHA-256, else the input shard's row, read by
   reference with the pipeline's own reader (``capfilt.pipelines.shards``,
   Parquet or webdataset): the input shard recorded in OUT's marker (``input``,
   also in every file's provenance) and the row in the ``sample_id``
   (``{shard}_{row:09d}_...``). An input that is not reachable, or whose row
   is not the image OUT judged (its SHA-256), is an error that names it,
   never a dropped text; ``input`` (``--input``) says where the input shards
   are now;
4. kept/, rejected/ and failed/ (rows unchanged) are written and committed
   with the shard's marker, key hashes (OUT's) and kept-image hashes, as the
   pipeline commits a shard.

Then, with ``dedup_images``, the pipeline's cross-shard step
(``capfilt.pipelines.image_dedup``), and the summary. A rerun into the same
OUT2 skips finished shards; OUT2's ``_run.json`` holds its settings: OUT's,
with the new ``threshold``, ``select`` and ``dedup_images``, and ``by``,
``keep_fraction`` and ``refiltered_from`` (OUT). The same settings are in
every file's provenance and every row's ``capfilt_config``: a refiltered
row's config is a fresh run's plus those three keys.
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
from capfilt.pipelines import schema
from capfilt.pipelines.layout import FAILED, KEPT, REJECTED, RUN_FILE, OutputLayout, read_text
from capfilt.pipelines.selection import SELECT_ALL, parse_select, reasons
from capfilt.pipelines.shards import DamagedShardError, InputShard, ShardError, ShardReader, list_shards
from capfilt.pipelines.stats import HISTOGRAM_BINS, KEY_HASH_DTYPE, MAX_KEY_EXAMPLES, ShardStats

BY_ITM, BY_ITC = "itm", "itc"
BY = (BY_ITM, BY_ITC)
SCORE_COLUMNS = {BY_ITM: "itm_score", BY_ITC: "itc_score"}
SCORE_RANGES = {BY_ITM: (0.0, 1.0), BY_ITC: (-1.0, 1.0)}  # a probability; a cosine similarity
# From version 3 rejected/ holds every removed text with its scores and reason; from version 4 a row's place (in
# sample_id, and where refilter finds its image in the input shard) is its place in key order.
MIN_SCHEMA_VERSION = 4
FLUSH_ROWS = 256  # kept rows per row group written, as the pipeline writes them (process.FLUSH_ROWS)
# A text's outcome as a small integer: 0 kept, then the reasons in schema.REASONS' order.
KEPT_CODE = 0
CODES = {reason: code for code, reason in enumerate(schema.REASONS, start=1)}
REASON_OF_CODE = np.array([None, *schema.REASONS], dtype=object)
# The settings a refilter adds to its source's (in _run.json, stats.json, every file's and row's config).
REFILTER_KEYS = ("by", "keep_fraction", "refiltered_from")


class RefilterError(ValueError):
    """A source that cannot be refiltered, or an input it needs that is not there; the message says which."""


@dataclass(frozen=True)
class RefilterSettings:
    """What ``refilter`` changes; exactly one of ``threshold`` and ``keep_fraction``.

    - ``threshold``: a text passes when its score is at least this (an ITM probability in [0, 1], an ITC cosine in
      [-1, 1]); None: from ``keep_fraction``.
    - ``keep_fraction``: in (0, 1]: the threshold that makes this share of the web texts pass (the module's
      docstring); None: ``threshold`` is given.
    - ``by`` ``itm`` (the default, the paper's filter) or ``itc`` (DataComp's CLIP score, on the filter's ITC head).
    - ``select`` (``all`` or ``top-N``) and ``dedup_images``: None (the default) keeps the source run's.
    - ``input``: where the source's input shards are now (a folder, glob or file; their ids are matched); None
      (the default): the paths the source recorded.
    """

    threshold: float | None = None
    keep_fraction: float | None = None
    by: str = BY_ITM
    select: str | None = None
    dedup_images: bool | None = None
    input: str | None = None

    def __post_init__(self):
        if (self.threshold is None) == (self.keep_fraction is None):
            raise RefilterError("give either a threshold or a keep fraction (exactly one of them)")
        if self.by not in BY:
            raise RefilterError(f"by must be one of {BY}, not {self.by!r}")
        low, high = SCORE_RANGES[self.by]
        if self.threshold is not None and not low <= self.threshold <= high:
            raise RefilterError(f"a threshold on {SCORE_COLUMNS[self.by]} is in [{low}, {high}], not {self.threshold}")
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            raise RefilterError(f"the keep fraction is a share of the web texts in (0, 1], not {self.keep_fraction}")
        if self.select is not None:
            parse_select(self.select)


@dataclass(frozen=True)
class Plan:
    """One refilter's resolved selection. ``settings`` (the output's ``_run.json``) is the source's settings
    with the new ``threshold``, ``select``, ``dedup_images`` and ``REFILTER_KEYS``; ``provenance()`` and
    ``dedup_images`` are what the pipeline's summary (``report.write_summary``) reads of a run's settings."""

    settings: dict

    @property
    def threshold(self) -> float:
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
        return {**source_config, **{k: self.settings[k] for k in ("threshold", "select", "dedup_images",
                                                                  *REFILTER_KEYS)}}


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


def make_plan(settings: RefilterSettings, source: OutputLayout, run_settings: dict, shard_ids: list[str]) -> Plan:
    """The output's settings: the source's, with the selection ``settings`` asks for."""
    threshold = settings.threshold
    if settings.keep_fraction is not None:
        threshold = keep_fraction_threshold(web_scores(source, shard_ids, SCORE_COLUMNS[settings.by]),
                                            settings.keep_fraction)
    select = run_settings.get("select", SELECT_ALL) if settings.select is None else settings.select
    dedup = bool(run_settings.get("dedup_images", False)) if settings.dedup_images is None else settings.dedup_images
    return Plan({**run_settings, "threshold": threshold, "select": select, "dedup_images": dedup, "by": settings.by,
                 "keep_fraction": settings.keep_fraction, "refiltered_from": source.root})


def _read(path: str, columns: list[str] | None = None) -> pa.Table:
    """The Parquet file at ``path``; one that does not read is a ``ValueError`` naming the file (pyarrow names
    a ``<Buffer>``)."""
    with FileSystems.open(path) as f:
        try:
            return pq.read_table(f, columns=columns)
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{path} cannot be read ({' '.join(str(error).split())}): replace it from a copy, or "
                             "delete its shard's _done/SHARD.json in the source and rerun capfilt bootstrap there, "
                             "which writes the shard again") from None


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


def image_hashes(sha256_hex: list[str]) -> np.ndarray:
    """``stats.image_hash`` of each SHA-256 (hex), as uint64: the first 8 bytes, little-endian."""
    if not sha256_hex:
        return np.empty(0, KEY_HASH_DTYPE)
    return np.frombuffer(bytes.fromhex("".join(sha[:16] for sha in sha256_hex)), dtype=KEY_HASH_DTYPE)


def select_texts(rows: np.ndarray, scores: np.ndarray, shas: list[str], texts_of, threshold: float,
                 top_n: int | None, dedup_images: bool) -> tuple[np.ndarray, dict]:
    """Each text's outcome, ``KEPT_CODE`` or ``CODES[reason]``, for the texts of a shard in the pipeline's order
    (``rows``: each text's input row, grouped), and the shard's duplicate images (rule 4 within the shard)
    ``{"images": n, "examples": [sha256, ...], "hashes": the kept images' uint64 hashes, sorted}``.

    ``scores``: each text's score (float32); ``shas``: each image's SHA-256 (hex), in image order;
    ``texts_of(start, stop)``: the texts of a range, read only for images that need rules 2-3.
    """
    n = rows.size
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if n else np.empty(0, np.int64)
    stops = np.r_[starts[1:], n].astype(np.int64)
    image_of = np.repeat(np.arange(starts.size), stops - starts)
    codes = np.where(scores.astype(np.float64) >= threshold, KEPT_CODE, CODES[schema.BELOW_THRESHOLD]).astype(np.int8)
    passing = np.add.reduceat(codes == KEPT_CODE, starts) if n else np.empty(0, np.int64)
    score_list = None
    for image in np.flatnonzero(passing >= 2):  # only there can rules 2-3 remove a text that passed
        start, stop = int(starts[image]), int(stops[image])
        if score_list is None:
            score_list = scores.tolist()  # float32 values as Python floats, exactly as the pipeline compared them
        why = reasons(texts_of(start, stop), score_list[start:stop], threshold, top_n)
        codes[start:stop] = [KEPT_CODE if reason is None else CODES[reason] for reason in why]
    # Rule 4 within the shard, as the pipeline tallies it: an image with a kept text whose 64-bit hash an earlier
    # row with a kept text had.
    with_kept = np.flatnonzero(np.add.reduceat(codes == KEPT_CODE, starts) > 0) if n else np.empty(0, np.int64)
    hashes = image_hashes([shas[i] for i in with_kept])
    distinct, first = np.unique(hashes, return_index=True)
    repeated = np.ones(with_kept.size, dtype=bool)
    repeated[first] = False
    examples: list[str] = []
    for i in np.flatnonzero(repeated):
        if len(examples) == MAX_KEY_EXAMPLES:
            break
        if shas[with_kept[i]] not in examples:
            examples.append(shas[with_kept[i]])
    if dedup_images and repeated.any():
        dropped = np.zeros(starts.size, dtype=bool)
        dropped[with_kept[repeated]] = True
        codes[(codes == KEPT_CODE) & dropped[image_of]] = CODES[schema.DUPLICATE_IMAGE]
    return codes, {"images": int(repeated.sum()), "examples": examples, "hashes": distinct.astype(KEY_HASH_DTYPE)}


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


def _samples(texts: pa.Table, codes: np.ndarray, image_bytes) -> list[dict]:
    """The report's examples, chosen as the pipeline chooses them (the first few per source and outcome, in order),
    among the texts whose image bytes are at hand (``image_bytes(sha256)``: the bytes, or None)."""
    from capfilt.images import recorded_orientation
    from capfilt.pipelines.process import thumbnail
    from capfilt.pipelines.stats import MAX_SAMPLES_PER_CELL

    sources = texts.column("source").to_pylist()
    taken = {(source, kept): 0 for source in schema.SOURCES for kept in (True, False)}
    samples = []
    for i, source in enumerate(sources):
        kept = bool(codes[i] == KEPT_CODE)
        if taken.get((source, kept), MAX_SAMPLES_PER_CELL) >= MAX_SAMPLES_PER_CELL:
            if min(taken.values()) >= MAX_SAMPLES_PER_CELL:
                break
            continue
        row = texts.slice(i, 1).to_pylist()[0]
        data = image_bytes(row["image_sha256"])
        if data is None:
            continue
        tag = row.get("exif")
        samples.append({"key": row["key"], "text": row["caption"], "source": source, "itm": round(row["itm_score"], 4),
                        "kept": kept, "reason": REASON_OF_CODE[codes[i]],
                        "thumbnail": thumbnail(data, recorded_orientation(tag) if isinstance(tag, str) else None)})
        taken[(source, kept)] += 1
    return samples


def _write(path: str, table: pa.Table, schema_: pa.Schema) -> None:
    with FileSystems.create(path) as out, pq.ParquetWriter(out, schema_) as writer:
        for start in range(0, table.num_rows, FLUSH_ROWS):
            writer.write_table(table.slice(start, FLUSH_ROWS))


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


def refilter_shard(plan: Plan, source: OutputLayout, target: OutputLayout, marker: dict, inputs: Inputs) -> dict:
    """Refilter one finished shard of ``source`` into ``target`` and commit it; returns its marker."""
    started = time.perf_counter()
    shard_id = marker["shard"]
    paths = {kind: source.output(kind, shard_id) for kind in (KEPT, REJECTED, FAILED)}
    if not FileSystems.exists(paths[KEPT]):
        if marker.get("damaged"):  # a damaged input shard of which nothing could be read: no files, as in source
            target.commit_damaged(shard_id, marker)
            return marker
        raise RefilterError(f"{paths[KEPT]} is missing, but {source.marker(shard_id)} says the shard is done")
    kept, rejected, failed = (_read(paths[kind]) for kind in (KEPT, REJECTED, FAILED))
    provenance = schema.read_provenance(kept.schema)
    _check_version(provenance.get("schema_version"), paths[KEPT])
    image = next((name for name in kept.schema.names if name in IMAGE_COLUMNS), None)
    pair_names = set(rejected.schema.names) - {"reason"}
    needed = {"sample_id", "key", "source", "source_index", "caption", "itm_score", "itc_score", "image_sha256",
              "capfilt_config"}
    if image is None or needed - pair_names or set(kept.schema.names) - {image} != pair_names:
        raise RefilterError(f"{paths[KEPT]} and {paths[REJECTED]} are not CapFilt kept/ and rejected/ files of "
                            f"schema version {MIN_SCHEMA_VERSION} or later (lacking {sorted(needed - pair_names)})")

    # 1. Every judged text once, in the pipeline's order, as the shard's marker counts them, with its scores.
    texts, rows = _judged_texts(kept, rejected, shard_id, paths[KEPT])
    synthetic = pc.equal(texts.column("source"), schema.SYNTHETIC).to_numpy()
    judged = {schema.WEB: int((~synthetic).sum()), schema.SYNTHETIC: int(synthetic.sum())}
    expected = {name: marker["kept"][name] + marker["rejected"][name] for name in schema.SOURCES}
    if judged != expected:
        raise RefilterError(f"shard {shard_id} of {source.root}: kept/ and rejected/ hold {judged} texts, its marker "
                            f"counts {expected}: the folder is not what its run wrote")
    for column in ("itm_score", "itc_score"):
        if texts.column(column).null_count:
            raise RefilterError(f"shard {shard_id} of {source.root} has texts without {column}: nothing to refilter by")

    # 2. The rules.
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if rows.size else np.empty(0, np.int64)
    shas = texts.column("image_sha256").take(pa.array(starts, pa.int64())).to_pylist()
    captions = texts.column("caption")
    codes, images = select_texts(rows, texts.column(plan.score_column).to_numpy(), shas,
                                 lambda a, b: captions.slice(a, b - a).to_pylist(), plan.threshold, plan.top_n,
                                 plan.dedup_images)

    # 3. The image of each kept text: from source kept/ (any row with the same SHA-256), else the input shard's row.
    # One pool of bytes, source kept/'s then the fetched ones; 64-bit offsets: a shard's images may pass 2 GiB.
    kept_bytes = pc.struct_field(kept.column(image), "bytes")
    firsts = pa.table({"sha": kept.column("image_sha256"), "at": pa.array(np.arange(kept.num_rows))}) \
        .group_by("sha", use_threads=False).aggregate([("at", "min")])
    kept_at = dict(zip(firsts.column("sha").to_pylist(), firsts.column("at_min").to_pylist()))
    keep = np.flatnonzero(codes == KEPT_CODE)
    keep_shas = texts.column("image_sha256").take(pa.array(keep, pa.int64())).to_pylist()
    first_rows: dict[str, int] = {}
    for i, sha in enumerate(keep_shas):
        if sha not in kept_at:
            first_rows.setdefault(sha, int(rows[keep[i]]))
    fetched = inputs.images(marker, {row: sha for sha, row in first_rows.items()}) if first_rows else {}
    order = list(fetched)
    pool = pa.chunked_array([chunk.cast(pa.large_binary()) for chunk in kept_bytes.chunks]
                            + [pa.array([fetched[sha] for sha in order], pa.large_binary())], type=pa.large_binary())
    at = {**kept_at, **{sha: kept.num_rows + j for j, sha in enumerate(order)}}
    index = np.fromiter((at[sha] for sha in keep_shas), dtype=np.int64, count=len(keep_shas))

    # 4. Write and commit, with the shard's counts as the pipeline's ShardStats has them before the cross-shard step.
    config = plan.config(provenance.get("config", {}))
    new_provenance = {**{k: v for k, v in provenance.items() if k != "schema_version"}, "config": config}
    texts = texts.set_column(texts.schema.get_field_index("capfilt_config"), "capfilt_config",
                             pa.array([json.dumps(config, sort_keys=True)] * texts.num_rows, pa.string()))
    kept_schema, rejected_schema, failed_schema = (schema.with_provenance(_plain(table.schema), new_provenance)
                                                   for table in (kept, rejected, failed))
    folder = target.temp_dir(shard_id)
    files = {kind: FileSystems.join(folder, f"{kind}.parquet") for kind in (KEPT, REJECTED, FAILED)}
    try:
        new_kept = texts.take(pa.array(keep, pa.int64()))
        image_fields = list(kept_schema.field(image).type)
        with FileSystems.create(files[KEPT]) as out, pq.ParquetWriter(out, kept_schema) as writer:
            for start in range(0, keep.size, FLUSH_ROWS):
                part = new_kept.slice(start, FLUSH_ROWS)
                data = pool.take(pa.array(index[start:start + FLUSH_ROWS])).combine_chunks().cast(pa.binary())
                struct = pa.StructArray.from_arrays([data, pa.nulls(len(data), pa.string())], fields=image_fields)
                columns = [pa.chunked_array([struct]) if name == image else part.column(name)
                           for name in kept_schema.names]
                writer.write_table(pa.Table.from_arrays(columns, schema=kept_schema))
        dropped = np.flatnonzero(codes != KEPT_CODE)
        new_rejected = texts.take(pa.array(dropped, pa.int64())).append_column(
            "reason", pa.array(REASON_OF_CODE[codes[dropped]].tolist(), pa.string()))
        _write(files[REJECTED], new_rejected.select(rejected_schema.names).cast(rejected_schema), rejected_schema)
        _write(files[FAILED], failed.cast(failed_schema), failed_schema)

        stats = ShardStats(shard=shard_id, input=marker.get("input", ""), rows=marker["rows"], images=len(starts),
                           web_missing=len(starts) - judged[schema.WEB], damaged=marker.get("damaged"))
        stats.failed.update(marker["failed"])
        itm = texts.column("itm_score").to_numpy().astype(np.float64)
        bins = np.minimum((itm * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)  # as ShardStats.add_text
        for s, name in enumerate(schema.SOURCES):
            mine = synthetic == (name == schema.SYNTHETIC)
            outcomes = np.bincount(codes[mine], minlength=len(schema.REASONS) + 1)
            stats.kept[name] = int(outcomes[KEPT_CODE])
            stats.rejected[name] = int(outcomes[1:].sum())
            for reason, code in CODES.items():
                stats.reasons[(reason, name)] = int(outcomes[code])
            stats.histogram[name] = np.bincount(bins[mine], minlength=HISTOGRAM_BINS).tolist()
        stats.keys.duplicates = marker["duplicate_keys"]["rows"]
        stats.keys.examples = list(marker["duplicate_keys"]["examples"])
        stats.kept_images.duplicates, stats.kept_images.examples = images["images"], images["examples"]
        stats.check(int(plan.settings["num_captions"]))  # every input row and every text accounted for

        def image_bytes(sha: str) -> bytes | None:
            return pool[at[sha]].as_py() if sha in at else None

        stats.samples = _samples(texts, codes, image_bytes)
        stats.seconds = time.perf_counter() - started
        new_marker = {**stats.to_dict(), "sampling": marker.get("sampling")}
        keys_path, keys = source.keys_file(shard_id), None
        if FileSystems.exists(keys_path):
            with FileSystems.open(keys_path) as f:
                keys = f.read()
        target.commit(shard_id, files, new_marker, keys=keys, images=images["hashes"].tobytes())
    except BaseException:
        target.discard(folder)
        raise
    return new_marker


def _same_folder(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def refilter(settings: RefilterSettings, source: str, out: str, report: bool = True) -> dict:
    """Write ``out`` from ``source``'s stored scores with ``settings``; returns its stats (``stats.json``).

    Resumes: shards finished in ``out`` by an earlier refilter with the same settings are kept.
    """
    from capfilt.pipelines.image_dedup import drop_duplicate_images
    from capfilt.pipelines.report import write_summary

    if _same_folder(source, out):
        raise RefilterError(f"--out {out} is the source folder: write the new split to a folder of its own")
    source_layout = OutputLayout(source)
    run_settings = read_run_settings(source_layout)
    markers = source_layout.read_markers()
    if not markers:
        raise RefilterError(f"{source} has no finished shard (no {source}/_done/*.json) to refilter")
    plan = make_plan(settings, source_layout, run_settings, [m["shard"] for m in markers])
    layout = OutputLayout(out)
    layout.claim(plan.provenance())
    layout.sweep_temp()
    layout = layout.start_run(local=True)
    inputs = Inputs(source_layout, settings.input)
    try:
        for marker in markers:
            if not layout.is_done(marker["shard"]):
                refilter_shard(plan, source_layout, layout, marker, inputs)
        if plan.dedup_images:
            drop_duplicate_images(layout)
        return write_summary(layout, plan, len(markers), report=report)
    finally:
        layout.end_run()


def unfinished_in_source(source: str) -> list[str]:
    """The shards the source's own stats.json lists as unfinished: they are not refiltered."""
    layout = OutputLayout(source)
    if not FileSystems.exists(layout.stats_file):
        return []
    errors = json.loads(read_text(layout.stats_file))["shards"]["errors"]
    done = layout.done_ids()
    return sorted(e["shard"] for e in errors if e["shard"] not in done)
