"""Beam's DaskRunner for capfilt: its short name, the local cluster it runs on, and models kept per Dask worker.

How Beam 2.77's DaskRunner (``apache_beam/runners/dask``) runs a job, and what capfilt does about it:

- it is not among Beam's known runner names, so ``--runner DaskRunner`` alone fails to resolve: capfilt maps
  the name to its class path (``runner_path``);
- given no scheduler it starts Dask's default ``LocalCluster`` (worker processes over all cores, a dashboard
  on :8787) and never closes the client it made: capfilt starts its own loopback cluster of ``--workers`` processes
  (``local_cluster``) and closes Beam's client after the job (``close_client``);
- every Beam bundle is a Dask partition, ``Reshuffle`` does nothing and ``Create`` puts up to 128 elements in
  one partition, so a job of fewer shards would run as one task on one worker: capfilt asks for one partition
  per shard (``dask_arguments``) and Dask's scheduler hands shards to free workers one at a time;
- ``DoFn.setup`` and ``teardown`` run around every partition, i.e. every shard: a Dask worker process loads the
  models on its first shard and keeps them for its next ones (``worker_models``) until the job ends;
- a ParDo's tagged outputs are not told apart (each tag gets the whole output), so the pipeline has one output.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
# Beam resolves runner names case-insensitively, with or without "Runner": so does capfilt for Dask.
DASK_NAMES = ("daskrunner", "dask")
INSTALL_HINT = "pip install 'capfilt[dask]' (make install does)"
# Options with which Beam's DaskRunner joins a running cluster instead of starting one.
CLUSTER_OPTIONS = ("--dask_client_address", "--dask_scheduler_file")
PARTITION_OPTIONS = ("--dask_npartitions", "--dask_partition_size")


def runner_path(runner: str) -> str:
    """The name Beam resolves: the DaskRunner's class path for ``DaskRunner``, any other runner as given."""
    return DASK_RUNNER if runner.lower() in DASK_NAMES else runner


def is_dask(runner: str) -> bool:
    return runner_path(runner) == DASK_RUNNER


def check_installed() -> None:
    """Raise an ``ImportError`` saying how to install the DaskRunner's packages when they are missing."""
    try:
        import dask.bag  # noqa: F401 - what Beam's DaskRunner builds the job from
        import distributed  # noqa: F401
    except ImportError as error:
        raise ImportError(f"the DaskRunner needs dask and distributed ({error}): {INSTALL_HINT}") from None


def given(beam_args: Sequence[str], names: Sequence[str]) -> bool:
    """Whether one of the options ``names`` is among ``beam_args``, as ``--opt=value`` or ``--opt value``."""
    return any(arg.split("=", 1)[0] in names for arg in beam_args)


def joins_cluster(beam_args: Sequence[str]) -> bool:
    """True when the options name a running Dask cluster; else capfilt starts a local one."""
    return given(beam_args, CLUSTER_OPTIONS)


@contextmanager
def local_cluster(workers: int) -> Iterator[str]:
    """A Dask cluster of ``workers`` single-threaded worker processes on 127.0.0.1; yields the scheduler address.

    Everything listens on 127.0.0.1 only: no scheduler dashboard, and the HTTP endpoints (health, metrics) that
    the scheduler and each worker always open on free loopback ports (by default the scheduler's is on 8787, and
    distributed 2024.4's workers put theirs on every interface; without bokeh they serve no dashboard pages).
    No memory limit: a worker holds two models and one shard, not Dask data, and Dask's per-worker share of RAM
    would only pause or restart it (the local runner has no limit either). Each worker gets cores / workers
    torch threads through OMP/MKL_NUM_THREADS, as a local runner's process would, instead of Dask's 1. The
    workers are spawned with this process's environment (HF_HUB_OFFLINE and the rest). Dask's own log lines
    (workers starting and stopping, a busy event loop, a heartbeat lost while the cluster closes) are left out
    unless capfilt logs at INFO (``-v``): a task's error reaches the job all the same, raised by Beam, and a
    shard's error is capfilt's.
    """
    import dask
    from distributed import LocalCluster

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = str(max(1, cores // workers))
    spawn_env = {**dask.config.get("distributed.nanny.pre-spawn-environ"),
                 "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    # Dask's nannies write these into this process's environment before spawning a worker: put them back after.
    saved = {name: os.environ.get(name) for name in (*spawn_env, "PYTHONHASHSEED")}
    quiet = not logging.getLogger().isEnabledFor(logging.INFO)
    dask_log = logging.getLogger("distributed")  # the scheduler and the nannies run in this process
    level = dask_log.level
    if quiet:
        dask_log.setLevel(logging.CRITICAL)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn_env}), LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                worker_dashboard_address="127.0.0.1:0",
                memory_limit=0, silence_logs=logging.CRITICAL if quiet else False) as cluster:
            yield cluster.scheduler_address
    finally:
        dask_log.setLevel(level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def dask_arguments(beam_args: Sequence[str], workers: int, shards: int) -> Iterator[list[str]]:
    """Beam options for a DaskRunner job over ``shards`` shards, inside a local cluster unless they name one.

    One partition per shard unless ``--dask_npartitions`` or ``--dask_partition_size`` is given.
    """
    check_installed()
    args = list(beam_args)
    if not given(args, PARTITION_OPTIONS):
        args.append(f"--dask_npartitions={max(1, shards)}")
    if joins_cluster(args):
        yield args
        return
    with local_cluster(workers) as address:
        yield [*args, f"--dask_client_address={address}"]


def in_dask_worker() -> bool:
    """Whether this code runs as a task of a Dask worker."""
    if "distributed" not in sys.modules:  # a Dask worker has imported it; nothing else here needs to
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


_KEPT: dict = {}  # this worker process's models: {"settings": repr of the run's settings, "models": Models}
_KEPT_LOCK = threading.Lock()  # a worker started with --nthreads > 1 loads them once all the same


def worker_models(settings):
    """This Dask worker's models for ``settings``: loaded on its first shard, then kept (a new run replaces them)."""
    from capfilt.pipelines.worker_models import Models

    key = repr(settings)
    with _KEPT_LOCK:
        if _KEPT.get("settings") != key:
            _release_kept()
            _KEPT.update(settings=key, models=Models.load(settings))
        return _KEPT["models"]


def release_worker_models() -> None:
    """Drop the kept models and give their GPU slot back; run on every worker when a job ends."""
    with _KEPT_LOCK:
        _release_kept()


def _release_kept() -> None:
    models = _KEPT.pop("models", None)
    _KEPT.clear()
    if models is None:
        return
    models.release()
    del models
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # the GPU memory back to the device, for whatever the cluster runs next


def close_client(result) -> None:
    """After a DaskRunner job: release the workers' models (a cluster may outlive the job), close Beam's client."""
    client = getattr(result, "client", None)  # Beam's DaskRunnerResult; other runners' results have none
    if client is None:
        return
    try:
        client.run(release_worker_models)
    except Exception as error:  # noqa: BLE001 - a lost worker has nothing left to release
        logging.getLogger(__name__).warning("could not release the Dask workers' models: %s", error)
    finally:
        client.close()
