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
import difflib
import importlib
import logging
import os
import sys

from capfilt import __version__
from capfilt.help_format import HelpWithDefaults
from capfilt.ingest import datasets, named, url_list
from capfilt.ingest.process_group import EXIT_SIGINT, EXIT_SIGTERM, Terminated, terminate_raises
from capfilt.pipelines import dask_cluster
from capfilt.pipelines.keep_share import KEEP_SHARE_HIGH, KEEP_SHARE_LOW, KEEP_SHARE_MIN_TEXTS
from capfilt.pipelines.schema import BELOW_THRESHOLD
from capfilt.pipelines.selection import BY_ITM, SCORE_NAMES
from capfilt.scores import ITM_THRESHOLD
from capfilt.recipes import bootstrap as recipe
from capfilt.recipes import preflight
from capfilt.recipes.bootstrap import (
    DEFAULT_CAPTIONER, DEFAULT_FILTER, EXIT_KEEP_SHARE, EXIT_USAGE, BootstrapRun, UsageError, say,
)

log = logging.getLogger(__name__)

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


# What each model size needs (docs/models.md has the table, with hub ids and one command each)
MODELS_HELP = (
    "Any captioner with any filter; config.json's model_type picks the family. Captioners: BLIP, BLIP-2 (OPT, "
    "Flan-T5), InstructBLIP; filters: BLIP ITM, BLIP-2 Q-Former (ITM, ITC), CLIP and SigLIP (ITC only). Memory for "
    "the weights, fp32/bf16: BLIP-large 1.9/0.9 GB; BLIP-2 OPT-2.7b 15.5/7.7, OPT-6.7b 31/15.5, Flan-T5-xl "
    "15.8/7.9, Flan-T5-xxl 49/24; InstructBLIP Flan-T5-xl 16/8, Vicuna-7b 32/16; BLIP-2 ITM ViT-g 4.7/2.3; CLIP "
    "ViT-L/14 1.7; SigLIP so400m 3.5. On a GPU, BLIP-2 and InstructBLIP weights over half its memory are held in "
    "bf16 (fp16 without bf16); on the CPU in fp32, plus activations (docs/models.md)."
)

# BLIP-2's and InstructBLIP's sampling defaults, for the help without importing torch (tests/test_cli_commands.py
# checks them against capfilt.blip2.LmSamplingSettings and capfilt.instructblip.CAPTION_INSTRUCTION)
LM_MAX_LENGTH, LM_MIN_LENGTH = 30, 1
CAPTION_INSTRUCTION = "A short image caption:"


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
        epilog="`capfilt COMMAND --help` shows a command's own flags.\nExit status: a command's own (130/143 when "
               "stopped by Ctrl-C/SIGTERM); bootstrap's is in `capfilt bootstrap --help`.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (bootstrap, datasets)")
    parser.add_argument("--version", action="version", version=f"capfilt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands (in loop order)")
    for name, module, summary in COMMANDS:
        if name == "datasets":
            listing = commands.add_parser(name, help=summary, description="List the named web datasets (cc12m, "
                                          "cc3m, sbu, laion400m) and whether their URL lists are on disk.")
            listing.add_argument("--cache-dir", default=str(named.DEFAULT_CACHE),
                                 help="where the named datasets' URL lists are (default: %(default)s)")
        elif name == "bootstrap" and bootstrap_flags:
            add_bootstrap_arguments(commands.add_parser(name, help=summary, **_bootstrap_parser_settings()))
        else:
            commands.add_parser(name, help=summary, add_help=False)
    return parser


def _bootstrap_parser_settings() -> dict:
    return dict(description="Caption and filter a dataset (CapFilt). Unknown --flags are passed to Beam as "
                            "pipeline options, as --opt=value or --opt value.",
                epilog=BOOTSTRAP_EPILOG, formatter_class=HelpWithDefaults)


def bootstrap_parser() -> argparse.ArgumentParser:
    """``capfilt bootstrap``'s own parser."""
    parser = argparse.ArgumentParser(prog="capfilt bootstrap", **_bootstrap_parser_settings())
    add_bootstrap_arguments(parser)
    return parser


