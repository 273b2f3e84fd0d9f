"""``capfilt``: the command line, one command for the whole loop.

``capfilt COMMAND``: ``datasets``, ``shapes``, ``train``, ``export``,
``evaluate``, ``bootstrap``, ``refilter``, ``export-dataset``, ``demo-models``, ``experiment`` (``COMMANDS``;
``capfilt --help``). All but ``bootstrap``, ``refilter`` and ``datasets`` are another
module's ``main(argv)``, given every later argument unchanged and imported
only when chosen (``capfilt train pretrain --help`` is the trainer's help).
``capfilt refilter`` splits a CapFilt output anew from its stored scores
(``capfilt.pipelines.refilter``), and reports as ``bootstrap`` does.

``capfilt bootstrap`` runs CapFilt end to end with the paper's defaults:
DATA → (download with img2dataset) → image shards → the Beam pipeline →
``OUT/kept``, ``rejected``, ``failed``, ``stats.json``, ``report.html``.
Every knob has a flag; flags capfilt does not know are Beam pipeline options
(``--project``, ``--region``, ``--temp_location``, ``--setup_file``,
``--sdk_container_image``, ``--dataflow_service_options``,
``--dask_client_address`` ...), as ``--opt=value`` or ``--opt value``, passed
on to the runner. ``capfilt datasets`` lists the named datasets.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
from pathlib import Path

from capfilt.ingest import datasets
from capfilt.ingest.process_group import EXIT_SIGINT, EXIT_SIGTERM, Terminated, terminate_raises
from capfilt.pipelines import dask_cluster
from capfilt.pipelines.schema import BELOW_THRESHOLD, REASONS

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
# BLIP w/ ViT-L, fine-tuned on COCO: the paper's captioner and filter, as transformers hub ids.
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
DEFAULT_FILTER = "Salesforce/blip-itm-large-coco"
LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")
SHARDS_FOLDER = "shards"
# Beside the shards folder F (img2dataset allows no other files in it): F.url_list.parquet, the
# canonical URL list it downloads, and F.source.json, what made the shards.
URL_LIST_SUFFIX = ".url_list.parquet"
SOURCE_SUFFIX = ".source.json"


def beside(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


# Exit statuses: 0 every shard done; 1 shards unfinished (rerun to retry them); 2 bad usage; 3 done, but input
# shards are damaged (rerunning will not help: replace the files; see print_summary); 4 (--strict) done, but the
# filter kept almost none or almost all of a source's texts (see keep_share_warnings).
EXIT_UNFINISHED, EXIT_USAGE, EXIT_DAMAGED, EXIT_KEEP_SHARE = 1, 2, 3, 4
# A source (web texts, synthetic captions) of which the filter kept under 1% or over 99% is suspicious, once enough
# of its texts were judged for one text to weigh less than 1%.
KEEP_SHARE_LOW, KEEP_SHARE_HIGH, KEEP_SHARE_MIN_TEXTS = 0.01, 0.99, 100


class UsageError(ValueError):
    """Bad command-line input, reported without a traceback."""


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it has none (a switch) or its help already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "" or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


# The commands, in the order of the loop: data -> models -> CapFilt -> (pre-train again on kept/); then the loop's
# two end-to-end runs in the shapes world. A command with a module is that module's main(argv), given every
# argument after the command's name unchanged; it is imported only when chosen.
COMMANDS: tuple[tuple[str, str | None, str], ...] = (
    ("datasets", None, "data: the named web datasets and their URL lists"),
    ("shapes", "capfilt.shapes.__main__", "data: render shapes-world splits as shards (offline)"),
    ("train", "capfilt.models.train", "models: TASK pretrain|finetune-captioner|finetune-filter"),
    ("export", "capfilt.models.export", "models: a trained captioner/filter as an HF folder"),
    ("evaluate", "capfilt.recipes.evaluate", "models: score captioner and filter on shapes data"),
    ("bootstrap", None, "CapFilt: caption and filter a dataset into OUT/kept"),
    ("refilter", None, "CapFilt: OUT split anew from its stored scores"),
    ("export-dataset", "capfilt.pipelines.export_dataset", "data: OUT/kept as webdataset tars (open_clip)"),
    ("demo-models", "capfilt.recipes.demo", "whole loop: train the demo captioner and filter"),
    ("experiment", "capfilt.recipes.experiment", "whole loop: pre-train on raw vs CapFilt web, score"),
)
DELEGATED = {name: module for name, module, _ in COMMANDS if module}

BOOTSTRAP_EPILOG = (
    "Exit status: 0 every shard done; 1 shards unfinished (rerun the same command to retry them); 2 bad usage; "
    "3 every shard done, but input shards are damaged (rerunning will not help: see the summary, stats.json and "
    f"report.html); {EXIT_KEEP_SHARE} (with --strict only) every shard done, but the filter kept under "
    f"{KEEP_SHARE_LOW:.0%} or over {KEEP_SHARE_HIGH:.0%} of a source's texts (a warning without --strict)."
)


class _CommandsHelp(argparse.RawDescriptionHelpFormatter):
    """``capfilt --help``'s layout: each command's summary on the command's line. Python < 3.13 sizes the column
    without the commands' indent, which would put ``export-dataset``'s summary on a line of its own."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=30)
        self._action_max_length = 4 + max(len(name) for name, _, _ in COMMANDS)  # the commands' indent + names


