"""Several jobs on one output folder: each removes only its own temporary files; a killed job's are swept."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest
from test_input_damage import accounted, check_judged, write_shard
from test_pipeline import ROWS_PER_SHARD, run_pipeline

from capfilt.pipelines import layout as layout_module
from capfilt.pipelines import process
from capfilt.pipelines.layout import OutputLayout
from capfilt.pipelines.worker_models import Models
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import list_shards
from capfilt.pipelines.report import read_stats


@pytest.fixture(scope="module")
def settings(captioner_folder, filter_folder):
    return BootstrapSettings(captioner=str(captioner_folder), filter=str(filter_folder), num_captions=1,
                             batch_size=3, threshold=0.5, seed=3, torch_threads=1, decode_threads=1)


@pytest.mark.parametrize("other_shard", [1, 0], ids=["disjoint shards", "the same shard"])
def test_a_job_ending_leaves_another_jobs_shard_in_flight_alone(settings, tmp_path, monkeypatch, other_shard):
    folder = tmp_path / "in"
    rows = {shard: write_shard(folder, shard) for shard in (0, 1)}
    shards = list_shards(folder)
    out = tmp_path / "out"
    OutputLayout(str(out)).claim(settings.provenance())
    other = OutputLayout(str(out)).start_run(local=True)  # job B, on another machine or in another process
    in_flight, release = threading.Event(), threading.Event()
    judge = process.ShardJob.judge

    def paused(self, batch, batch_index, writer):
        if self.layout.run == other.run and batch_index == 1:  # B has written a batch, and waits
            in_flight.set()
            assert release.wait(60)
        return judge(self, batch, batch_index, writer)

    monkeypatch.setattr(process.ShardJob, "judge", paused)
    results = {}
    job_b = threading.Thread(target=lambda: results.update(
        b=process.process_shard(shards[other_shard], Models.load(settings), settings, other)))
    job_b.start()
    try:
        assert in_flight.wait(60)
        temp_files = sorted(p for p in (out / ".capfilt" / "tmp" / other.run).rglob("*") if p.is_file())
        layout = run_pipeline(shards[:1], settings, out)  # job A: shard 0, start to end, while B is in flight
        assert all(p.exists() for p in temp_files)  # A removed its own temporary files only
    finally:
        release.set()
        job_b.join()
    assert results["b"]["rows"] == ROWS_PER_SHARD
    other.end_run()
    found = accounted(layout)
    for shard in {0, other_shard}:
        check_judged(found, rows[shard])
    assert len(found) == ROWS_PER_SHARD * len({0, other_shard})
    assert read_stats(layout)["shards"]["errors"] == []
    assert not (out / ".capfilt" / "tmp").exists()


def test_a_killed_local_jobs_leftovers_are_swept_and_other_jobs_listed(tmp_path, caplog):
    layout = OutputLayout(str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def job(name: str, **info):
        folder = tmp_path / ".capfilt" / "tmp" / name
        (folder / "00000-0123456789ab").mkdir(parents=True)
        (folder / "00000-0123456789ab" / "kept.parquet").write_bytes(b"partial")
        if info:
            (folder / "run.json").write_text(json.dumps(info))
        return folder

    killed = job("run-killed", host=socket.gethostname(), pid=dead.pid, local=True)
    elsewhere = job("run-elsewhere", host="another-machine", pid=dead.pid, local=True)
    remote = job("run-remote", host=socket.gethostname(), pid=dead.pid, local=False)  # e.g. Dataflow: runs on
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = job("run-running", host=socket.gethostname(), pid=alive.pid, local=True,
                      process_start=layout_module._process_start(alive.pid))  # another job of this host: alive
        own = layout.start_run(local=True)  # this process's own job (it holds OUT): neither swept nor listed
        unknown = job("run-unknown")  # no run.json
        assert set(layout.sweep_temp()) == {str(p) for p in (elsewhere, remote, unknown, running)}
        assert not killed.exists() and elsewhere.exists() and remote.exists() and unknown.exists() and running.exists()
        assert "delete them once those jobs are over" in caplog.text
        own.end_run()
        assert not (tmp_path / ".capfilt" / "tmp" / own.run).exists() and elsewhere.exists()
    finally:
        alive.kill()
        alive.wait()
