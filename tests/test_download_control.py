"""The download stage under an operator's accidents: signals, two jobs on one OUT, downloads that finish in any order.

Every server is on 127.0.0.1 and answers a bounded number of requests; every wait is bounded. The signal tests run
``capfilt bootstrap`` as a separate process in a session of its own (as a terminal's foreground job is), send the
signal to that session's group, and look for left-over processes by an environment variable that only the run's
processes carry.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt import cli
from capfilt.recipes import bootstrap as recipe
from loopback import Handler, LoopbackHTTP, keep_proxies_away

URLS = 12
PER_SHARD = 3
MARKER = "CAPFILT_TEST_RUN"  # set in the environment of one run: its processes are found by it


def jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class Images(LoopbackHTTP):
    """127.0.0.1: ``/img/{i}.jpg``, each answered after ``delay(path)`` seconds; logs each request's path."""

    def __init__(self):
        self.delays: dict[str, float] = {}
        self.requests: list[str] = []
        bodies = {f"/img/{i}.jpg": jpeg(i) for i in range(URLS)}
        server = self

        class Slow(Handler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                server.requests.append(self.path)
                time.sleep(min(server.delays.get(self.path, 0.0), 5.0))
                if self.path in bodies:
                    self.answer(200, "image/jpeg", bodies[self.path])
                else:
                    self.send_error(404)

        super().__init__(Slow)

    def url_list(self, folder: Path) -> Path:
        path = folder / "list.tsv"
        path.write_text("url\tcaption\n" + "".join(f"{self.url}/img/{i}.jpg\tpicture {i}\n" for i in range(URLS)))
        return path


@pytest.fixture
def images(monkeypatch):
    keep_proxies_away(monkeypatch)
    with Images() as server:
        yield server


def bootstrap_args(url_list: Path, out: Path, captioner_folder, filter_folder) -> list[str]:
    return ["bootstrap", "--data", str(url_list), "--out", str(out), "--allow-private-addresses",
            "--captioner", str(captioner_folder), "--filter", str(filter_folder), "--processes", "1",
            "--threads", "3", "--samples-per-shard", str(PER_SHARD), "--timeout", "10", "--batch-size", "2",
            "--torch-threads", "1", "--progress-interval", "60"]


def content(out: Path) -> dict[str, list[dict]]:
    """Every output row of kept/, rejected/ and failed/, file by file in order, all columns."""
    return {kind: [row for path in sorted((out / kind).glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
            for kind in ("kept", "rejected", "failed")}


def start(args: list[str], marker: str) -> subprocess.Popen:
    env = {**os.environ, MARKER: marker, "HF_HUB_OFFLINE": "1", "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
    return subprocess.Popen([sys.executable, "-m", "capfilt.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def processes_with(marker: str) -> list[int]:
    """The live processes whose environment holds ``MARKER=marker``."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except (OSError, IndexError):
            continue
    return found


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.slow  # three whole runs, one of them a separate process: about a minute each signal
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds left-over processes through /proc")
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_download_stops_everything_exits_non_zero_and_the_rerun_equals_a_clean_run(
        signum, status, images, captioner_folder, filter_folder, tmp_path):
    url_list = images.url_list(tmp_path)
    out = tmp_path / "out"
    images.delays = {f"/img/{i}.jpg": 1.0 for i in range(URLS)}  # 12 URLs, 3 at a time: about 4 s of download
    marker = uuid.uuid4().hex
    job = start(bootstrap_args(url_list, out, captioner_folder, filter_folder), marker)
    try:
        assert wait_for(lambda: len(images.requests) >= 2, 60), job.communicate(timeout=5)[0]
        os.killpg(job.pid, signum)  # what a terminal's Ctrl-C (or a scheduler's kill of the job) does
        output, _ = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == status, output
    assert "rerun the same command to resume" in output.splitlines()[-1], output
    assert wait_for(lambda: not processes_with(marker), 10), processes_with(marker)  # no worker left behind
    seen = len(images.requests)
    time.sleep(1.5)
    assert len(images.requests) == seen  # and nothing goes on fetching
    assert not (out / "stats.json").exists()

    images.delays = {}
    assert cli.main(bootstrap_args(url_list, out, captioner_folder, filter_folder)) == 0  # resumes
    clean = tmp_path / "clean"
    assert cli.main(bootstrap_args(url_list, clean, captioner_folder, filter_folder)) == 0
    resumed, fresh = content(out), content(clean)
    assert sum(len(rows) for rows in fresh.values()) >= URLS
    assert resumed == fresh


def test_two_jobs_on_one_url_list_and_out_fetch_each_url_once(images, captioner_folder, filter_folder, tmp_path):
    url_list = images.url_list(tmp_path)
    out = tmp_path / "out"
    images.delays = {f"/img/{i}.jpg": 0.3 for i in range(URLS)}
    args = bootstrap_args(url_list, out, captioner_folder, filter_folder)
    jobs = [start(args, uuid.uuid4().hex) for _ in range(2)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    assert sorted(images.requests) == sorted(f"/img/{i}.jpg" for i in range(URLS))  # each URL once
    assert any("waiting for it to finish" in output for output in outputs), outputs
    rows = content(out)
    assert len({row["key"] for row in rows["kept"] + rows["rejected"]}) == URLS


def test_the_same_list_gives_the_same_output_however_downloads_are_timed(images, captioner_folder, filter_folder,
                                                                         tmp_path):
    url_list = images.url_list(tmp_path)
    runs = []
    for seed in (1, 2):
        order = list(range(URLS))
        random.Random(seed).shuffle(order)  # each run finishes its downloads in another order
        images.delays = {f"/img/{i}.jpg": 0.05 * rank for rank, i in enumerate(order)}
        out = tmp_path / f"run{seed}"
        assert cli.main(bootstrap_args(url_list, out, captioner_folder, filter_folder)) == 0
        runs.append(content(out))
    assert sum(len(rows) for rows in runs[0].values()) >= URLS
    assert runs[0] == runs[1]


def test_a_job_that_stops_in_the_pipeline_says_what_is_kept_and_how_to_go_on(monkeypatch, tmp_path, capsys):
    from capfilt.pipelines import report

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_summary", full_disk)
    out = tmp_path / "out"
    code = cli.main(["bootstrap", "--data", "demo", "--out", str(out), "--captioner", "demo", "--filter", "demo",
                     "--demo-size", "16", "--demo-shard-size", "8", "--torch-threads", "1",
                     "--progress-interval", "60"])
    assert code == recipe.EXIT_UNFINISHED
    lines = capsys.readouterr().err.strip().splitlines()
    assert "No space left on device" in lines[-2]
    assert lines[-1].endswith("2 of 2 shard(s) are done and kept in " + str(out)
                              + "; 0 unfinished: rerun the same command to resume them")


def test_downloaded_shards_are_rewritten_in_key_order_once(tmp_path):
    import pyarrow as pa

    from capfilt.ingest.download import sort_shards

    keys = ["0000000003", "0000000000", "0000000002", "0000000001"]
    pq.write_table(pa.table({"key": keys, "caption": [f"c{k[-1]}" for k in keys], "jpg": [k.encode() for k in keys]}),
                   tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text("{}")
    pq.write_table(pa.table({"key": ["0000010000", "0000010001"]}), tmp_path / "00001.parquet")
    (tmp_path / "00001_stats.json").write_text("{}")
    pq.write_table(pa.table({"key": ["b", "a"]}), tmp_path / "00002.parquet")  # still downloading: no stats yet
    assert sort_shards(tmp_path) == [tmp_path / "00000.parquet"]
    rows = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    assert [r["key"] for r in rows] == sorted(keys) and all(r["jpg"] == r["key"].encode() for r in rows)
    assert pq.read_table(tmp_path / "00002.parquet").column("key").to_pylist() == ["b", "a"]
    assert sort_shards(tmp_path) == []  # nothing left to sort
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000_stats.json", "00001.parquet",
                                                          "00001_stats.json", "00002.parquet"]


def test_a_signal_that_the_runner_wrapped_still_ends_the_command_as_that_signal():
    from capfilt.ingest.process_group import Terminated

    with pytest.raises(KeyboardInterrupt):
        recipe.interrupted(RuntimeError("KeyboardInterrupt [while running 'CaptionAndFilter']"))
    with pytest.raises(Terminated):
        recipe.interrupted(RuntimeError("Terminated [while running 'CaptionAndFilter']"))
    try:
        raise RuntimeError("a worker failed") from KeyboardInterrupt()
    except RuntimeError as wrapped:
        with pytest.raises(KeyboardInterrupt):
            recipe.interrupted(wrapped)
    recipe.interrupted(OSError(28, "No space left on device"))  # a real failure is the job's end, not a signal


@pytest.mark.slow  # a demo run in a separate process, stopped midway: about half a minute
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_models_run_exits_as_that_signal(signum, status, tmp_path):
    out = tmp_path / "out"
    job = start(["bootstrap", "--data", "demo", "--out", str(out), "--captioner", "demo", "--filter", "demo",
                 "--demo-size", "2000", "--demo-shard-size", "250", "--torch-threads", "1"], uuid.uuid4().hex)
    try:
        done = out / ".capfilt" / "done"
        assert wait_for(lambda: done.is_dir() and any(done.glob("*.json")), 120)
        os.killpg(job.pid, signum)
        output, _ = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == status, output
    assert "rerun the same command to resume" in output.strip().splitlines()[-1], output