def build_parser(bootstrap_flags: bool = True) -> argparse.ArgumentParser:
    """``capfilt``'s parser. Without ``bootstrap_flags`` (cheap: nothing heavy imported) ``bootstrap`` takes its
    arguments unparsed, for ``bootstrap_parser``; a delegated command always takes them unparsed."""
    parser = argparse.ArgumentParser(
        prog="capfilt", formatter_class=_CommandsHelp,
        description="CapFilt (BLIP's dataset bootstrapping) and the loop around it: data -> train -> export -> "
                    "evaluate -> bootstrap -> train again on OUT/kept.",
        epilog="`capfilt COMMAND --help` shows a command's own flags (a delegated command's help may name itself "
               "`python -m capfilt...`; both forms run the same code).\nExit status: a command's own; bootstrap's "
               "is in `capfilt bootstrap --help`.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (bootstrap, datasets)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands (in loop order)")
    for name, module, summary in COMMANDS:
        if name == "datasets":
            listing = commands.add_parser(name, help=summary, description="List the named web datasets (cc12m, "
                                          "cc3m, sbu, laion400m) and whether their URL lists are on disk.")
            listing.add_argument("--cache-dir", default=str(datasets.DEFAULT_CACHE),
                                 help="where the named datasets' URL lists are (default: %(default)s)")
        elif name == "bootstrap" and bootstrap_flags:
            add_bootstrap_arguments(commands.add_parser(name, help=summary, **_bootstrap_parser_settings()))
        else:
            commands.add_parser(name, help=summary, add_help=False)
    return parser


def _bootstrap_parser_settings() -> dict:
    return dict(description="Caption and filter a dataset (CapFilt). Unknown --flags are passed to Beam as "
                            "pipeline options, as --opt=value or --opt value.",
                epilog=BOOTSTRAP_EPILOG, formatter_class=_HelpWithDefaults)


def bootstrap_parser() -> argparse.ArgumentParser:
    """``capfilt bootstrap``'s own parser."""
    parser = argparse.ArgumentParser(prog="capfilt bootstrap", **_bootstrap_parser_settings())
    add_bootstrap_arguments(parser)
    return parser


