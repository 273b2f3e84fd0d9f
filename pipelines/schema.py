"""The output's schema, written down once and versioned.

An output folder holds, per input shard, three Parquet files:

- ``kept/{shard}.parquet``: one row per kept (image, text) pair, with the
  image bytes, the input's key, url and metadata under img2dataset's names;
- ``rejected/{shard}.parquet``: one row per removed text, the same columns
  without the image bytes;
- ``failed/{shard}.parquet``: one row per input row that could not be judged
  (a damaged input row, a URL list line that did not parse, a refused URL, a
  download, decode, size or model error), with the stage and the error.

``sample_id`` is unique per output row across the three folders:
``{shard}_{row:09d}`` for a failed row and ``{shard}_{row:09d}_{source}{index}``
(``00042_000000017_web0``, ``00042_000000017_synthetic2``) for a judged text,
``row`` being the input row's place in its shard (from 0; for a webdataset
shard, its row in the sidecar, else its sample in the tar). ``key`` is the
input's own key, which may repeat (``stats.json`` counts duplicate keys); a row
without one gets ``{shard}_{row:09d}``.

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

SCHEMA_VERSION = 2  # 2: sample_id; stage read (damaged input); null keys become {shard}_{row:09d}
METADATA_KEY = b"capfilt"  # Parquet key-value metadata: JSON with schema_version, models, settings

WEB, SYNTHETIC = "web", "synthetic"
SOURCES = (WEB, SYNTHETIC)

# Where a failed row failed, in pipeline order. ``read``: the input shard's bytes for the row could not be read (a
# damaged Parquet row group, a tar that breaks before the row's sample, a sample whose .json/.txt does not
# decode); its shard is listed as damaged (``capfilt.pipelines.shards``). ``parse``: a URL list line that could
# not be read (too many or too few fields); it is carried through the download as a row without URL, its text
# as the caption.
STAGES = ("read", "parse", "download", "decode", "size", "caption", "filter")

# Columns capfilt writes itself; an input column of the same name is not passed through.
# ``status``/``error_message`` are img2dataset's download outcome: kept in failed/ as ``status``.
_PAIR_FIELDS = [
    pa.field("sample_id", pa.string()),  # unique per output row: {shard}_{row:09d}_{source}{source_index}
    pa.field("key", pa.string()),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),  # the web text of the image, as the input gave it
    pa.field("text", pa.string()),  # the text of this pair: the web text or a synthetic caption
    pa.field("source", pa.string()),  # 'web' or 'synthetic'
    pa.field("source_index", pa.int32()),  # 0 for the web text; 0..K-1 for the K synthetic captions
    pa.field("itm_score", pa.float32()),  # the filter's ITM match probability
    pa.field("itc_score", pa.float32()),  # the filter's ITC cosine similarity
    pa.field("width", pa.int32()),  # of the image bytes as stored
    pa.field("height", pa.int32()),
    pa.field("captioner", pa.string()),  # the captioner reference (folder, hub id, .pth or 'demo')
    pa.field("filter", pa.string()),  # the filter reference
    pa.field("capfilt_config", pa.string()),  # JSON: sampling settings, K, threshold, seed, schema_version
]
_FAILED_FIELDS = [
    pa.field("sample_id", pa.string()),  # unique per output row: {shard}_{row:09d}
    pa.field("key", pa.string()),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("stage", pa.string()),  # one of STAGES
    pa.field("error", pa.string()),
    pa.field("status", pa.string()),  # img2dataset's status for the row (null when the input had none)
]
RESERVED = ({f.name for f in _PAIR_FIELDS + _FAILED_FIELDS} | {"error_message", "txt", *INPUT_COLUMNS}
            | set(IMAGE_COLUMNS))


def passthrough_fields(input_schema: pa.Schema) -> list[pa.Field]:
    """The input columns carried into every output file unchanged."""
    return [field for field in input_schema if field.name not in RESERVED]


def kept_schema(extra: list[pa.Field], image_column: str = "jpg") -> pa.Schema:
    at = [f.name for f in _PAIR_FIELDS].index("width")  # the image bytes come after the scores
    return pa.schema(_PAIR_FIELDS[:at] + [pa.field(image_column, pa.binary())] + _PAIR_FIELDS[at:] + extra)


def sample_id(shard_id: str, row: int, source: str | None = None, index: int = 0) -> str:
    """The output row's ``sample_id``: ``{shard}_{row:09d}`` (failed), ``..._{source}{index}`` (a judged text)."""
    return f"{shard_id}_{row:09d}" if source is None else f"{shard_id}_{row:09d}_{source}{index}"


def rejected_schema(extra: list[pa.Field]) -> pa.Schema:
    return pa.schema(_PAIR_FIELDS + extra)


def failed_schema(extra: list[pa.Field]) -> pa.Schema:
    return pa.schema(_FAILED_FIELDS + extra)


def with_provenance(schema: pa.Schema, provenance: dict) -> pa.Schema:
    """``schema`` carrying capfilt's provenance JSON in its Parquet metadata."""
    return schema.with_metadata({METADATA_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **provenance})})


def read_provenance(schema: pa.Schema) -> dict:
    """The provenance a capfilt output file carries (empty if none)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}