def add_bootstrap_arguments(boot: argparse.ArgumentParser) -> None:
    """The flags of ``capfilt bootstrap``, in groups; defaults that are settings' are read from their dataclasses."""
    from capfilt.pipelines.settings import BootstrapSettings

    settings = BootstrapSettings()
    _add_data_flags(boot.add_argument_group("data"))
    _add_model_flags(boot.add_argument_group("models", MODELS_HELP), settings)
    _add_capfilt_flags(boot.add_argument_group("CapFilt (defaults: the paper's)"), settings)
    _add_runner_flags(boot.add_argument_group("runner"), settings)
    _add_download_flags(boot.add_argument_group("download (img2dataset)"))


def _add_data_flags(data) -> None:
    demo = datasets.DemoInput
    data.add_argument("--data", default="demo",
                      help="demo, a named dataset (cc12m, cc3m, sbu, laion400m), a URL list file/folder, "
                           "or a file/folder of img2dataset shards")
    data.add_argument("--out", default="out/bootstrap", help="output folder (local or gs://...)")
    data.add_argument("--shards", default=None,
                      help="input shards to run, by index: e.g. 0-9,12 (default: all)")
    data.add_argument("--shards-dir", default=None,
                      help="folder where downloaded (or demo) shards go (default: OUT/.capfilt/shards)")
    data.add_argument("--cache-dir", default=str(named.DEFAULT_CACHE),
                      help="folder of the named datasets' URL lists")
    data.add_argument("--no-fetch", action="store_true", help="never fetch a named dataset's URL list")
    data.add_argument("--url-col", default=None,
                      help="URL column of a URL list: a name, or an index without header (default: the named "
                           "dataset's, else detected)")
    data.add_argument("--caption-col", default=None,
                      help="caption column of a URL list (default: the named dataset's, else detected)")
    data.add_argument("--no-caption", action="store_true",
                      help="the URL list has no caption column: caption its images without web texts (a list "
                           "whose caption column is not found is an error otherwise)")
    data.add_argument("--keep-columns", default="",
                      help="comma-separated URL list columns to carry to the output (default: none)")
    data.add_argument("--demo-size", type=int, default=demo.size, help="demo: image-text pairs")
    data.add_argument("--demo-seed", type=int, default=demo.seed, help="demo: seed of the web split")
    data.add_argument("--demo-shard-size", type=int, default=demo.shard_size, help="demo: pairs per shard")


def _add_model_flags(models, settings) -> None:
    from capfilt.precision import PRECISIONS

    models.add_argument("--captioner", default=None,
                        help=f"captioner: HF folder, cached hub id, .pth or demo; BLIP, BLIP-2 or InstructBLIP "
                             f"(default: demo for DATA=demo, else {DEFAULT_CAPTIONER})")
    models.add_argument("--filter", default=None,
                        help=f"filter: BLIP, BLIP-2's Q-Former, CLIP or SigLIP "
                             f"(default: demo for DATA=demo, else {DEFAULT_FILTER})")
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