def add_bootstrap_arguments(boot: argparse.ArgumentParser) -> None:
    """The flags of ``capfilt bootstrap``; defaults that are settings' are read from their dataclasses."""
    from capfilt.captioner import METHODS, SamplingSettings
    from capfilt.device import PRECISIONS
    from capfilt.ingest.download import DISTRIBUTORS, OUTPUT_FORMATS, DownloadSettings
    from capfilt.pipelines.settings import BootstrapSettings

    settings, sampling, fetch = BootstrapSettings(), SamplingSettings(), DownloadSettings()
    demo = datasets.DemoInput
    data = boot.add_argument_group("data")
    data.add_argument("--data", default="demo",
                      help="demo, a named dataset (cc12m, cc3m, sbu, laion400m), a URL list file/folder, "
                           "or a file/folder of img2dataset shards")
    data.add_argument("--out", default="out/bootstrap", help="output folder (local or gs://...)")
    data.add_argument("--shards", default=None,
                      help="input shards to run, by index: e.g. 0-9,12 (default: all)")
    data.add_argument("--shards-dir", default=None,
                      help="folder where downloaded (or demo) shards go (default: OUT/shards)")
    data.add_argument("--cache-dir", default=str(datasets.DEFAULT_CACHE),
                      help="folder of the named datasets' URL lists")
    data.add_argument("--no-fetch", action="store_true", help="never fetch a named dataset's URL list")
    data.add_argument("--url-col", default=None,
                      help="URL column of a URL list: a name, or an index without header (default: the named "
                           "dataset's, else detected)")
    data.add_argument("--caption-col", default=None,
                      help="caption column of a URL list (default: the named dataset's, else detected)")
    data.add_argument("--keep-columns", default="",
                      help="comma-separated URL list columns to carry to the output (default: none)")
    data.add_argument("--demo-size", type=int, default=demo.size, help="demo: image-text pairs")
    data.add_argument("--demo-seed", type=int, default=demo.seed, help="demo: seed of the web split")
    data.add_argument("--demo-shard-size", type=int, default=demo.shard_size, help="demo: pairs per shard")

    models = boot.add_argument_group("models")
    models.add_argument("--captioner", default=None,
                        help=f"captioner: HF folder, cached hub id, .pth or demo "
                             f"(default: demo for DATA=demo, else {DEFAULT_CAPTIONER})")
    models.add_argument("--filter", default=None,
                        help=f"filter (default: demo for DATA=demo, else {DEFAULT_FILTER})")
    models.add_argument("--captioner-tokenizer", default=None,
                        help="tokenizer for a .pth captioner (default: the one beside the .pth)")
    models.add_argument("--filter-tokenizer", default=None,
                        help="tokenizer for a .pth filter (default: the one beside the .pth)")
    models.add_argument("--device", default=settings.device,
                        help="auto (CUDA when present: on a node with G GPUs worker i takes GPU i mod G), cpu, "
                             "cuda or cuda:N")
    models.add_argument("--precision", default=settings.precision, choices=PRECISIONS,
                        help="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), "
                             "else fp32")

    capfilt = boot.add_argument_group("CapFilt (defaults: the paper's)")
    capfilt.add_argument("--threshold", type=float, default=settings.threshold,
                         help="remove texts whose ITM match probability (0-1) is below this")
    capfilt.add_argument("-k", "--num-captions", type=int, default=settings.num_captions,
                         help="synthetic captions per image (K)")
    capfilt.add_argument("--select", default=settings.select, metavar="all|top-N",
                         help="texts of an image kept among those that pass: all (the paper's), or top-N, the N best "
                              "by ITM score, web and synthetic together (BLIP-2 kept its top two); identical "
                              "texts of an image are kept once either way")
    capfilt.add_argument("--dedup-images", action="store_true",
                         help="drop exact duplicate images (SHA-256 of the bytes): an image is kept at its first "
                              "(shard, row) with a kept text, the others' texts go to rejected/ (reason duplicate "
                              "image); without it they are only counted")
    capfilt.add_argument("--strict", action="store_true",
                         help=f"exit {EXIT_KEEP_SHARE} when the filter kept under {100 * KEEP_SHARE_LOW:.0f}%% or over "
                              f"{100 * KEEP_SHARE_HIGH:.0f}%% of a source's texts (of {KEEP_SHARE_MIN_TEXTS} or more "
                              "judged); without it, a warning")
    # Sampling flags left out keep the paper's values, or the captioner folder's own capfilt_sampling.json (the
    # demo models write short captions).
    own = "the captioner folder's capfilt_sampling.json, else the paper's"
    capfilt.add_argument("--method", default=None, choices=METHODS,
                         help=f"caption decoding (default: {own} {sampling.method})")
    capfilt.add_argument("--top-p", type=float, default=None,
                         help=f"nucleus sampling probability mass p (default: {own} {sampling.top_p})")
    capfilt.add_argument("--top-k", type=int, default=None,
                         help=f"tokens kept by top-k with nucleus sampling (default: {own} {sampling.top_k})")
    capfilt.add_argument("--max-length", type=int, default=None,
                         help=f"most caption tokens, prompt included (default: {own} {sampling.max_length})")
    capfilt.add_argument("--min-length", type=int, default=None,
                         help=f"fewest caption tokens, prompt included (default: {own} {sampling.min_length})")
    capfilt.add_argument("--batch-size", type=int, default=settings.batch_size, help="images per model call")
    capfilt.add_argument("--seed", type=int, default=settings.seed, help="sampling seed (per shard and batch)")
    capfilt.add_argument("--min-image-size", type=int, default=settings.min_image_size,
                         help="pixels: an image with a shorter side fails (stage size)")

    run = boot.add_argument_group("runner")
    run.add_argument("--runner", default="FnApiRunner",
                     help="Beam runner: FnApiRunner (local, in-process; DirectRunner would first try to fetch "
                          "Prism), DaskRunner (a local Dask cluster, or --dask_client_address tcp://HOST:8786), "
                          "DataflowRunner, FlinkRunner, SparkRunner, ...")
    run.add_argument("--workers", type=int, default=1,
                     help="worker processes of the local runner, or of the local Dask cluster")
    run.add_argument("--torch-threads", type=int, default=None,
                     help="torch threads per worker (default: cores / --workers; with one worker, torch's own)")
    run.add_argument("--decode-threads", type=int, default=settings.decode_threads,
                     help="threads per worker decoding images ahead of the models (0: none)")
    run.add_argument("--no-report", action="store_true", help="write stats.json only")
    run.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")

    download = boot.add_argument_group("download (img2dataset)")
    download.add_argument("--processes", type=int, default=fetch.processes, help="img2dataset processes")
    download.add_argument("--threads", type=int, default=fetch.threads, help="img2dataset threads per process")
    download.add_argument("--image-size", type=int, default=fetch.image_size,
                          help="pixels: the shorter side at most (keeping the aspect ratio)")
    download.add_argument("--samples-per-shard", type=int, default=fetch.samples_per_shard, help="URLs per shard")
    download.add_argument("--distributor", default=fetch.distributor, choices=DISTRIBUTORS,
                          help="img2dataset's distributor")
    download.add_argument("--output-format", default=fetch.output_format, choices=OUTPUT_FORMATS,
                          help="img2dataset's shard format")
    download.add_argument("--timeout", type=int, default=fetch.timeout,
                          help="seconds per connection attempt and per read")
    download.add_argument("--total-timeout", type=float, default=fetch.total_seconds, metavar="SECONDS",
                          help="seconds per URL in all: redirects, headers and body")
    download.add_argument("--max-body-bytes", type=int, default=fetch.max_body_bytes, metavar="BYTES",
                          help="a larger response body fails")
    download.add_argument("--retries", type=int, default=fetch.retries, help="retries per URL")
    download.add_argument("--allow-private-addresses", action="store_true",
                          help="let URLs of loopback and private addresses through (for tests and internal "
                               "mirrors); link-local and cloud metadata addresses stay refused")
    download.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                          help="let just the addresses of this network through, e.g. 10.1.0.0/16 for an internal "
                               "mirror (repeatable); link-local and cloud metadata addresses stay refused")


