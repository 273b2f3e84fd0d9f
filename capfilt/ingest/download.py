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

URLs are checked twice. Before img2dataset sees them (``capfilt.ingest.urls``, in
``capfilt.ingest.url_list.write_url_list``): only http and https URLs to public
addresses reach it; a refused row has no URL, so img2dataset never fetches
it. Then where the connection is made: img2dataset's workers fetch with
``capfilt.ingest.fetch`` (``ImageFetcher``) instead of ``urllib.request.urlopen``,
which resolves each host once, refuses it if any of its addresses is refused,
connects to the checked address, judges every redirect target the same way
(at most ``FetchPolicy.max_redirects``; no ftp:, file: or data:), and bounds
each URL's body (``max_body_bytes``) and time (``total_seconds``); such a row
fails with ``status`` failed_to_download and the reason (``refused: ...``) in
``error_message``. ``allow_private_addresses`` and ``allow_networks`` apply
to both checks alike. What neither sees (proxies, which capfilt does not use;
the routes themselves) is in ``capfilt.ingest.fetch``'s docstring: on a cluster,
keep the download workers off the metadata address at the network level too.

How capfilt's fetcher reaches img2dataset's workers without a fork of img2dataset: ``img2dataset.main.download``
builds its ``Downloader`` by the module-global name ``img2dataset.main.Downloader``, and its worker threads call
``download_image`` by the module-global name ``img2dataset.downloader.download_image`` (through
``download_image_with_retry``). For the duration of ``download``, ``fetching_with`` puts a factory of
``PolicyDownloader`` in place of ``img2dataset.main.Downloader``: img2dataset's own ``Downloader``, built with
img2dataset's arguments, wrapped with the policy. The distributor pickles that object into each worker, where
its call puts ``ImageFetcher(policy)`` in place of ``download_image`` (``install_fetcher``, once per process)
and then runs img2dataset's shard download as it is. This works in the spawned processes of the
``multiprocessing`` distributor; with ``pyspark`` or ``ray`` the workers unpickle
``capfilt.ingest.download.PolicyDownloader``, so capfilt (with img2dataset) must be installed on every worker, in the
version of the driver. Should a later img2dataset rename these seams, ``install_fetcher`` fails the download
rather than fetch without the policy.

Stopping and sharing. img2dataset runs in a child process of its own process group (``capfilt.ingest.process_group``):
its SIGINT handler (which exits 0) and its worker pool live there, and Ctrl-C or SIGTERM to capfilt stops the
whole group before capfilt exits 130 or 143; the rerun resumes from the shards img2dataset finished. A local
shards folder F has a lock, ``F.lock`` (``capfilt.ingest.folder_lock``), held by the download and by its child: a second
job on the same folder waits, then finds the shards downloaded, so no URL is fetched twice.

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

import contextlib
import functools
import importlib
import importlib.util
import inspect
import logging
import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.ingest import folder_lock
from capfilt.columns import INPUT_COLUMNS
from capfilt.ingest.fetch import FetchPolicy, ImageFetcher
from capfilt.ingest.process_group import ChildFailed, run_in_own_group

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
    timeout: int = 10  # seconds per connection attempt and per read (img2dataset's timeout)
    retries: int = 0
    encode_format: str = "jpg"
    # The fetch policy (capfilt.ingest.fetch.FetchPolicy), applied by the workers at every redirect hop:
    allow_private_addresses: bool = False  # --allow-private-addresses: loopback, private, shared, internal names
    allow_networks: tuple[str, ...] = ()  # --allow-network CIDR: just these networks (capfilt.ingest.urls)
    max_body_bytes: int = FetchPolicy.max_body_bytes  # a larger body fails (50,000,000 bytes)
    total_seconds: float = FetchPolicy.total_seconds  # per URL in all, redirects and body included (30 s)

    def __post_init__(self):
        if self.distributor not in DISTRIBUTORS:
            raise ValueError(f"distributor must be one of {DISTRIBUTORS}, not {self.distributor!r}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, not {self.output_format!r}")
        object.__setattr__(self, "allow_networks", self.fetch_policy().allow_networks)  # checked, canonical

    def fetch_policy(self) -> FetchPolicy:
        """What the workers may fetch (a ``ValueError`` for a bad network or limit)."""
        return FetchPolicy(allow_private_addresses=self.allow_private_addresses, allow_networks=self.allow_networks,
                           max_body_bytes=self.max_body_bytes, total_seconds=self.total_seconds)


# img2dataset.downloader.download_image's parameters, which ImageFetcher takes in the same order.
DOWNLOAD_IMAGE_PARAMETERS = ("row", "timeout", "user_agent_token", "disallowed_header_directives")


class PolicyDownloader:
    """img2dataset's ``Downloader`` (built as img2dataset builds it) that fetches under a ``FetchPolicy``.

    Picklable like the ``Downloader`` it wraps; the distributor calls it in each worker with a shard.
    """

    def __init__(self, downloader_class: type, policy: FetchPolicy, **arguments):
        self.downloader = downloader_class(**arguments)
        self.policy = policy

    def __call__(self, row):
        install_fetcher(self.policy)
        return self.downloader(row)


def install_fetcher(policy: FetchPolicy) -> None:
    """Make img2dataset's worker threads in this process fetch with ``ImageFetcher(policy)`` (once per process).

    Fails (``RuntimeError``) where img2dataset no longer has the seam: never a download without the policy.
    """
    from img2dataset import downloader as module

    current = getattr(module, "download_image", None)
    if isinstance(current, ImageFetcher):
        if current.policy != policy:
            module.download_image = ImageFetcher(policy)
        return
    if current is None or not callable(getattr(module, "download_image_with_retry", None)) or \
            tuple(inspect.signature(current).parameters) != DOWNLOAD_IMAGE_PARAMETERS:
        raise RuntimeError("img2dataset.downloader no longer has download_image(row, timeout, user_agent_token, "
                           "disallowed_header_directives) called through download_image_with_retry: capfilt cannot "
                           "apply its fetch policy (capfilt.ingest.fetch) to this img2dataset version")
    module.download_image = ImageFetcher(policy)


@contextmanager
def fetching_with(policy: FetchPolicy):
    """While inside, ``img2dataset.download`` builds a ``PolicyDownloader`` with ``policy`` for its workers.

    Process-wide (a module attribute of img2dataset): two downloads at once in one process would share it.
    """
    main = importlib.import_module("img2dataset.main")  # the module: the package's name `main` is a function

    original = main.Downloader
    main.Downloader = functools.partial(PolicyDownloader, original, policy)
    try:
        yield
    finally:
        main.Downloader = original


def is_complete(url_list: str | Path, output_folder: str | Path, settings: DownloadSettings) -> bool:
    """Whether every shard of the URL list has img2dataset's ``_stats.json`` (local folders only)."""
    folder = Path(output_folder)
    if "://" in str(output_folder) or not folder.is_dir():
        return False
    rows = pq.ParquetFile(url_list).metadata.num_rows
    expected = {f"{shard:05d}" for shard in range(math.ceil(rows / settings.samples_per_shard))}
    done = {p.name[: -len("_stats.json")] for p in folder.glob("*_stats.json")}
    return expected <= done


class DownloadError(RuntimeError):
    """img2dataset ended with an error (its own messages went to stderr); finished shards are kept."""


def lock_path(output_folder: str | Path) -> Path:
    """The lock file beside a local shards folder F: ``F.lock`` (img2dataset allows no other files in F)."""
    folder = Path(output_folder)
    return folder.with_name(folder.name + ".lock")


def download(url_list: str | Path, output_folder: str | Path, settings: DownloadSettings = DownloadSettings(),
             extra_columns: tuple[str, ...] = (), on_wait: Callable[[str], None] | None = None) -> str:
    """Download the canonical URL list (``capfilt.ingest.url_list.write_url_list``) into ``output_folder``.

    Returns the folder. Shards finished by an earlier call are kept (img2dataset's incremental mode),
    and when all are finished img2dataset is not started at all. One download per local folder at a time: a
    second call waits for the first (``capfilt.ingest.folder_lock``; ``on_wait`` hears why), then finds its shards.
    img2dataset runs in a child process group (``capfilt.ingest.process_group``): KeyboardInterrupt or ``Terminated``
    while it runs stops all of its processes before going on; its failure is a ``DownloadError``.
    """
    with contextlib.ExitStack() as stack:
        fds = ()
        if "://" not in str(output_folder):
            fds = (stack.enter_context(folder_lock.hold(lock_path(output_folder), on_wait)),)
        if is_complete(url_list, output_folder, settings):
            log.info("%s: every shard is downloaded", output_folder)
            return str(output_folder)
        if importlib.util.find_spec("img2dataset") is None:
            raise ImportError("downloading needs img2dataset: pip install 'capfilt[download]'")
        arguments = img2dataset_arguments(url_list, output_folder, settings, extra_columns)
        try:  # the child inherits the lock: it is held until the last of img2dataset's processes ends
            run_in_own_group(_download_here, arguments, settings, pass_fds=fds)
        except ChildFailed as error:
            raise DownloadError(f"img2dataset failed ({error}; its messages are above): the shards it finished are "
                                "kept, and a rerun downloads the rest") from None
    return str(output_folder)


def img2dataset_arguments(url_list: str | Path, output_folder: str | Path, settings: DownloadSettings,
                          extra_columns: tuple[str, ...] = ()) -> dict:
    """The keyword arguments of ``img2dataset.download`` for the canonical URL list."""
    # Lines of the source list that did not parse and refused URLs travel as rows without URL that carry their
    # reason (and a refused row its URL and stage), so that the pipeline writes them to failed/ at their stage.
    # A URL list written before these columns existed has fewer or none of them.
    names = pq.read_schema(url_list).names
    extra_columns = (*extra_columns, *(c for c in INPUT_COLUMNS if c in names and c not in extra_columns))
    return dict(
        url_list=str(url_list),
        output_folder=str(output_folder),
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


def _download_here(arguments: dict, settings: DownloadSettings) -> None:
    """The child process's side of ``download``: img2dataset under capfilt's fetch policy."""
    # img2dataset imports albumentations, which checks PyPI for a newer version on import (in every worker)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ[OPENCV_PIXELS] = str(settings.max_image_pixels)  # read by the worker processes' OpenCV
    from img2dataset import download as img2dataset_download

    with fetching_with(settings.fetch_policy()):
        img2dataset_download(**arguments)
    if settings.output_format == "parquet":
        sort_shards(arguments["output_folder"])


def sort_shards(folder: str | Path) -> list[Path]:
    """Rewrite each finished Parquet shard of ``folder`` whose rows are not in key order; returns those rewritten.

    img2dataset writes a shard's rows in the order its downloads finish. The pipeline reads rows in key order
    (``capfilt.pipelines.shards``), holding back rows that come early, which for a shard in download order costs
    most of the shard's images in memory; sorted once here, every later read streams. A shard is rewritten beside
    itself and renamed over the original, so a stop midway leaves the original whole. img2dataset's keys are
    zero-padded numbers, so their order as text is the URL list's.
    """
    rewritten = []
    for stats in sorted(Path(folder).glob("*_stats.json")):
        shard = stats.with_name(stats.name[: -len("_stats.json")] + ".parquet")
        if not shard.is_file() or "key" not in pq.read_schema(shard).names:
            continue
        keys = pq.read_table(shard, columns=["key"]).column("key")
        if len(keys) < 2 or keys.null_count or pc.all(pc.less_equal(keys[:-1], keys[1:])).as_py():
            continue  # in order already; or a row without key, which the reader keeps at its place
        table = pq.read_table(shard)
        temp = shard.with_name(shard.name + ".sorting")
        pq.write_table(table.take(pc.sort_indices(table, [("key", "ascending")])), temp)
        os.replace(temp, shard)
        rewritten.append(shard)
    return rewritten
