"""Downloading a URL list into image shards with img2dataset.

img2dataset does the work with its own distributors: ``multiprocessing``
on one machine, ``pyspark`` (or ``ray``) on a cluster. Its shards (Parquet by
default, or webdataset) keep a row for every URL, failures included
(``status`` != ``success`` with an ``error_message``), which the CapFilt
pipeline turns into rows of ``failed/``. The canonical list's own columns
(``capfilt_error``, ``capfilt_stage``, ``capfilt_url``) are carried along
into the shards, so that a source line that did not parse fails at stage
``parse``, and a URL that capfilt refused fails at stage ``download`` with
its URL and reason. Reruns resume: img2dataset skips shards whose
``_stats.json`` exists.

URLs are checked before img2dataset sees them (``capfilt.urls``, in
``capfilt.datasets.write_url_list``): only http and https URLs to public
addresses reach it; a refused row has no URL, so img2dataset never fetches
it. What that check cannot see: names are not resolved (a public name that
resolves to a private address is fetched), and img2dataset fetches with
``urllib.request.urlopen``, which follows redirects (301, 302, 303, 307,
308; up to 10) to any http, https or ftp URL at any address, internal and
metadata addresses included. On a cluster, keep the download workers off
internal networks and the metadata address at the network level too.

Decompression bombs: an image of more than ``max_image_pixels`` pixels (50 M, the pipeline's own limit,
``BootstrapSettings.max_image_pixels``) is refused by img2dataset's ``max_image_area``, and OpenCV (which
img2dataset decodes with) is told the same limit through ``OPENCV_IO_MAX_IMAGE_PIXELS`` (default 2^30), so that
it refuses such an image from its header instead of allocating the pixels first: a 12,000 x 12,000 PNG of a
few hundred KB would otherwise cost 144 MB to 432 MB per download thread. The variable reaches the worker
processes of the ``multiprocessing`` distributor; on a Spark or Ray cluster set it in the workers' environment.
Two things img2dataset does to images that capfilt cannot undo (OpenCV's ``IMREAD_UNCHANGED`` and its JPEG
re-encoding): it drops the EXIF orientation (capfilt applies the orientation img2dataset recorded in its
``exif`` column instead, ``capfilt.pipelines.process``), and it clips 16-bit images to 8 bits by saturation.

Images are resized so that their shorter side is at most ``image_size``
(384: the fine-tuned BLIP models' resolution), keeping the aspect ratio; the
models' own preprocessing makes the square input. img2dataset honours
``X-Robots-Tag: noai``-style opt-outs by default, and so does capfilt.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from capfilt.columns import INPUT_COLUMNS

log = logging.getLogger(__name__)

DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
OUTPUT_FORMATS = ("parquet", "webdataset")
OPENCV_PIXELS = "OPENCV_IO_MAX_IMAGE_PIXELS"  # OpenCV's limit on an image's pixels, checked from its header


@dataclass(frozen=True)
class DownloadSettings:
    """img2dataset's knobs that capfilt exposes, with capfilt's defaults."""

    processes: int = 4
    threads: int = 64
    image_size: int = 384
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    samples_per_shard: int = 10_000
    distributor: str = "multiprocessing"
    max_image_pixels: int = 50_000_000  # larger images fail at download (BootstrapSettings.max_image_pixels)
    output_format: str = "parquet"
    timeout: int = 10
    retries: int = 0
    encode_format: str = "jpg"

    def __post_init__(self):
        if self.distributor not in DISTRIBUTORS:
            raise ValueError(f"distributor must be one of {DISTRIBUTORS}, not {self.distributor!r}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, not {self.output_format!r}")


def is_complete(url_list: str | Path, output_folder: str | Path, settings: DownloadSettings) -> bool:
    """Whether every shard of the URL list has img2dataset's ``_stats.json`` (local folders only)."""
    folder = Path(output_folder)
    if "://" in str(output_folder) or not folder.is_dir():
        return False
    rows = pq.ParquetFile(url_list).metadata.num_rows
    expected = {f"{shard:05d}" for shard in range(math.ceil(rows / settings.samples_per_shard))}
    done = {p.name[: -len("_stats.json")] for p in folder.glob("*_stats.json")}
    return expected <= done


def download(url_list: str | Path, output_folder: str | Path, settings: DownloadSettings = DownloadSettings(),
             extra_columns: tuple[str, ...] = ()) -> str:
    """Download the canonical URL list (``capfilt.datasets.write_url_list``) into ``output_folder``.

    Returns the folder. Shards finished by an earlier call are kept (img2dataset's incremental mode),
    and when all are finished img2dataset is not started at all.
    """
    if is_complete(url_list, output_folder, settings):
        log.info("%s: every shard is downloaded", output_folder)
        return str(output_folder)
    # img2dataset imports albumentations, which checks PyPI for a newer version on import (in every worker)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        from img2dataset import download as img2dataset_download
    except ImportError as error:
        raise ImportError("downloading needs img2dataset: pip install 'capfilt[download]'") from error

    output_folder = str(output_folder)
    # Lines of the source list that did not parse and refused URLs travel as rows without URL that carry their
    # reason (and a refused row its URL and stage), so that the pipeline writes them to failed/ at their stage.
    # A URL list written before these columns existed has fewer or none of them.
    names = pq.read_schema(url_list).names
    extra_columns = (*extra_columns, *(c for c in INPUT_COLUMNS if c in names and c not in extra_columns))
    sigint = signal.getsignal(signal.SIGINT)  # img2dataset installs its own handler; ours comes back after
    opencv_limit = os.environ.get(OPENCV_PIXELS)
    os.environ[OPENCV_PIXELS] = str(settings.max_image_pixels)  # read by the worker processes' OpenCV
    try:
        img2dataset_download(
            url_list=str(url_list),
            output_folder=output_folder,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=list(extra_columns) or None,
            output_format=settings.output_format,
            processes_count=settings.processes,
            thread_count=settings.threads,
            image_size=settings.image_size,
            resize_mode=settings.resize_mode,
            resize_only_if_bigger=settings.resize_only_if_bigger,
            encode_format=settings.encode_format,
            number_sample_per_shard=settings.samples_per_shard,
            distributor=settings.distributor,
            timeout=settings.timeout,
            max_image_area=settings.max_image_pixels,
            retries=settings.retries,
            incremental_mode="incremental",
            enable_wandb=False,
        )
    finally:
        if opencv_limit is None:
            os.environ.pop(OPENCV_PIXELS, None)
        else:
            os.environ[OPENCV_PIXELS] = opencv_limit
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
    return output_folder