REFILTER_EPILOG = (
    "Exit status: 0 done; 2 bad input (a source that is not CapFilt output of schema version 3 or later, both or "
    "neither of --threshold and --keep-fraction, an input shard that is needed and not reachable); 3 done, but the "
    "source has damaged input shards.")


def refilter_parser() -> argparse.ArgumentParser:
    """``capfilt refilter``'s parser; the defaults are ``RefilterSettings``' (None: the source run's)."""
    parser = argparse.ArgumentParser(
        prog="capfilt refilter", formatter_class=_HelpWithDefaults, epilog=REFILTER_EPILOG,
        description="A new kept/rejected split of a CapFilt output from its stored scores, without running the "
                    "models: another threshold, or the threshold that keeps a share of the web texts; by ITM, or by "
                    "ITC (with --keep-fraction: DataComp's CLIP-score filter); another --select or --dedup-images. "
                    "Writes OUT2 as bootstrap writes OUT: kept/, rejected/, failed/, stats.json, report.html.")
    parser.add_argument("--from", dest="source", required=True, metavar="OUT", help="the CapFilt output to split")
    parser.add_argument("--out", required=True, metavar="OUT2", help="a new folder for the new split (a rerun resumes)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", type=float, default=None,
                     help="keep a text whose score is at least this (ITM: a probability, 0 to 1; ITC: a cosine, "
                          "-1 to 1)")
    how.add_argument("--keep-fraction", type=float, default=None, metavar="F",
                     help="the threshold at which a share F in (0, 1] of the web texts pass, over all shards; texts "
                          "tied with the cut-off pass too")
    parser.add_argument("--by", choices=("itm", "itc"), default="itm",
                        help="the score: itm, the ITM match probability (the paper's), or itc, the ITC cosine "
                             "similarity of the filter's unimodal features")
    parser.add_argument("--select", default=None, metavar="all|top-N",
                        help="texts of an image kept among those that pass, ranked by the same score (default: OUT's)")
    parser.add_argument("--dedup-images", action=argparse.BooleanOptionalAction, default=None,
                        help="drop exact duplicate images, or not (default: OUT's)")
    parser.add_argument("--input", default=None, metavar="SHARDS",
                        help="where OUT's input shards are now, if they moved (default: the paths OUT recorded); "
                             "read only for texts that the new split keeps and whose image OUT/kept does not hold")
    parser.add_argument("--no-report", action="store_true", help="write stats.json only")
    return parser


