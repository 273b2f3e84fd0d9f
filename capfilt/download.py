"""Downloading a URL list into image shards with img2dataset.

img2dataset does the work with its own distributors: ``multiprocessing``
on one machine, ``pyspark`` (or ``ray``) on a cluster. Its shards (Parquet by
default, or webdataset) keep a row for every URL, failures included
(``status`` != ``success`` with an ``error_message``), which the CapFilt
pipeline turns into rows of ``failed/``; the canonical list's ``capfilt_error``
column (a source line that did not parse) is carried along, so that such a
row fails at stage ``parse`` rather than ``download``. Reruns resume: img2dataset skips
shards whose ``_stats.json`` exists.

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

from capfilt.pipelines.schema import INPUT_ERROR

log = logging.getLogger(__name__)

DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
OUTPUT_FORMATS = ("parquet", "webdataset")


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
    # Lines of the source list that did not parse travel as rows without URL that carry their reason, so that
    # the pipeline writes them to failed/ at stage parse (a URL list written before that column existed has none).
    if INPUT_ERROR in pq.read_schema(url_list).names and INPUT_ERROR not in extra_columns:
        extra_columns = (*extra_columns, INPUT_ERROR)
    sigint = signal.getsignal(signal.SIGINT)  # img2dataset installs its own handler; ours comes back after
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
            retries=settings.retries,
            incremental_mode="incremental",
            enable_wandb=False,
        )
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
    return output_folder
