"""What ``DATA=`` names: a named dataset, the demo world, a URL list or a folder of image shards.

- Named web datasets (``cc12m``, ``cc3m``, ``sbu``, ``laion400m``): their URL
  lists are fetched from their public location into the cache folder when
  absent; offline, the error says which file to put where.
- ``demo``: the shapes world's noisy ``web`` split, rendered locally as
  img2dataset-style Parquet shards (``capfilt.shapes``).
- A path: a URL list (``.tsv``, ``.csv``, ``.txt``, ``.json``, ``.jsonl``,
  optionally ``.gz``, or a ``.parquet`` without image bytes, such as LAION's
  ``URL``/``TEXT`` metadata), or image shards already downloaded by
  img2dataset (Parquet with a ``jpg`` column, or webdataset ``.tar``), as one
  file or a folder of them.

URL lists are read and rewritten by ``capfilt.ingest.url_list``; named datasets are ``capfilt.ingest.named``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.columns import IMAGE_COLUMNS
from capfilt.ingest.named import DEFAULT_CACHE, NAMED, ensure_named
from capfilt.ingest.url_list import URL_LIST_SUFFIXES, Columns, DatasetError, UrlList, detect_url_list, list_format

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoInput:
    """The shapes world's ``web`` split, rendered on the fly."""

    size: int = 1000
    seed: int = 0
    shard_size: int = 250


@dataclass(frozen=True)
class ShardsInput:
    """Image shards img2dataset (or the demo) already wrote: the pipeline's input as they are."""

    location: str


@dataclass(frozen=True)
class UrlListInput:
    """URLs to download first."""

    url_list: UrlList
    name: str = ""


def resolve(data: str, cache: str | Path = DEFAULT_CACHE, columns: Columns = Columns(),
            fetch: bool | None = None) -> DemoInput | ShardsInput | UrlListInput:
    """What ``data`` names; named datasets are fetched into ``cache`` when absent (unless ``fetch`` is False).

    ``fetch=None`` fetches unless the environment says ``CAPFILT_OFFLINE=1``.
    """
    if data == "demo":
        return DemoInput()
    if data in NAMED:
        spec = NAMED[data]
        if fetch is None:
            fetch = os.environ.get("CAPFILT_OFFLINE", "0") not in ("1", "true", "yes")
        paths = ensure_named(spec, Path(cache), fetch=fetch)
        caption = None if columns.no_caption else columns.caption or spec.caption_col
        url_list = UrlList(paths, spec.format, columns.url or spec.url_col, caption, spec.header)
        return UrlListInput(url_list, name=spec.name)
    if "://" in data:  # remote folders are image shards; URL lists are read locally
        return ShardsInput(data)
    path = Path(data).expanduser()
    if not path.exists():
        raise DatasetError(
            f"DATA={data!r} is neither a named dataset ({', '.join(['demo', *NAMED])}) nor an existing path"
        )
    files = _data_files(path)
    if _are_image_shards(files):
        return ShardsInput(str(path))
    return UrlListInput(detect_url_list(files, columns), name=path.stem)


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    shards = [p for p in files if p.suffix in (".tar", ".parquet")]
    lists = [p for p in files if list_format(p)]
    found = shards or lists
    if not found:
        raise DatasetError(f"{path} holds no URL list ({', '.join(URL_LIST_SUFFIXES)}, .parquet) and no image shards")
    return found


def _are_image_shards(files: list[Path]) -> bool:
    if any(p.suffix == ".tar" for p in files):
        return True
    parquets = [p for p in files if p.suffix == ".parquet"]
    if not parquets:
        return False
    errors = []
    for path in parquets:  # the first readable file decides: a damaged one is the pipeline's to record
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as error:
            errors.append(f"{path}: {type(error).__name__}: {error}")
            continue
        return any(column in names for column in IMAGE_COLUMNS)
    raise DatasetError(f"no Parquet file of {len(parquets)} can be read: {'; '.join(errors[:3])}")