def refilter(args) -> int:
    """``capfilt refilter``: ``capfilt.pipelines.refilter.refilter`` with the flags, and bootstrap's summary."""
    import time

    from capfilt.pipelines.layout import OutputLayout
    from capfilt.pipelines.refilter import RefilterSettings, refilter as split, unfinished_in_source
    from capfilt.pipelines.schema import WEB

    started = time.perf_counter()
    settings = RefilterSettings(threshold=args.threshold, keep_fraction=args.keep_fraction, by=args.by,
                                select=args.select, dedup_images=args.dedup_images, input=args.input)
    stats = split(settings, args.source, args.out, report=not args.no_report)
    chosen, web = stats["settings"], stats["texts"][WEB]
    passed = web - stats["rejected_reasons"][BELOW_THRESHOLD][WEB]
    fraction = f" (--keep-fraction {chosen['keep_fraction']})" if chosen["keep_fraction"] is not None else ""
    _say(f"split {args.source} anew by {chosen['by']} at threshold {chosen['threshold']:.6g}{fraction}: {passed} of "
         f"{web} web texts pass ({passed / web if web else 0:.1%}); select {chosen['select']}"
         f"{', duplicate images dropped' if chosen['dedup_images'] else ''}; {time.perf_counter() - started:.1f} s")
    damaged = stats["shards"]["damaged"]
    print_summary(stats, OutputLayout(args.out), [], damaged)
    unfinished = unfinished_in_source(args.source)
    if unfinished:
        _say(f"warning: {args.source} has {len(unfinished)} unfinished shard(s) ({', '.join(unfinished[:5])}): they "
             "are not in the new split; finish them with bootstrap, then refilter again")
    return exit_status([], damaged)


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


def check_models(captioner: str, filter_: str) -> None:
    """Fail early, with the loader's message, when a model is not on disk (runners whose workers are here)."""
    from capfilt.checkpoints import CAPTIONER, FILTER, CheckpointError, resolve

    for ref, role in ((captioner, CAPTIONER), (filter_, FILTER)):
        try:
            resolve(ref, role)
        except CheckpointError as error:
            raise UsageError(f"the {role} {ref!r} is not available: {error}") from None


def record_source(folder: Path, params: dict) -> bool:
    """Bind ``folder`` (the pipeline's input shards) to what made them; True when it already was.

    A rerun with the same DATA reuses (and resumes) the shards; another DATA
    or other download settings in the same folder is an error, not a mix.
    """
    record = beside(folder, SOURCE_SUFFIX)
    if record.is_file():
        earlier = json.loads(record.read_text())
        if earlier != params:
            raise UsageError(f"{folder} holds shards of another input ({json.dumps(earlier)}); "
                             "use another --out (or --shards-dir)")
        return True
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(params, indent=2) + "\n")
    return False


def prepare_demo(demo: datasets.DemoInput, folder: Path) -> str:
    """Render the demo's web split into ``folder`` once; later runs with the same settings reuse it."""
    from capfilt.shapes import write_split

    params = {"data": "demo", "split": "web", "size": demo.size, "seed": demo.seed, "shard_size": demo.shard_size}
    shards = math.ceil(demo.size / demo.shard_size)
    if record_source(folder, params) and len(list(folder.glob("*_stats.json"))) == shards:
        return str(folder)
    _say(f"rendering the shapes world's web split: {demo.size} pairs into {folder}")
    write_split("web", demo.size, demo.seed, folder, shard_size=demo.shard_size, overwrite=True)
    return str(folder)


def prepare_download(source: datasets.UrlListInput, folder: Path, args) -> str:
    """Write the canonical URL list (once), then download it with img2dataset (resuming)."""
    from capfilt.ingest import folder_lock
    from capfilt.ingest.download import DownloadError, DownloadSettings, download, lock_path

    extra = tuple(c for c in args.keep_columns.split(",") if c)
    try:
        settings = DownloadSettings(
            processes=args.processes, threads=args.threads, image_size=args.image_size,
            samples_per_shard=args.samples_per_shard, distributor=args.distributor,
            output_format=args.output_format, timeout=args.timeout, retries=args.retries,
            allow_private_addresses=args.allow_private_addresses, allow_networks=tuple(args.allow_network),
            max_body_bytes=args.max_body_bytes, total_seconds=args.total_timeout,
        )
    except ValueError as error:  # a bad --allow-network, --max-body-bytes or --total-timeout
        raise UsageError(str(error)) from None
    url_list = beside(folder, URL_LIST_SUFFIX)
    params = {
        "data": source.name, "paths": [str(p.resolve()) for p in source.url_list.paths],
        "url_col": source.url_list.url_col, "caption_col": source.url_list.caption_col, "keep_columns": list(extra),
        "image_size": settings.image_size,
        "samples_per_shard": settings.samples_per_shard, "output_format": settings.output_format,
        "allow_private_addresses": args.allow_private_addresses,  # which URLs were refused before download
    }
    # Which URLs were refused depends on the allowed networks too: recorded when there are any, so that a folder
    # recorded before the flag existed still resumes. The limits (like --timeout) decide failures at download and
    # are not recorded.
    if settings.allow_networks:
        params["allow_networks"] = list(settings.allow_networks)
    with folder_lock.hold(lock_path(folder), on_wait=_say):  # one job writes the URL list, the other waits
        record_source(folder, params)
        if not url_list.is_file():
            summary = datasets.write_url_list(source.url_list, url_list, extra,
                                              allow_private_addresses=args.allow_private_addresses,
                                              allow_networks=settings.allow_networks)
            _say(f"URL list: {summary['rows']} rows -> {url_list}")
    _say(f"downloading with img2dataset ({settings.distributor}, {settings.processes} processes) into {folder}; "
         "finished shards are kept")
    try:
        return download(url_list, folder, settings, extra, on_wait=_say)
    except DownloadError as error:
        raise UsageError(str(error)) from None