def _add_capfilt_flags(capfilt, settings) -> None:
    from capfilt.sampling_settings import METHODS, SamplingSettings

    sampling = SamplingSettings()
    capfilt.add_argument("--by", default=None, choices=SCORE_NAMES,
                         help="the score --threshold and --select top-N use: itm, the filter's ITM match "
                              "probability (the paper's), or itc, its ITC cosine similarity (default: itm for a "
                              "filter with an ITM head, itc for CLIP and SigLIP)")
    capfilt.add_argument("--threshold", type=float, default=None,
                         help=f"remove texts whose score is below this: by itm a probability in [0, 1], by itc a "
                              f"cosine in [-1, 1] (default: {settings.threshold} by itm; by itc none: give one, or "
                              "--select top-N alone ranks with no threshold)")
    capfilt.add_argument("-k", "--num-captions", type=int, default=settings.num_captions,
                         help="synthetic captions per image (K)")
    capfilt.add_argument("--select", default=settings.select, metavar="all|top-N",
                         help="texts of an image kept among those that pass: all (the paper's), or top-N, the N best "
                              "by the --by score, web and synthetic together (BLIP-2 kept its top two); identical "
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
    counted = "BLIP counts the prompt's tokens, BLIP-2 and InstructBLIP new tokens only"
    capfilt.add_argument("--max-length", type=int, default=None,
                         help=f"most caption tokens; {counted} (default: {own} {sampling.max_length} for BLIP, "
                              f"{LM_MAX_LENGTH} for the others)")
    capfilt.add_argument("--min-length", type=int, default=None,
                         help=f"fewest caption tokens; {counted} (default: {own} {sampling.min_length} for BLIP, "
                              f"{LM_MIN_LENGTH} for the others)")
    capfilt.add_argument("--instruction", default=None, metavar="TEXT",
                         help=f"InstructBLIP's captioning instruction (default: {CAPTION_INSTRUCTION!r}, a template "
                              "of the InstructBLIP paper)")
    capfilt.add_argument("--batch-size", type=int, default=settings.batch_size, help="images per model call")
    capfilt.add_argument("--seed", type=int, default=settings.seed,
                         help="sampling seed: each image's captions are drawn from (seed, its key)")
    capfilt.add_argument("--min-image-size", type=int, default=settings.min_image_size,
                         help="pixels: an image with a shorter side fails (stage size)")


def _add_runner_flags(run, settings) -> None:
    run.add_argument("--runner", default=recipe.DEFAULT_RUNNER,
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


def _add_download_flags(download) -> None:
    from capfilt.ingest.download import DISTRIBUTORS, OUTPUT_FORMATS, DownloadSettings

    fetch = DownloadSettings()
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
    "Exit status: 0 done; 2 bad input (a source that is not CapFilt output of schema version 4 or later, both or "
    "neither of --threshold and --keep-fraction, an input shard that is needed and not reachable); 3 done, but the "
    "source has damaged input shards.")


def refilter_parser() -> argparse.ArgumentParser:
    """``capfilt refilter``'s parser; the defaults are ``RefilterSettings``' (None: the source run's)."""
    parser = argparse.ArgumentParser(
        prog="capfilt refilter", formatter_class=HelpWithDefaults, epilog=REFILTER_EPILOG,
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
    parser.add_argument("--by", choices=("itm", "itc"), default=None,
                        help="the score: itm, the ITM match probability (the paper's), or itc, the ITC cosine "
                             "similarity of the filter's unimodal features (default: the source run's)")
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
    stats = split(settings, args.source, args.out, report=not args.no_report, show_progress=True)
    chosen, web = stats["settings"], stats["texts"][WEB]
    passed = web - stats["rejected_reasons"][BELOW_THRESHOLD][WEB]
    fraction = f" (--keep-fraction {chosen['keep_fraction']})" if chosen["keep_fraction"] is not None else ""
    say(f"split {args.source} anew by {chosen['by']} at threshold {chosen['threshold']:.6g}{fraction}: {passed} of "
         f"{web} web texts pass ({passed / web if web else 0:.1%}); select {chosen['select']}"
         f"{', duplicate images dropped' if chosen['dedup_images'] else ''}; {time.perf_counter() - started:.1f} s")
    damaged = stats["shards"]["damaged"]
    recipe.print_summary(stats, OutputLayout(args.out), [], damaged)
    for warning in stats.get("keep_share_warnings") or []:  # a split that keeps almost none or all: as bootstrap
        say(f"warning: {warning}")
    unfinished = unfinished_in_source(args.source)
    if unfinished:
        say(f"warning: {args.source} has {len(unfinished)} unfinished shard(s) ({', '.join(unfinished[:5])}): they "
             "are not in the new split; finish them with bootstrap, then refilter again")
    return recipe.exit_status([], damaged)


def torch_threads(args) -> int | None:
    """``--torch-threads``, else the machine's cores shared out among ``--workers`` processes (else torch's)."""
    if args.torch_threads:
        return args.torch_threads
    return max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else None


def model_families(captioner: str, filter_: str) -> tuple[str | None, str | None]:
    """The captioner's and the filter's families from their config.json (``capfilt.model_kind``); None for a model
    that cannot be read, which the pre-flight reports (``preflight.model_problems``)."""
    from capfilt.checkpoints import CAPTIONER, FILTER, CheckpointError, resolve
    from capfilt.model_kind import model_kind

    found = []
    for ref, role in ((captioner, CAPTIONER), (filter_, FILTER)):
        try:
            found.append(model_kind(resolve(ref, role), ref, role).family)
        except (CheckpointError, FileNotFoundError):
            found.append(None)
    return found[0], found[1]


def judging(args, filter_family: str | None) -> tuple[str, float | None]:
    """``--by`` and ``--threshold`` as the run takes them: by the filter's own score unless told (ITC for a filter
    without an ITM head); the paper's 0.5 by ITM, no threshold by ITC unless one is given."""
    from capfilt.model_kind import judged_by

    by = args.by or (judged_by(filter_family) if filter_family else BY_ITM)
    if args.threshold is not None:
        return by, args.threshold
    return by, (ITM_THRESHOLD if by == BY_ITM else None)


def settings_from_args(args):
    """The run's ``BootstrapSettings`` from the flags; the models default by DATA, their families are read from
    their config.json. A choice the models cannot take is a ``UsageError`` naming the ways out."""
    from capfilt.pipelines.settings import AUTO_FAMILY, BootstrapSettings

    captioner, filter_ = recipe.default_models(args.data)
    captioner, filter_ = args.captioner or captioner, args.filter or filter_
    captioner_family, filter_family = model_families(captioner, filter_)
    by, threshold = judging(args, filter_family)
    problems = preflight.judging_problems(filter_, filter_family, by, threshold, args.select)
    problems += preflight.instruction_problems(captioner, captioner_family, args.instruction)
    if problems:
        raise preflight.PreflightError(problems)
    return BootstrapSettings(
        captioner=captioner, filter=filter_,
        captioner_tokenizer=args.captioner_tokenizer, filter_tokenizer=args.filter_tokenizer,
        device=args.device, precision=args.precision, torch_threads=torch_threads(args),
        decode_threads=args.decode_threads, num_captions=args.num_captions,
        sampling_overrides={name: value for name, value in (
            ("method", args.method), ("top_p", args.top_p), ("top_k", args.top_k),
            ("max_length", args.max_length), ("min_length", args.min_length),
            ("instruction", args.instruction)) if value is not None},
        # A family not readable here: the model is on a remote runner's workers only (the pre-flight reports it for
        # a local runner); the worker takes the family of what it loads.
        by=by, captioner_family=captioner_family or AUTO_FAMILY, filter_family=filter_family or AUTO_FAMILY,
        threshold=threshold, select=args.select, dedup_images=args.dedup_images, batch_size=args.batch_size,
        seed=args.seed, min_image_size=args.min_image_size,
    )


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


def beam_flags(runner: str) -> set[str]:
    """Every flag some Beam options class defines (``--project``, ``--temp_location``, ...; with the DaskRunner
    its ``--dask_*`` too), read as Beam reads them (``PipelineOptions.get_all_options``). Empty where Beam's
    parser cannot be had: the check is then skipped, never the run."""
    try:
        from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser
    except ImportError:
        return set()
    if dask_cluster.is_dask(runner):
        import apache_beam.runners.dask.dask_runner  # noqa: F401 - defines DaskOptions, Beam's Dask flags
    flags: set[str] = set()
    for options in PipelineOptions.__subclasses__():
        parser = _BeamArgumentParser(allow_abbrev=False)
        try:
            options._add_argparse_args(parser)  # noqa: SLF001 - Beam's own way to list an options class's flags
        except Exception:  # noqa: BLE001 - a third-party options class that does not list: its flags pass unchecked
            return set()
        flags.update(flag for action in parser._actions for flag in action.option_strings)
    return flags


def check_beam_options(options: list[str], runner: str) -> None:
    """A flag neither capfilt nor Beam knows is a usage error naming the closest known flag (Beam itself would
    drop it with a warning, and the job would run without it: ``--treshold 0.9`` at threshold 0.5)."""
    problem = unknown_flags(options, runner)
    if problem:
        raise UsageError(problem)


def unknown_flags(options: list[str], runner: str) -> str | None:
    """``check_beam_options``' problem as a line (None: every flag is known), for the pre-flight's list."""
    if not options:
        return None  # nothing to check: Beam's option classes are not even listed
    known = beam_flags(runner)
    if not known:
        return None
    unknown = [option.split("=", 1)[0] for option in options if option.split("=", 1)[0] not in known]
    if unknown:
        ours = [flag for action in bootstrap_parser()._actions for flag in action.option_strings]
        hints = []
        for flag in unknown:
            close = difflib.get_close_matches(flag, ours, n=1) or difflib.get_close_matches(flag, sorted(known), n=1)
            hints.append(f"{flag}" + (f" (did you mean {close[0]}?)" if close else ""))
        return (f"unknown flag{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: neither capfilt bootstrap nor "
                "Beam knows it (capfilt bootstrap --help lists capfilt's)")
    return None


def download_settings_from_args(args):
    """img2dataset's and the fetcher's settings from the flags (a bad network or limit is a usage error)."""
    from capfilt.ingest.download import DownloadSettings

    try:
        return DownloadSettings(
            processes=args.processes, threads=args.threads, image_size=args.image_size,
            samples_per_shard=args.samples_per_shard, distributor=args.distributor,
            output_format=args.output_format, timeout=args.timeout, retries=args.retries,
            allow_private_addresses=args.allow_private_addresses, allow_networks=tuple(args.allow_network),
            max_body_bytes=args.max_body_bytes, total_seconds=args.total_timeout,
        )
    except ValueError as error:  # a bad --allow-network, --max-body-bytes or --total-timeout
        raise UsageError(str(error)) from None


def run_from_args(args, unknown: list[str]) -> BootstrapRun:
    """``capfilt bootstrap``'s flags as a ``BootstrapRun``; flags capfilt does not know are Beam options, and a
    flag Beam does not know either is a problem the pre-flight lists with the others (``preflight.check``)."""
    options = beam_options(unknown)
    flag_problem = unknown_flags(options, args.runner)
    try:
        settings = settings_from_args(args)
    except ValueError as error:  # no settings to run with: listed with the problems the flags and DATA show
        captioner, filter_ = recipe.default_models(args.data)
        problems = error.problems if isinstance(error, preflight.PreflightError) else [str(error)]
        models = ((args.captioner or captioner, args.captioner_tokenizer),
                  (args.filter or filter_, args.filter_tokenizer))
        try:
            columns = url_list.Columns(url=args.url_col, caption=args.caption_col, no_caption=args.no_caption)
            _, data = preflight.data_problems(args.data, args.cache_dir, columns, False if args.no_fetch else None)
        except ValueError as columns_error:  # --caption-col with --no-caption
            data = [str(columns_error)]
        raise preflight.PreflightError([*([flag_problem] if flag_problem else []), *problems,
                                        *preflight.role_problems(models), *data]) from None
    return BootstrapRun(
        data=args.data, out=str(args.out), settings=settings,
        download=download_settings_from_args(args),
        columns=url_list.Columns(url=args.url_col, caption=args.caption_col, no_caption=args.no_caption),
        keep_columns=tuple(c for c in args.keep_columns.split(",") if c), cache_dir=args.cache_dir,
        fetch=False if args.no_fetch else None,
        demo=datasets.DemoInput(args.demo_size, args.demo_seed, args.demo_shard_size),
        shards_dir=args.shards_dir, shards=args.shards, runner=args.runner,
        beam_options=tuple(options), workers=args.workers, report=not args.no_report,
        strict=args.strict, progress_interval=args.progress_interval,
        problems=(flag_problem,) if flag_problem else (),
    )

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
    """Run a delegated command's ``main(rest)``; its exit status, whether it returns or calls ``sys.exit``.

    Ctrl-C or SIGTERM that the command does not handle itself ends it with one line and 130 or 143 (the trainer
    saves a checkpoint first and says so itself), not a traceback.
    """
    try:
        with terminate_raises():
            module = importlib.import_module(DELEGATED[command])
            code = module.main(list(rest))
    except SystemExit as exit_:
        code = exit_.code
    except (KeyboardInterrupt, Terminated) as signal:
        return stopped_by(signal, f"capfilt {command} stopped; what it finished is kept (rerun the same command to "
                                  "do the rest)")
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
        print(named.describe_named(args.cache_dir))
        return 0
    try:
        with terminate_raises():  # SIGTERM as an exception: the download's processes are stopped on the way out
            if args.command == "refilter":
                return refilter(refilter_parser().parse_args(rest))
            boot_args, unknown = bootstrap_parser().parse_known_args(rest)
            boot_args.verbose = args.verbose
            _quiet_model_loading()
            job = run_from_args(boot_args, unknown)
            return recipe.run(job, preflight.check(job))  # every check that can fail before the job, at once
    except (UsageError, ValueError, FileNotFoundError) as error:  # bad input: a message, not a traceback
        if args.verbose:
            raise
        print(f"capfilt: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, Terminated) as signal:
        if args.command == "refilter":
            return stopped_by(signal, "finished shards of the new split are kept; rerun the same command to resume")
        return stopped_by(signal, "finished shards and downloads are kept; rerun the same command to resume")


def stopped_by(signal: BaseException, what: str) -> int:
    """One line for a job stopped by Ctrl-C or SIGTERM, and the shell's status for it (130, 143)."""
    name, status = ("SIGINT", EXIT_SIGINT) if isinstance(signal, KeyboardInterrupt) else ("SIGTERM", EXIT_SIGTERM)
    say(f"stopped by {name}: {what}")
    return status


if __name__ == "__main__":
    sys.exit(main())
