"""The CapFilt Beam pipeline: input shards in, kept/rejected/failed Parquet shards and a report out.

It reads as what it does::

    shards | 'SkipFinished' | 'SpreadShards' | 'CaptionAndFilter' | 'Summarize' | 'WriteStatsAndReport'

The element is an input *shard* (its path), not an image: one ``DoFn`` call
reads a shard, runs the captioner and the filter on it in fixed-size batches
and commits its three output files (``capfilt.pipelines.process``). Image
bytes therefore never cross a shuffle (the only shuffle, ``SpreadShards``,
moves shard paths so that a runner spreads them over its workers), and each
shard's output appears on its own with a completion marker instead of all at
the end of the job; a rerun skips finished shards. Models load once per
worker, in ``DoFn.setup`` (on Beam's DaskRunner, which calls ``setup`` per
shard, on a worker's first shard: ``capfilt.pipelines.dask_cluster``).

A shard that cannot be processed now (a storage error reading it, a model
that fails on every image, a shard still being downloaded) is reported, not
marked done: the job finishes the other shards and says which to rerun. Its
error goes down the same output as the other shards' stats (a dict with
``error``): Beam's DaskRunner does not tell a ParDo's tagged outputs apart.
A damaged input file is not such an error: what of it can be read is
processed and the shard is marked done and listed as damaged
(``capfilt.pipelines.shards``), since rereading the same bytes cannot help.

With ``--dedup-images``, the summary step first drops duplicate images across
all finished shards (``capfilt.pipelines.image_dedup``): no shard can know,
while it runs, what the others hold, so the cross-shard rule runs once they
are done, on one worker, rewriting only the shards it changes.

Each job writes its temporary files under its own ``.capfilt/tmp/{run}/`` and
removes only that folder at its end, so jobs on one output folder at the
same time do not break each other's shards (``capfilt.pipelines.layout``).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from contextlib import ExitStack

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from capfilt.pipelines import dask_cluster
from capfilt.pipelines.layout import OutputLayout
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import InputShard

log = logging.getLogger(__name__)

# The in-process engine DirectRunner falls back to; unlike DirectRunner (Beam 2.77) it never tries to fetch Prism.
DEFAULT_RUNNER = "FnApiRunner"
# Runners whose workers run on this machine and end with this process (see OutputLayout.start_run).
LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")


class CapFiltShard(beam.DoFn):
    """Caption and filter whole shards; emits each shard's stats, or its error (a dict with ``error``)."""

    def __init__(self, settings: BootstrapSettings, layout: OutputLayout):
        self.settings, self.layout = settings, layout
        self.models = None
        self._torch_threads = None
        self._kept_by_worker = False  # on a Dask worker: the models outlive this DoFn (dask_cluster.worker_models)

    def setup(self):
        import torch

        from capfilt.pipelines.worker_models import Models

        self._torch_threads = torch.get_num_threads()
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        # Beam's DaskRunner sets up a DoFn per shard: there the worker loads the models on its first shard
        # that is not done yet, and keeps them.
        self._kept_by_worker = dask_cluster.in_dask_worker()
        if not self._kept_by_worker:
            self.models = Models.load(self.settings)

    def teardown(self):
        import torch

        if self._torch_threads:  # the DirectRunner shares its process with the caller
            torch.set_num_threads(self._torch_threads)
        if self.models is not None:
            self.models.release()  # this worker's GPU slot, for the next worker on the node
        self.models = None

    def process(self, shard: InputShard):
        from capfilt.pipelines.process import process_shard

        if self.layout.is_done(shard.shard_id):  # finished meanwhile by another attempt
            return
        models = dask_cluster.worker_models(self.settings) if self._kept_by_worker else self.models
        try:
            stats = process_shard(shard, models, self.settings, self.layout)
        except Exception as error:  # noqa: BLE001 - reported per shard; the job goes on
            log.error("shard %s failed: %s", shard.shard_id, traceback.format_exc())
            yield {"shard": shard.shard_id, "input": shard.path, "error": f"{type(error).__name__}: {error}"}
            return
        yield {k: v for k, v in stats.items() if k != "samples"}  # the report reads the examples from the marker


def _unfinished(shard: InputShard, layout: OutputLayout) -> bool:
    return not layout.is_done(shard.shard_id)