def shards_folder(args) -> Path:
    """Where the demo's or img2dataset's shards go: ``--shards-dir``, else ``OUT/shards`` (a local folder)."""
    if args.shards_dir:
        return Path(args.shards_dir)
    if "://" in args.out:
        raise UsageError(f"--out {args.out} is remote: give a local --shards-dir for the downloaded shards "
                         "(or download them first and pass their folder as --data)")
    return Path(args.out) / SHARDS_FOLDER


def beam_options(unknown: list[str]) -> list[str]:
    """The flags capfilt does not know, as Beam options ``--opt=value``; ``--opt value`` is joined.

    A word that does not start with ``--`` right after an unknown ``--opt`` (without ``=``) is its value; a
    flag followed by another flag (``--streaming``) stays as it is; any other word is an error.
    """
    options: list[str] = []
    for word in unknown:
        if word.startswith("--"):
            options.append(word)
        elif options and "=" not in options[-1]:
            options[-1] = f"{options[-1]}={word}"
        else:
            raise UsageError(f"unexpected argument {word!r} (Beam options are --opt=value or --opt value)")
    return options


def runs_locally(args, options: list[str]) -> bool:
    """Whether the workers read this machine's paths: a local runner, or a Dask cluster capfilt starts here."""
    if dask_cluster.is_dask(args.runner):
        return not dask_cluster.joins_cluster(options)
    return args.runner in LOCAL_RUNNERS


def beam_arguments(args, unknown: list[str]) -> list[str]:
    extra = list(unknown)
    if args.workers > 1 and args.runner in LOCAL_RUNNERS:
        extra += [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]
    return extra


def torch_threads(args) -> int | None:
    """``--torch-threads``, else the machine's cores shared out among ``--workers`` processes (else torch's)."""
    if args.torch_threads:
        return args.torch_threads
    return max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else None


def settings_from_args(args):
    """The run's ``BootstrapSettings`` from the flags; the models default by DATA."""
    from capfilt.pipelines.settings import BootstrapSettings

    captioner, filter_ = default_models(args.data)
    return BootstrapSettings(
        captioner=args.captioner or captioner, filter=args.filter or filter_,
        captioner_tokenizer=args.captioner_tokenizer, filter_tokenizer=args.filter_tokenizer,
        device=args.device, precision=args.precision, torch_threads=torch_threads(args),
        decode_threads=args.decode_threads, num_captions=args.num_captions,
        sampling_overrides={name: value for name, value in (
            ("method", args.method), ("top_p", args.top_p), ("top_k", args.top_k),
            ("max_length", args.max_length), ("min_length", args.min_length)) if value is not None},
        threshold=args.threshold, select=args.select, dedup_images=args.dedup_images, batch_size=args.batch_size,
        seed=args.seed, min_image_size=args.min_image_size,
    )


def bootstrap(args, unknown: list[str]) -> int:
    from capfilt.pipelines import bootstrap as pipeline
    from capfilt.pipelines.layout import OutputLayout
    from capfilt.pipelines.progress import Progress
    from capfilt.pipelines.report import read_stats

    options = beam_options(unknown)
    if dask_cluster.is_dask(args.runner):
        try:
            dask_cluster.check_installed()
        except ImportError as error:
            raise UsageError(str(error)) from None
    settings = settings_from_args(args)
    if runs_locally(args, options):
        check_models(settings.captioner, settings.filter)
    columns = datasets.Columns(url=args.url_col, caption=args.caption_col)
    source = datasets.resolve(args.data, args.cache_dir, columns, fetch=False if args.no_fetch else None)
    layout = OutputLayout(args.out)
    layout.claim(settings.provenance())  # before any download: a mismatched OUT fails now, not after hours
    if isinstance(source, datasets.ShardsInput):
        location = source.location
    elif isinstance(source, datasets.DemoInput):
        demo = datasets.DemoInput(args.demo_size, args.demo_seed, args.demo_shard_size)
        location = prepare_demo(demo, shards_folder(args))
    else:
        location = prepare_download(source, shards_folder(args), args)

    shards = select_shards(location, args.shards)
    missing = [s.shard_id for s in shards if s.stats_missing]
    if missing:
        _say(f"warning: {len(missing)} shard(s) have no img2dataset _stats.json ({', '.join(missing[:10])}"
             f"{' ...' if len(missing) > 10 else ''}): is a download still running? They are processed; one that "
             "cannot be read whole is left unfinished, to rerun once the download is over")
    _say(f"CapFilt on {len(shards)} shard(s) from {location} with {args.runner}: "
         f"captioner {settings.captioner}, filter {settings.filter}, K={settings.num_captions}, "
         f"threshold {settings.threshold}, select {settings.select}"
         f"{', duplicate images dropped' if settings.dedup_images else ''}, "
         f"sampling {settings.sampling_overrides or 'defaults'}")
    selected = {s.shard_id for s in shards}
    failure = None
    with Progress(layout, [s.shard_id for s in shards], interval=args.progress_interval):
        try:
            pipeline.run(shards, settings, str(args.out), runner=args.runner,
                         beam_args=beam_arguments(args, options), report=not args.no_report, workers=args.workers)
        except Exception as error:  # noqa: BLE001 - the job's end (a full disk, a lost worker): what is kept, and
            failure = error  # how to go on, not the runner's traceback
    if failure is not None:
        return stopped(failure, layout, selected)
    stats = read_stats(layout)
    # From the markers, not stats.json: another job on the same OUT may have written stats.json last.
    unfinished = sorted(selected - layout.done_ids())
    damaged = [d for d in stats["shards"]["damaged"] if d["shard"] in selected]
    print_summary(stats, layout, unfinished, damaged)
    warnings = keep_share_warnings(stats, settings)
    for warning in warnings:
        _say(f"warning: {warning}")
    return exit_status(unfinished, damaged, warnings if args.strict else [])


