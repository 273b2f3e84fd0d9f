"""The bootstrap recipe: DATA -> image shards (rendered, or downloaded with img2dataset) -> the CapFilt pipeline
-> OUT, and what the command line prints and exits with.

``capfilt.cli`` parses flags into a ``BootstrapRun`` (typed settings, each checked where it is built) and calls
``run``; ``capfilt refilter`` prints the same summary (``print_summary``) and exits by the same rule
(``exit_status``). Which runners are local, the Beam options of local workers and claiming OUT are the
pipeline's (``capfilt.pipelines.bootstrap``); this module decides none of them again.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from capfilt.ingest import datasets, named, url_list
from capfilt.ingest.download import DownloadSettings
from capfilt.pipelines.keep_share import keep_share_warnings
from capfilt.pipelines.schema import BELOW_THRESHOLD, REASONS

if TYPE_CHECKING:  # the pipeline's modules import Beam: only when a job runs
    from capfilt.pipelines.settings import BootstrapSettings

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
# BLIP w/ ViT-L, fine-tuned on COCO: the paper's captioner and filter, as transformers hub ids.
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
DEFAULT_FILTER = "Salesforce/blip-itm-large-coco"
DEFAULT_RUNNER = "FnApiRunner"  # the in-process engine; Beam 2.77's default runner would fetch a Prism binary
SHARDS_FOLDER = ".capfilt/shards"  # inside OUT, hidden from loaders (pipelines.layout.INTERNAL)
# Beside the shards folder F (img2dataset allows no other files in it): F.url_list.parquet, the
# canonical URL list it downloads, and F.source.json, what made the shards.
URL_LIST_SUFFIX = ".url_list.parquet"
SOURCE_SUFFIX = ".source.json"

# Exit statuses: 0 every shard done; 1 shards unfinished (rerun to retry them); 2 bad usage; 3 done, but input
# shards are damaged (rerunning will not help: replace the files; see print_summary); 4 (--strict) done, but the
# filter kept almost none or almost all of a source's texts (see keep_share_warnings).
EXIT_UNFINISHED, EXIT_USAGE, EXIT_DAMAGED, EXIT_KEEP_SHARE = 1, 2, 3, 4


class UsageError(ValueError):
    """Bad input from the user (flags, DATA, OUT), reported without a traceback."""


@dataclass(frozen=True)
class BootstrapRun:
    """One ``capfilt bootstrap``: what to read, where to write, and how; defaults are the command line's."""

    data: str  # demo, a named dataset (cc12m, ...), a URL list, or image shards (capfilt.ingest.datasets)
    out: str  # the output folder (local, gs://, s3://)
    settings: BootstrapSettings  # the CapFilt settings, models included
    download: DownloadSettings = field(default_factory=DownloadSettings)  # img2dataset's and the fetcher's
    columns: url_list.Columns = field(default_factory=url_list.Columns)  # a URL list's url/caption columns
    keep_columns: tuple[str, ...] = ()  # more columns of a URL list carried into the output
    cache_dir: str = str(named.DEFAULT_CACHE)  # where named datasets' URL lists are
    fetch: bool | None = None  # fetch a named list (None: unless HF_HUB_OFFLINE or no network is allowed)
    demo: datasets.DemoInput = field(default_factory=datasets.DemoInput)  # the demo's size, seed, shard size
    shards_dir: str | None = None  # where downloaded or rendered shards go (None: OUT/.capfilt/shards)
    shards: str | None = None  # which input shards, by index: "0-9,12" (None: all)
    runner: str = DEFAULT_RUNNER
    beam_options: tuple[str, ...] = ()  # flags capfilt does not know, for Beam and the runner
    workers: int = 1  # local worker processes (the DirectRunner's, or a local Dask cluster's)
    report: bool = True  # write report.html beside stats.json
    strict: bool = False  # exit 4 on a suspicious keep share (a warning otherwise)
    progress_interval: float = 10.0  # seconds between progress lines
    problems: tuple[str, ...] = ()  # found while parsing (unknown flags): listed with the pre-flight's own


