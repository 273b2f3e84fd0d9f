"""Beam's DaskRunner: the demo job on a local two-process Dask cluster writes what the local runner writes.

The cluster is capfilt's own (``capfilt.pipelines.dask_cluster.local_cluster``): worker processes on
127.0.0.1, started for a run and closed after it. Nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import psutil
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.dask.dask_runner import DaskOptions

from capfilt import cli
from capfilt.ingest import datasets
from capfilt.pipelines import bootstrap as bootstrap_pipeline
from capfilt.pipelines import dask_cluster
from capfilt.pipelines.bootstrap import pipeline_options
from capfilt.recipes import bootstrap as recipe
from capfilt.recipes.bootstrap import UsageError

# 48 pairs of the shapes world in 3 shards, judged by the shipped demo models.
DEMO = datasets.DemoInput(size=48, shard_size=16)
COLUMNS = {"kept": ("key", "text", "source", "source_index", "itm_score", "itc_score"),
           "rejected": ("key", "text", "source", "source_index", "itm_score", "itc_score"),
           "failed": ("key", "stage", "error")}
COUNTS = ("rows", "images", "failed", "kept", "rejected", "web_missing", "texts", "noise_ratio", "texts_before",
          "texts_after", "itm_histogram", "shards")


def rows(out, folder: str) -> list[tuple]:
    """A folder's rows on the columns that say what was judged, scores rounded to 1e-5, sorted."""
    table = pq.read_table(out / folder, columns=list(COLUMNS[folder]))
    return sorted(tuple(round(v, 5) if isinstance(v, float) else v for v in row.values())
                  for row in table.to_pylist())


def stats(out) -> dict:
    written = json.loads((out / "stats.json").read_text())
    return {name: written[name] for name in COUNTS}


def assert_same_output(local, dask) -> None:
    for folder in COLUMNS:
        assert rows(dask, folder) == rows(local, folder), folder
    assert stats(dask) == stats(local)


def _worker_view():
    import capfilt

    return os.environ.get("HF_HUB_OFFLINE"), capfilt.__file__


def listening_addresses(process: psutil.Process) -> set[str]:
    processes = [process, *process.children(recursive=True)]
    return {c.laddr.ip for p in processes for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}


@pytest.fixture
def watched_cluster(monkeypatch):
    """capfilt's local cluster, with what its workers see and where it listens recorded while it runs."""
    from distributed import Client

    seen = []
    local_cluster = dask_cluster.local_cluster

    @contextmanager
    def watched(workers):
        with local_cluster(workers) as address, Client(address) as client:
            seen.append({"address": address, "listening": listening_addresses(psutil.Process()),
                         "workers": list(client.run(_worker_view).values())})
            yield address

    monkeypatch.setattr(dask_cluster, "local_cluster", watched)
    return seen


@pytest.mark.slow
def test_dask_runner_writes_what_the_local_runner_writes(tmp_path, monkeypatch, watched_cluster):
    shards = tmp_path / "shards"
    recipe.prepare_demo(DEMO, shards)
    broken = shards / "00001.parquet"
    readable = broken.read_bytes()
    broken.write_bytes(b"not a parquet file")  # a damaged shard: recorded once as damaged, not retried

    def run(out, *runner):
        return cli.main(["bootstrap", "--out", str(out), "--shards-dir", str(shards), "--demo-size", str(DEMO.size),
                         "--demo-shard-size", str(DEMO.shard_size), "--torch-threads", "1", *runner])

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    environment = dict(os.environ)
    here = psutil.Process()
    children = set(here.children(recursive=True))
    local, dask = tmp_path / "local", tmp_path / "dask"
    assert run(local) == recipe.EXIT_DAMAGED
    assert run(dask, "--runner", "DaskRunner", "--workers", "2") == recipe.EXIT_DAMAGED
    assert_same_output(local, dask)
    assert [d["shard"] for d in stats(dask)["shards"]["damaged"]] == ["00001"]
    assert stats(dask)["shards"]["errors"] == []
    assert (dask / "report.html").is_file()

    # The shard replaced and its marker deleted, a rerun does it alone; the local runner resumes the Dask run's
    # output as its own.
    broken.write_bytes(readable)
    for out in (local, dask):
        (out / ".capfilt" / "done" / "00001.json").unlink()
    assert run(local) == 0 and run(dask) == 0
    assert_same_output(local, dask)
    assert stats(dask)["shards"] == {"selected": 3, "done": 3, "errors": [], "damaged": []}
    assert stats(dask)["rows"] == DEMO.size and len(rows(dask, "kept")) + len(rows(dask, "rejected")) == 2 * DEMO.size

    # The Dask run had its own cluster: on loopback only, two workers with this environment and this capfilt.
    (cluster,) = watched_cluster
    assert cluster["address"].startswith("tcp://127.0.0.1:") and cluster["listening"] == {"127.0.0.1"}
    assert cluster["workers"] == [("1", cli.__file__.replace("cli.py", "__init__.py"))] * 2
    started = set(here.children(recursive=True)) - children  # multiprocessing's resource tracker may stay
    assert not [p for p in started if "spawn_main" in " ".join(p.cmdline())]  # the workers are gone
    spawn_settings = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_",
                      "PYTHONHASHSEED")  # Dask's nannies set them here before spawning a worker: undone
    assert {name: os.environ.get(name) for name in spawn_settings} == {n: environment.get(n) for n in spawn_settings}


def test_beam_options_pass_through_as_opt_value_and_opt_equals_value():
    args, unknown = cli.build_parser().parse_known_args([
        "bootstrap", "--runner", "DaskRunner", "--dask_client_address", "tcp://scheduler:8786", "--workers", "2",
        "--experiments", "no_use_multiple_sdk_containers", "--streaming", "--project=P",
        "--dataflow_service_options", "worker_accelerator=type:nvidia-l4;count:1", "--dask_connection_timeout", "-1",
    ])
    options = cli.beam_options(unknown)
    assert options == [
        "--dask_client_address=tcp://scheduler:8786", "--experiments=no_use_multiple_sdk_containers", "--streaming",
        "--project=P", "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1",
        "--dask_connection_timeout=-1",
    ]
    assert args.workers == 2
    for stray in (["word"], ["--project=P", "word"], ["--project", "P", "word"]):
        with pytest.raises(UsageError, match="unexpected argument 'word'"):
            cli.beam_options(stray)

    # A named cluster is joined (its workers may not see this machine's models); without one capfilt starts one.
    assert dask_cluster.joins_cluster(options) and not bootstrap_pipeline.runs_locally(args.runner, options)
    assert not dask_cluster.joins_cluster(["--dask_npartitions=4"]) and bootstrap_pipeline.runs_locally(args.runner, [])
    beam = pipeline_options("DaskRunner", options)
    assert beam.view_as(StandardOptions).runner == dask_cluster.DASK_RUNNER
    assert beam.view_as(DaskOptions).address == "tcp://scheduler:8786"
    assert pipeline_options("FnApiRunner").view_as(StandardOptions).runner == "FnApiRunner"


def test_the_dask_runner_without_dask_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    assert cli.main(["bootstrap", "--out", str(tmp_path / "out"), "--runner", "DaskRunner"]) == 2
    assert "pip install 'capfilt[dask]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran
