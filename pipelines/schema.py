"""The output's schema, written down once and versioned.

An output folder holds, per input shard, three Parquet files:

- ``kept/{shard}.parquet``: one row per kept (image, text) pair, with the
  image bytes, the input's key, url and metadata under img2dataset's names;
  ``caption`` is the pair's text (what a trainer reads), ``web_text`` the
  image's web text as the input gave it;
- ``rejected/{shard}.parquet``: one row per removed text, the same columns
  without the image bytes, and ``reason``: why it was removed (``REASONS``);
- ``failed/{shard}.parquet``: one row per input row that could not be judged
  (a damaged input row, a URL list line that did not parse, a refused URL, a
  download, decode, size or model error), with the stage and the error.

``sample_id`` is unique per output row across the three folders:
``{shard}_{row:09d}`` for a failed row and ``{shard}_{row:09d}_{source}{index}``
(``00042_000000017_web0``, ``00042_000000017_synthetic2``) for a judged text,
``row`` being the input row's place in its shard in key order (from 0; rows
without a key keep their place in the file: ``capfilt.pipelines.shards``), so
that it does not depend on the order in which img2dataset's downloads
finished. ``key`` is the input's own key, which may repeat (``stats.json``
counts duplicate keys); a row without one gets ``{shard}_{row:09d}``.

The image column (named as the input's: ``jpg``, ``png`` or ``webp``) is a struct ``{bytes, path}``, Hugging
Face ``datasets``' storage of its ``Image`` feature, and every kept file says so in its Parquet metadata
(``huggingface``: ``{"info": {"features": {"jpg": {"_type": "Image"}}}}``). Why not plain binary with that
metadata: ``datasets`` takes a feature from the metadata only when its storage type matches the column's
(``Features.from_arrow_schema``), so a binary column stays ``Value("binary")``. The struct costs pyarrow and
DuckDB readers one field access (``jpg.bytes``); loaders that want img2dataset's files get them from
``capfilt export-dataset`` (webdataset tars: ``.jpg``, ``.txt``, ``.json``). ``path`` is always null: the bytes
are the image.

Columns the input carries beyond img2dataset's reserved ones (``exif``,
``sha256``, a LAION ``NSFW``, the shapes world's ``kind`` and ``scene`` ...)
are passed through unchanged after the columns below. ``SCHEMA_VERSION``
changes whenever a column below changes name, type or meaning; it is written
into every file's Parquet metadata and into ``stats.json``.
"""

from __future__ import annotations

import json

import pyarrow as pa

from capfilt.columns import IMAGE_COLUMNS, INPUT_COLUMNS

# 2: sample_id; stage read (damaged input); null keys become {shard}_{row:09d}.
# 3: ``caption`` is the pair's text (was the web text; ``text`` stays, the same value, for readers of 1-2); the web
#    text moved to ``web_text`` (in failed/ too); the image column is a struct {bytes, path} typed as an HF datasets
#    ``Image``; ``image_sha256``; rejected/ has ``reason``; duplicate texts of an image are kept once.
# 4: rows in key order within a shard (``sample_id``'s row is the place in key order, not in the file); each
#    image's captions sampled with its own seed (from the run's seed and its key), so captions differ from those of
#    schema 3 runs; a mistyped input column and an oversized tar member fail rows at stage read.
# 5: kept/ and rejected/ carry img2dataset's ``status`` ("success") and ``error_message`` (null), so that readers of
#    img2dataset output that keep ``status == "success"`` read kept/ as is; the bookkeeping folders moved to
#    ``.capfilt/`` (``capfilt.pipelines.layout``), which datasets' and other loaders' globs skip.
SCHEMA_VERSION = 5
METADATA_KEY = b"capfilt"  # Parquet key-value metadata: JSON with schema_version, models, settings
HF_METADATA_KEY = b"huggingface"  # Parquet key-value metadata that HF datasets reads its features from

WEB, SYNTHETIC = "web", "synthetic"
SOURCES = (WEB, SYNTHETIC)

# Where a failed row failed, in pipeline order. ``read``: the input shard's bytes for the row could not be read (a
# damaged Parquet row group, a tar that breaks before the row's sample, a sample whose .json/.txt does not
# decode, a tar member too large to read) or hold a column of the wrong type (a caption of ints); its shard is
# listed as damaged (``capfilt.pipelines.shards``). ``parse``: a URL list line that could not be read (too many or
# too few fields); it is carried through the download as a row without URL, its text as the caption.
STAGES = ("read", "parse", "download", "decode", "size", "caption", "filter")

# Why a judged text is in rejected/ (its ``reason``): the first rule that removes it, in this order
# (``capfilt.pipelines.selection``, ``capfilt.pipelines.image_dedup``). Only the first is the filter's judgement
# (the paper's noise); the others remove texts the filter passed.
BELOW_THRESHOLD = "below threshold"  # ITM match probability below the threshold
DUPLICATE_TEXT = "duplicate text"  # the same normalised text as a text of the same image kept before it
NOT_IN_TOP_N = "not in top n"  # --select top-N: the image has N better-scoring texts that passed
DUPLICATE_IMAGE = "duplicate image"  # --dedup-images: the same image bytes are kept at an earlier (shard, row)
REASONS = (BELOW_THRESHOLD, DUPLICATE_TEXT, NOT_IN_TOP_N, DUPLICATE_IMAGE)

# The image column's type: HF datasets' Image storage (see the module's docstring).
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

# img2dataset's download outcome of a judged text's image: always downloaded (and decoded) well. An input row
# whose download failed is in failed/, with img2dataset's ``status`` and its ``error_message`` as ``error``.
SUCCESS = "success"
DOWNLOADED = {"status": SUCCESS, "error_message": None}

# Columns capfilt writes itself; an input column of the same name is not passed through.
_PAIR_FIELDS = [
    pa.field("sample_id", pa.string()),  # unique per output row: {shard}_{row:09d}_{source}{source_index}
    pa.field("key", pa.string()),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),  # the text of this pair: the web text or a synthetic caption
    pa.field("text", pa.string()),  # the same as caption (its name in schema versions 1-2)
    pa.field("web_text", pa.string()),  # the web text of the image, as the input gave it (null: none)
    pa.field("source", pa.string()),  # 'web' or 'synthetic'
    pa.field("source_index", pa.int32()),  # 0 for the web text; 0..K-1 for the K synthetic captions
    pa.field("itm_score", pa.float32()),  # the filter's ITM match probability
    pa.field("itc_score", pa.float32()),  # the filter's ITC cosine similarity
    pa.field("image_sha256", pa.string()),  # hex SHA-256 of the image bytes (exact duplicates share it)
    pa.field("width", pa.int32()),  # of the image bytes as stored
    pa.field("height", pa.int32()),
    pa.field("captioner", pa.string()),  # the captioner reference (folder, hub id, .pth or 'demo')
    pa.field("filter", pa.string()),  # the filter reference
    pa.field("capfilt_config", pa.string()),  # JSON: sampling settings, K, threshold, seed, schema_version
    pa.field("status", pa.string()),  # img2dataset's: always 'success' (DOWNLOADED)
    pa.field("error_message", pa.string()),  # img2dataset's: always null
]
_FAILED_FIELDS = [
    pa.field("sample_id", pa.string()),  # unique per output row: {shard}_{row:09d}
    pa.field("key", pa.string()),
    pa.field("url", pa.string()),
    pa.field("web_text", pa.string()),  # the input's text for the row, as in kept/ and rejected/
    pa.field("stage", pa.string()),  # one of STAGES
    pa.field("error", pa.string()),
    pa.field("status", pa.string()),  # img2dataset's status for the row ('success' when the input had none, or
    # when the download went well and a later stage failed; 'failed_to_download' ...: then ``error`` is its
    # error_message)
]
_REASON_FIELD = pa.field("reason", pa.string())  # rejected/ only: one of REASONS
# What each column means, for people: the dataset card (``capfilt.pipelines.dataset_card``) lists them.
DESCRIPTIONS = {
    "sample_id": "unique per output row across kept/, rejected/ and failed/: {shard}_{row:09d} (failed), "
                 "{shard}_{row:09d}_{source}{index} (a judged text), row being the input row's place in key order",
    "key": "the input's own key (may repeat; stats.json counts duplicates); {shard}_{row:09d} where it had none",
    "url": "the image's URL, as the input gave it",
    "caption": "the text of this pair: the web text or a synthetic caption (what a trainer reads)",
    "text": "the same as caption (its name in schema versions 1-2)",
    "web_text": "the image's web text as the input gave it (null: none)",
    "source": "'web' (the input's text) or 'synthetic' (written by the captioner)",
    "source_index": "0 for the web text; 0..K-1 for the K synthetic captions",
    "itm_score": "the filter's ITM match probability (0 to 1)",
    "itc_score": "the filter's ITC cosine similarity (-1 to 1)",
    "image": "the image: a struct {bytes, path}, HF datasets' Image storage (path always null; DuckDB and pyarrow "
             "read jpg.bytes); named as the input's image column: jpg, png or webp",
    "reason": "rejected/ only: why the text was removed: " + ", ".join(REASONS),
    "image_sha256": "hex SHA-256 of the image bytes (exact duplicates share it)",
    "width": "the image's width in pixels, as stored",
    "height": "the image's height in pixels, as stored",
    "captioner": "the captioner (folder, hub id, .pth or 'demo')",
    "filter": "the filter (folder, hub id, .pth or 'demo')",
    "capfilt_config": "JSON: the run's settings (K, threshold, seed, sampling, schema_version)",
    "status": "img2dataset's download status; in kept/ and rejected/ always 'success'; in failed/ the input's "
              "('success' when the download went well and a later stage failed)",
    "error_message": "img2dataset's download error; in kept/ and rejected/ always null",
    "stage": "failed/ only: where the row failed: " + ", ".join(STAGES),
    "error": "failed/ only: what went wrong (for a failed download, img2dataset's error_message)",
}