def beside(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


def parse_shard_selection(spec: str | None, count: int) -> list[int]:
    """Indices from ``0-9,12`` (inclusive ranges), within ``count`` shards."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(count))
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                chosen.update(range(first, last + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise UsageError(f"--shards {spec!r}: use indices and ranges, e.g. 0-9,12") from None
    outside = sorted(i for i in chosen if not 0 <= i < count)
    if outside:
        raise UsageError(f"--shards {spec!r}: there are {count} input shards (0-{count - 1}); no {outside[:5]}")
    return sorted(chosen)


def select_shards(location: str, spec: str | None):
    """The input shards at ``location`` that ``spec`` (``--shards``: ``0-9,12``; None: all) selects, by index."""
    from capfilt.pipelines.shards import list_shards

    shards = list_shards(location)
    return [shards[i] for i in parse_shard_selection(spec, len(shards))]


def default_models(data: str) -> tuple[str, str]:
    """The captioner and filter a dataset runs with unless told otherwise."""
    return (DEMO_MODEL, DEMO_MODEL) if data == "demo" else (DEFAULT_CAPTIONER, DEFAULT_FILTER)


def record_source(folder: Path, params: dict) -> bool:
    """Bind ``folder`` (the pipeline's input shards) to what made them; True when it already was.

    A rerun with the same DATA reuses (and resumes) the shards; another DATA, other download settings or a URL list
    whose bytes changed in the same folder is an error, not a mix (``source_conflict``).
    """
    conflict = source_conflict(folder, params)
    if conflict:
        raise UsageError(conflict)
    record = beside(folder, SOURCE_SUFFIX)
    if record.is_file():
        return True
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(params, indent=2) + "\n")
    return False


def source_conflict(folder: Path, params: dict) -> str | None:
    """Why ``folder``'s shards cannot be reused for ``params`` (None: they can, or there are none yet); reads only.

    ``params["list_files"]`` (a URL list's files, ``list_fingerprints``) is compared by content: a list that grew
    or changed since its shards were made would otherwise be ignored (its shards all done) without a word. A record
    written before fingerprints were kept has none, and is not checked for it.
    """
    record = beside(folder, SOURCE_SUFFIX)
    if not record.is_file():
        return None
    earlier = json.loads(record.read_text())
    def settings(record: dict) -> dict:
        return {k: v for k, v in record.items() if k != "list_files"}

    if settings(earlier) != settings(params):
        return (f"{folder} holds shards of another input ({json.dumps(earlier)}); use another --out (or "
                "--shards-dir)")
    for before in earlier.get("list_files", []):
        now = next((f for f in params.get("list_files", []) if f["path"] == before["path"]), None)
        if now is None or before["sha256"] == _sha256(Path(before["path"]), before, now):
            continue
        grown = "grew" if now["bytes"] > before["bytes"] else "changed"
        return (f"the URL list {before['path']} {grown} since the shards in {folder} were made from it "
                f"({before['bytes']} bytes then, {now['bytes']} now): its rows as they are now would not be "
                "processed. To run the list as it is now, give a new --out (or --shards-dir); to finish the run "
                "of the list as it was, put the old list back")
    return None


def list_fingerprints(paths) -> list[dict]:
    """A URL list's files with their size, modification time and SHA-256 (the time only spares rehashing a file
    that did not change)."""
    found = []
    for path in paths:
        path = Path(path).resolve()
        stat = path.stat()
        found.append({"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": None})
    return found


def _sha256(path: Path, before: dict, now: dict) -> str | None:
    """The file's SHA-256 as it is now; the recorded one when size and modification time are unchanged."""
    if (before["bytes"], before["mtime_ns"]) == (now["bytes"], now["mtime_ns"]):
        return before["sha256"]
    return _hash_file(path)


def _hash_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def demo_params(demo: datasets.DemoInput) -> dict:
    """What makes the demo's shards (``record_source``)."""
    return {"data": "demo", "split": "web", "size": demo.size, "seed": demo.seed, "shard_size": demo.shard_size}


def download_params(source: datasets.UrlListInput, settings: DownloadSettings, keep_columns: tuple[str, ...],
                    fingerprints: bool = False) -> dict:
    """What makes a URL list's shards (``record_source``); ``fingerprints``: with the list's files hashed."""
    params = {
        "data": source.name, "paths": [str(p.resolve()) for p in source.url_list.paths],
        "url_col": source.url_list.url_col, "caption_col": source.url_list.caption_col,
        "keep_columns": list(keep_columns), "image_size": settings.image_size,
        "samples_per_shard": settings.samples_per_shard, "output_format": settings.output_format,
        "allow_private_addresses": settings.allow_private_addresses,  # which URLs were refused before download
    }
    # Which URLs were refused depends on the allowed networks too: recorded when there are any, so that a folder
    # recorded before the flag existed still resumes. The limits (like --timeout) decide failures at download and
    # are not recorded.
    if settings.allow_networks:
        params["allow_networks"] = list(settings.allow_networks)
    params["list_files"] = list_fingerprints(source.url_list.paths)
    if fingerprints:
        for entry in params["list_files"]:
            entry["sha256"] = _hash_file(Path(entry["path"]))
    return params


def prepare_demo(demo: datasets.DemoInput, folder: Path) -> str:
    """Render the demo's web split into ``folder`` once; later runs with the same settings reuse it."""
    from capfilt.shapes import write_split

    shards = math.ceil(demo.size / demo.shard_size)
    if record_source(folder, demo_params(demo)) and len(list(folder.glob("*_stats.json"))) == shards:
        return str(folder)
    say(f"rendering the shapes world's web split: {demo.size} pairs into {folder}")
    write_split("web", demo.size, demo.seed, folder, shard_size=demo.shard_size, overwrite=True)
    return str(folder)


def prepare_download(source: datasets.UrlListInput, folder: Path, settings: DownloadSettings,
                     keep_columns: tuple[str, ...] = ()) -> str:
    """Write the canonical URL list (once), then download it with img2dataset (resuming)."""
    from capfilt.ingest import folder_lock
    from capfilt.ingest.download import DownloadError, download, lock_path

    list_file = beside(folder, URL_LIST_SUFFIX)
    with folder_lock.hold(lock_path(folder), on_wait=say):  # one job writes the URL list, the other waits
        first = not beside(folder, SOURCE_SUFFIX).is_file()
        record_source(folder, download_params(source, settings, keep_columns, fingerprints=first))
        if not list_file.is_file():
            summary = url_list.write_url_list(source.url_list, list_file, keep_columns,
                                              allow_private_addresses=settings.allow_private_addresses,
                                              allow_networks=settings.allow_networks)
            say(f"URL list: {summary['rows']} rows -> {list_file}")
    say(f"downloading with img2dataset ({settings.distributor}, {settings.processes} processes) into {folder}; "
        "finished shards are kept")
    try:
        return download(list_file, folder, settings, keep_columns, on_wait=say)
    except DownloadError as error:
        raise UsageError(str(error)) from None


def shards_folder(job: BootstrapRun) -> Path:
    """Where the demo's or img2dataset's shards go: ``--shards-dir``, else ``OUT/.capfilt/shards`` (a local folder)."""
    if job.shards_dir:
        return Path(job.shards_dir)
    if "://" in job.out:
        raise UsageError(f"--out {job.out} is remote: give a local --shards-dir for the downloaded shards "
                         "(or download them first and pass their folder as --data)")
    return Path(job.out) / SHARDS_FOLDER


def run(job: BootstrapRun, source: datasets.DemoInput | datasets.ShardsInput | datasets.UrlListInput) -> int:
    """The whole job: DATA to image shards, CapFilt over them, the summary; returns the exit status.

    ``source``: what DATA names, as ``capfilt.recipes.preflight.check(job)`` gives it once every check passed.
    """
    from capfilt.pipelines import bootstrap as pipeline

    layout = pipeline.claim_output(job.out, job.settings)  # before any download, once every check passed
    # This job holds OUT from now on, through the download too: another job's pre-flight sees it alive and does not
    # claim OUT anew for other settings (OutputLayout.check_claim), as it may while no job has done a shard there.
    holder = layout.start_run(local=True)
    try:
        return _run_claimed(job, source, layout)
    finally:
        holder.end_run()


def _run_claimed(job: BootstrapRun, source, layout) -> int:
    """``run`` once OUT is claimed: the input shards, the pipeline, the summary."""
    from capfilt.pipelines import bootstrap as pipeline
    from capfilt.pipelines.progress import Progress
    from capfilt.pipelines.report import read_stats

    settings = job.settings
    if isinstance(source, datasets.ShardsInput):
        location = source.location
    elif isinstance(source, datasets.DemoInput):
        location = prepare_demo(job.demo, shards_folder(job))
    else:
        location = prepare_download(source, shards_folder(job), job.download, job.keep_columns)

    shards = select_shards(location, job.shards)
    missing = [s.shard_id for s in shards if s.stats_missing]
    if missing:
        say(f"warning: {len(missing)} shard(s) have no img2dataset _stats.json ({', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''}): is a download still running? They are processed; one that "
            "cannot be read whole is left unfinished, to rerun once the download is over")
    say(f"CapFilt on {len(shards)} shard(s) from {location} with {job.runner}: "
        f"captioner {settings.captioner}, filter {settings.filter}, K={settings.num_captions}, "
        f"{judging(settings)}, select {settings.select}"
        f"{', duplicate images dropped' if settings.dedup_images else ''}, "
        f"sampling {settings.sampling_overrides or 'defaults'}")
    selected = {s.shard_id for s in shards}
    beam_args = [*job.beam_options, *pipeline.worker_arguments(job.runner, job.workers)]
    failure = None
    with Progress(layout, [s.shard_id for s in shards], interval=job.progress_interval):
        try:
            pipeline.run(shards, settings, job.out, runner=job.runner, beam_args=beam_args, report=job.report,
                         workers=job.workers)
        except Exception as error:  # noqa: BLE001 - the job's end (a full disk, a lost worker): what is kept, and
            failure = error  # how to go on, not the runner's traceback
    if failure is not None:
        interrupted(failure)
        return stopped(failure, layout, selected)
    stats = read_stats(layout)
    # From the markers, not stats.json: another job on the same OUT may have written stats.json last.
    unfinished = sorted(selected - layout.done_ids())
    damaged = [d for d in stats["shards"]["damaged"] if d["shard"] in selected]
    print_summary(stats, layout, unfinished, damaged)
    warnings = keep_share_warnings(stats, settings)
    for warning in warnings:
        say(f"warning: {warning}")
    return exit_status(unfinished, damaged, warnings if job.strict else [])


def judging(settings: BootstrapSettings) -> str:
    """How the run's filter judges: ``threshold 0.5 on ITM``, or ``no threshold, ranked by ITC``."""
    by = settings.by.upper()
    return f"no threshold, ranked by {by}" if settings.threshold is None else f"threshold {settings.threshold} on {by}"


def interrupted(error: BaseException) -> None:
    """Raise a signal that a runner wrapped (Beam's FnApiRunner turns a KeyboardInterrupt in its workers into
    ``RuntimeError: KeyboardInterrupt [while running ...]``), so that the command exits 130 or 143, not 1."""
    from capfilt.ingest.process_group import Terminated

    seen = error
    while seen is not None:
        if isinstance(seen, (KeyboardInterrupt, Terminated)):
            raise seen
        text = str(seen)
        if text.startswith("KeyboardInterrupt"):
            raise KeyboardInterrupt from error
        if text.startswith("Terminated"):
            raise Terminated() from error
        seen = seen.__cause__ or seen.__context__


def stopped(error: Exception, layout, selected: set[str]) -> int:
    """The job ended with ``error`` before its summary: say what finished (the markers) and how to go on."""
    log.debug("the job stopped", exc_info=error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]  # runners put tracebacks in
    done = selected & layout.done_ids()
    say(f"error: the job stopped: {type(error).__name__}: {lines[-1] if lines else ''} (--verbose for the trace)")
    say(f"{len(done)} of {len(selected)} shard(s) are done and kept in {layout.root}; "
         f"{len(selected) - len(done)} unfinished: rerun the same command to resume them")
    return EXIT_UNFINISHED


def exit_status(unfinished: list[str], damaged: list[dict], keep_share: list[str] = ()) -> int:
    """0: every shard done; 1: shards unfinished, a rerun retries them; 3: done, but input shards are damaged;
    4: done, but the keep share is suspicious (``keep_share``: the warnings that count, i.e. with --strict)."""
    if unfinished:
        return EXIT_UNFINISHED
    if damaged:
        return EXIT_DAMAGED
    return EXIT_KEEP_SHARE if keep_share else 0


def print_summary(stats: dict, layout, unfinished: list[str], damaged: list[dict]) -> None:
    failed = ", ".join(f"{stage} {n}" for stage, n in stats["failed"].items() if n) or "none"
    say(f"{stats['rows']} input rows: {stats['images']} images judged, "
         f"{sum(stats['failed'].values())} failed ({failed})")
    for source in ("web", "synthetic"):
        ratio = stats["noise_ratio"][source]
        say(f"{source:9} texts {stats['texts'][source]}: kept {stats['kept'][source]}, "
             f"removed {stats['rejected'][source]} ({stats['rejected_reasons'][BELOW_THRESHOLD][source]} by the "
             f"filter: noise ratio {'–' if ratio is None else f'{100 * ratio:.1f}%'})")
    removed = [f"{reason} {sum(stats['rejected_reasons'][reason].values())}" for reason in REASONS
               if sum(stats["rejected_reasons"][reason].values())]
    say(f"texts before CapFilt {stats['texts_before']}, after {stats['texts_after']}; removed: "
         f"{', '.join(removed) or 'none'}")
    images = stats.get("duplicate_images")
    if images and images["images"]:
        fate = "dropped (their texts are in rejected/)" if images["dropped"] else "kept (--dedup-images drops them)"
        say(f"{images['images']} images with a kept text repeat the bytes of one kept before "
             f"({images['within_shards']} within a shard, {images['across_shards']} across shards): {fate}")
    duplicates = stats.get("duplicate_keys")
    if duplicates and duplicates["rows"]:
        examples = ", ".join(str(e["key"]) for e in duplicates["examples"][:3])
        say(f"{duplicates['rows']} input rows repeat a key seen before ({duplicates['within_shards']} within a "
             f"shard, {duplicates['across_shards']} across shards; e.g. {examples}): use sample_id to tell rows apart")
    say(f"output in {layout.root}: kept/ rejected/ failed/ stats.json report.html")
    errors = {error["shard"]: error["error"] for error in stats["shards"]["errors"]}
    for shard in unfinished:
        say(f"shard {shard} is unfinished ({errors.get(shard, 'see the log above')}); rerun the same command to "
             "retry it")
    for damage in damaged:
        lost = "" if damage["all_rows_accounted"] else ", and rows after the damage are not in the output"
        say(f"input shard {damage['shard']} is damaged: {damage['input']}: {'; '.join(damage['errors'])} "
             f"({damage['rows_read']} rows read, {damage['rows_failed_read']} failed at stage read{lost})")
    if damaged:
        say(f"rerunning will not change damaged shards: replace the input file (for img2dataset's shards, delete it "
             f"and its _stats.json to download it again), delete {layout.root}/.capfilt/done/SHARD.json, and rerun")


def say(text: str) -> None:
    print(f"[capfilt] {text}", file=sys.stderr, flush=True)
