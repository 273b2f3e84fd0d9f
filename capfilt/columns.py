"""Column names shared by the URL lists, img2dataset's shards, the pipeline and the trainer.

One small module at the bottom of the layers, so that ingest (``capfilt.ingest.datasets``, ``capfilt.ingest.download``),
the pipeline (``capfilt.pipelines``) and the trainer (``capfilt.models.data``) agree on names without
importing each other. The output's own schema is ``capfilt.pipelines.schema``.
"""

from __future__ import annotations

# The canonical URL list's (and so img2dataset's shards') column that marks a row as unparseable: null for good
# rows, the reason for a line that did not parse (``capfilt.ingest.url_list.write_url_list``). Never passed through.
INPUT_ERROR = "capfilt_error"
# With ``capfilt_error`` set, the stage the row fails at: null or ``parse`` for a line that did not parse,
# ``download`` for a URL refused before img2dataset saw it (``capfilt.ingest.urls``). Never passed through.
INPUT_STAGE = "capfilt_stage"
# The URL of a refused row: its ``url`` is null so that img2dataset never fetches it; the output's ``url`` is this.
INPUT_URL = "capfilt_url"
INPUT_COLUMNS = (INPUT_ERROR, INPUT_STAGE, INPUT_URL)  # capfilt's own columns of the URL list, in this order

# img2dataset's image columns (its --encode_format), in order of preference.
IMAGE_COLUMNS = ("jpg", "png", "webp")