RESERVED = ({f.name for f in _PAIR_FIELDS + _FAILED_FIELDS} | {_REASON_FIELD.name, "error_message", "txt",
                                                                 *INPUT_COLUMNS} | set(IMAGE_COLUMNS))


def passthrough_fields(input_schema: pa.Schema) -> list[pa.Field]:
    """The input columns carried into every output file unchanged."""
    return [field for field in input_schema if field.name not in RESERVED]


def _after_scores() -> int:
    return [f.name for f in _PAIR_FIELDS].index("image_sha256")


def with_download_status(table: pa.Table) -> pa.Table:
    """A kept/ or rejected/ table of schema version 4 or earlier with ``status`` and ``error_message``
    (``DOWNLOADED``) after ``capfilt_config``, where version 5 has them; a table that has them is returned as is."""
    if "status" in table.schema.names:
        return table
    at = table.schema.get_field_index("capfilt_config") + 1
    for offset, (name, value) in enumerate(DOWNLOADED.items()):
        table = table.add_column(at + offset, pa.field(name, pa.string()), pa.array([value] * table.num_rows,
                                                                                     pa.string()))
    return table


def kept_schema(extra: list[pa.Field], image_column: str = "jpg") -> pa.Schema:
    """kept/'s columns: the image (an HF ``Image`` struct) comes after the scores."""
    at = _after_scores()
    features = {"info": {"features": {image_column: {"_type": "Image"}}}}
    return pa.schema(_PAIR_FIELDS[:at] + [pa.field(image_column, IMAGE_TYPE)] + _PAIR_FIELDS[at:] + extra,
                     metadata={HF_METADATA_KEY: json.dumps(features)})


def image_value(data: bytes) -> dict:
    """An image column's value for these bytes."""
    return {"bytes": data, "path": None}


def sample_id(shard_id: str, row: int, source: str | None = None, index: int = 0) -> str:
    """The output row's ``sample_id``: ``{shard}_{row:09d}`` (failed), ``..._{source}{index}`` (a judged text)."""
    return f"{shard_id}_{row:09d}" if source is None else f"{shard_id}_{row:09d}_{source}{index}"


def rejected_schema(extra: list[pa.Field]) -> pa.Schema:
    """rejected/'s columns: kept/'s without the image, ``reason`` after the scores."""
    at = _after_scores()
    return pa.schema(_PAIR_FIELDS[:at] + [_REASON_FIELD] + _PAIR_FIELDS[at:] + extra)


def failed_schema(extra: list[pa.Field]) -> pa.Schema:
    return pa.schema(_FAILED_FIELDS + extra)


def with_provenance(schema: pa.Schema, provenance: dict) -> pa.Schema:
    """``schema`` carrying capfilt's provenance JSON in its Parquet metadata."""
    metadata = {**(schema.metadata or {}), METADATA_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **provenance})}
    return schema.with_metadata(metadata)


def read_provenance(schema: pa.Schema) -> dict:
    """The provenance a capfilt output file carries (empty if none)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}