def _write_stats_and_report(results: list[dict], layout: OutputLayout, settings: BootstrapSettings,
                            total_shards: int, report: bool) -> dict:
    from capfilt.pipelines.image_dedup import drop_duplicate_images
    from capfilt.pipelines.report import write_summary

    # A shard that failed here but was finished meanwhile by another job on the same OUT is not unfinished.
    errors = sorted((r for r in results if "error" in r and not layout.is_done(r["shard"])), key=lambda r: r["shard"])
    try:
        if settings.dedup_images:  # across every finished shard, also those of earlier runs and other jobs
            drop_duplicate_images(layout)
        return write_summary(layout, settings, total_shards, errors, report=report)
    finally:
        layout.end_run()  # this job's temporary files only: other jobs may be writing to the same OUT


def capfilt_transform(p_shards, settings: BootstrapSettings, layout: OutputLayout, total_shards: int,
                      report: bool = True):
    """Apply CapFilt to a PCollection of ``InputShard``s; returns the PCollection holding the run's stats."""
    return (
        p_shards
        | "SkipFinished" >> beam.Filter(_unfinished, layout)
        | "SpreadShards" >> beam.Reshuffle()
        | "CaptionAndFilter" >> beam.ParDo(CapFiltShard(settings, layout))
        | "Summarize" >> beam.combiners.ToList()
        | "WriteStatsAndReport" >> beam.Map(_write_stats_and_report, layout, settings, total_shards, report)
    )


def runs_locally(runner: str, beam_args: Sequence[str] = ()) -> bool:
    """Whether the job's workers run on this machine and end with this process: a local runner, or a Dask
    cluster started here (not one joined with ``--dask_client_address``). They then read this machine's paths."""
    if dask_cluster.is_dask(runner):
        return not dask_cluster.joins_cluster(beam_args)
    return runner in LOCAL_RUNNERS


def worker_arguments(runner: str, workers: int) -> list[str]:
    """The Beam options that give a local runner ``workers`` processes (the DaskRunner's are ``run``'s)."""
    if workers > 1 and runner in LOCAL_RUNNERS:
        return [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    return []


def claim_output(out: str, settings: BootstrapSettings) -> OutputLayout:
    """OUT bound to these settings (``OutputLayout.claim``): a folder of another run's settings is refused."""
    layout = OutputLayout(out)
    layout.claim(settings.provenance())
    return layout


def build_pipeline(pipeline: beam.Pipeline, shards: Sequence[InputShard], settings: BootstrapSettings,
                   out: str, report: bool = True, local: bool | None = None):
    """Add the whole CapFilt job over ``shards`` to ``pipeline``; returns the stats PCollection.

    ``local``: whether the job's workers run on this machine and end with this process (default: the runner is
    one of ``LOCAL_RUNNERS``); a later job removes a dead local job's temporary files, and only lists others'.
    """
    layout = claim_output(out, settings)
    layout.sweep_temp()
    layout = layout.start_run(local=type(pipeline.runner).__name__ in LOCAL_RUNNERS if local is None else local)
    p_shards = pipeline | "ListShards" >> beam.Create(list(shards))
    return capfilt_transform(p_shards, settings, layout, total_shards=len(shards), report=report)


def pipeline_options(runner: str = DEFAULT_RUNNER, beam_args: Sequence[str] = ()) -> PipelineOptions:
    """Beam options with the runner always explicit (Beam's own default would fetch a Prism binary).

    ``DaskRunner`` is given to Beam by its class path: Beam 2.77 does not resolve that name.
    """
    options = PipelineOptions(list(beam_args))
    options.view_as(StandardOptions).runner = dask_cluster.runner_path(runner)
    return options


def run(shards: Sequence[InputShard], settings: BootstrapSettings, out: str, runner: str = DEFAULT_RUNNER,
        beam_args: Sequence[str] = (), report: bool = True, workers: int = 1) -> None:
    """Run the job to the end (blocking).

    ``workers``: on the DaskRunner without ``--dask_client_address``, the worker processes of the local
    cluster started for this run and closed after it, also on error (the local runner's ``--workers`` are
    Beam options: ``worker_arguments``).
    """
    local = runs_locally(runner, beam_args)
    with ExitStack() as stack:
        if dask_cluster.is_dask(runner):
            beam_args = stack.enter_context(dask_cluster.dask_arguments(beam_args, workers, len(shards)))
        pipeline = beam.Pipeline(options=pipeline_options(runner, beam_args))
        build_pipeline(pipeline, shards, settings, out, report=report, local=local)
        result = pipeline.run()
        try:
            result.wait_until_finish()
        finally:
            dask_cluster.close_client(result)