def stopped(error: Exception, layout, selected: set[str]) -> int:
    """The job ended with ``error`` before its summary: say what finished (the markers) and how to go on."""
    log.debug("the job stopped", exc_info=error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]  # runners put tracebacks in
    done = selected & layout.done_ids()
    _say(f"error: the job stopped: {type(error).__name__}: {lines[-1] if lines else ''} (--verbose for the trace)")
    _say(f"{len(done)} of {len(selected)} shard(s) are done and kept in {layout.root}; "
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


def keep_share_warnings(stats: dict, settings) -> list[str]:
    """What a keep share under 1% or over 99% likely means, per source (web texts, synthetic captions).

    Per source, not pooled: the two fail differently (web texts: the data, the filter or the threshold;
    synthetic captions: the captioner too), and a pooled share hides one source at 0% beside the other at 40%.
    A source with fewer than ``KEEP_SHARE_MIN_TEXTS`` texts judged is not checked: one text would be over 1%.
    The share is the filter's: texts removed as duplicates or by ``--select`` passed it.
    """
    warnings = []
    for source, what in (("web", "web texts"), ("synthetic", "synthetic captions")):
        judged = stats["texts"][source]
        if judged < KEEP_SHARE_MIN_TEXTS:
            continue
        share = 1 - stats["rejected_reasons"][BELOW_THRESHOLD][source] / judged
        kept = f"the filter kept {100 * share:.1f}% of the {judged} {what} it judged"
        if share < KEEP_SHARE_LOW:
            cause = ("the captioner likely writes captions that do not describe these images (a .pth captioner "
                     "with the wrong tokenizer writes nonsense), or the captioner and filter do not belong together"
                     if source == "synthetic" else "the filter likely does not know these images or texts")
            warnings.append(
                f"{kept} (under {KEEP_SHARE_LOW:.0%}): {cause}; the demo models know only the shapes world (give "
                f"--captioner and --filter for real photos); or --threshold {settings.threshold} is too high for "
                f"this filter (captioner {settings.captioner}, filter {settings.filter}). Look at rejected/ and "
                "report.html before training on kept/")
        elif share > KEEP_SHARE_HIGH:
            warnings.append(
                f"{kept} (over {KEEP_SHARE_HIGH:.0%}): the filter removes next to nothing: --threshold "
                f"{settings.threshold} is likely too low (0 keeps every text), or the filter scores every pair "
                f"alike (a model mismatch: an untrained or wrong filter {settings.filter}). Look at kept/ and "
                "report.html before training on it")
    return warnings


def print_summary(stats: dict, layout, unfinished: list[str], damaged: list[dict]) -> None:
    failed = ", ".join(f"{stage} {n}" for stage, n in stats["failed"].items() if n) or "none"
    _say(f"{stats['rows']} input rows: {stats['images']} images judged, "
         f"{sum(stats['failed'].values())} failed ({failed})")
    for source in ("web", "synthetic"):
        ratio = stats["noise_ratio"][source]
        _say(f"{source:9} texts {stats['texts'][source]}: kept {stats['kept'][source]}, "
             f"removed {stats['rejected'][source]} ({stats['rejected_reasons'][BELOW_THRESHOLD][source]} by the "
             f"filter: noise ratio {'–' if ratio is None else f'{100 * ratio:.1f}%'})")
    removed = [f"{reason} {sum(stats['rejected_reasons'][reason].values())}" for reason in REASONS
               if sum(stats["rejected_reasons"][reason].values())]
    _say(f"texts before CapFilt {stats['texts_before']}, after {stats['texts_after']}; removed: "
         f"{', '.join(removed) or 'none'}")
    images = stats.get("duplicate_images")
    if images and images["images"]:
        fate = "dropped (their texts are in rejected/)" if images["dropped"] else "kept (--dedup-images drops them)"
        _say(f"{images['images']} images with a kept text repeat the bytes of one kept before "
             f"({images['within_shards']} within a shard, {images['across_shards']} across shards): {fate}")
    duplicates = stats.get("duplicate_keys")
    if duplicates and duplicates["rows"]:
        examples = ", ".join(str(e["key"]) for e in duplicates["examples"][:3])
        _say(f"{duplicates['rows']} input rows repeat a key seen before ({duplicates['within_shards']} within a "
             f"shard, {duplicates['across_shards']} across shards; e.g. {examples}): use sample_id to tell rows apart")
    _say(f"output in {layout.root}: kept/ rejected/ failed/ stats.json report.html")
    errors = {error["shard"]: error["error"] for error in stats["shards"]["errors"]}
    for shard in unfinished:
        _say(f"shard {shard} is unfinished ({errors.get(shard, 'see the log above')}); rerun the same command to "
             "retry it")
    for damage in damaged:
        lost = "" if damage["all_rows_accounted"] else ", and rows after the damage are not in the output"
        _say(f"input shard {damage['shard']} is damaged: {damage['input']}: {'; '.join(damage['errors'])} "
             f"({damage['rows_read']} rows read, {damage['rows_failed_read']} failed at stage read{lost})")
    if damaged:
        _say(f"rerunning will not change damaged shards: replace the input file (for img2dataset's shards, delete it "
             f"and its _stats.json to download it again), delete {layout.root}/_done/SHARD.json, and rerun")


def _say(text: str) -> None:
    print(f"[capfilt] {text}", file=sys.stderr, flush=True)


def _quiet_model_loading() -> None:
    """No per-load "Loading weights" bars from transformers: the run's own progress lines are the ones to read."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # local worker processes started from here
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class _DropApitoolsWarning(logging.Filter):
    """Beam's BigQuery client package, imported with apache_beam, warns through the root logger on every run
    that apitools is missing (``apache_beam.io.gcp.internal.clients.bigquery``); capfilt uses no BigQuery."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and str(record.msg).startswith("apitools not found"))


def silence_beam_apitools_warning() -> None:
    """Drop exactly that one message, logged by the root logger itself (other loggers' records are untouched)."""
    root = logging.getLogger()
    if not any(isinstance(f, _DropApitoolsWarning) for f in root.filters):
        root.addFilter(_DropApitoolsWarning())


def delegate(command: str, rest: list[str]) -> int:
    """Run a delegated command's ``main(rest)``; its exit status, whether it returns or calls ``sys.exit``."""
    module = importlib.import_module(DELEGATED[command])
    try:
        code = module.main(list(rest))
    except SystemExit as exit_:
        code = exit_.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"): printed, status 1, as Python does
    return 1


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `capfilt datasets | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail
        return 0


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    silence_beam_apitools_warning()
    parser = build_parser(bootstrap_flags=False)  # imports nothing heavy: --help and delegation stay fast
    args, rest = parser.parse_known_args(argv)
    if args.command in DELEGATED:
        return delegate(args.command, rest)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "datasets":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        print(datasets.describe_named(args.cache_dir))
        return 0
    try:
        with terminate_raises():  # SIGTERM as an exception: the download's processes are stopped on the way out
            if args.command == "refilter":
                return refilter(refilter_parser().parse_args(rest))
            boot_args, unknown = bootstrap_parser().parse_known_args(rest)
            boot_args.verbose = args.verbose
            _quiet_model_loading()
            return bootstrap(boot_args, unknown)
    except (UsageError, ValueError, FileNotFoundError) as error:  # bad input: a message, not a traceback
        if args.verbose:
            raise
        print(f"capfilt: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, Terminated) as signal:
        name, status = ("SIGINT", EXIT_SIGINT) if isinstance(signal, KeyboardInterrupt) else ("SIGTERM", EXIT_SIGTERM)
        _say(f"stopped by {name}: finished shards and downloads are kept; rerun the same command to resume")
        return status


if __name__ == "__main__":
    sys.exit(main())
