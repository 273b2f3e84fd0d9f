"""bootstrap's progress counts images, not shards: a real ``process_shard`` on the shipped demo models, read by
``Progress`` while the shard is still running (issue 31: a single large shard showed no rate or ETA until done)."""

from __future__ import annotations

import io
import json
import os
import re

import pytest

from capfilt.pipelines import process
from capfilt.pipelines.layout import OutputLayout, progress_path, write_text
from capfilt.pipelines.progress import Progress
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import list_shards
from capfilt.pipelines.worker_models import Models
from capfilt.shapes import write_split

ROWS, BATCH = 12, 4


@pytest.fixture(scope="module")
def demo_shard(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-web")
    write_split("web", ROWS, 3, folder, shard_size=ROWS)  # one shard, with img2dataset's _stats.json (its size)
    (shard,) = list_shards(str(folder))
    return shard


@pytest.fixture(scope="module")
def models_and_settings():
    settings = BootstrapSettings(captioner="demo", filter="demo", batch_size=BATCH, torch_threads=1)
    return Models.load(settings), settings


def test_images_are_counted_and_an_eta_shown_before_the_first_shard_is_done(demo_shard, models_and_settings,
                                                                            tmp_path, monkeypatch):
    models, settings = models_and_settings
    layout = OutputLayout(str(tmp_path / "out")).start_run(local=True)
    stream = io.StringIO()
    seen = []
    judge = process.ShardJob.judge

    def judge_then_look(job, batch, batch_index, writer):
        judge(job, batch, batch_index, writer)
        if batch_index == 1:  # two batches judged, the first one's progress written: the shard is half done
            progress.update()
            seen.append((progress.in_flight, progress.images, layout.is_done(demo_shard.shard_id), progress.line()))

    monkeypatch.setattr(process.ShardJob, "judge", judge_then_look)
    with Progress(layout, [demo_shard.shard_id], interval=3600, stream=stream, bar=False) as progress:
        marker = process.process_shard(demo_shard, models, settings, layout)
    (in_flight, finished, done, line) = seen[0]
    assert not done and finished == 0  # still running: no marker yet
    assert BATCH <= in_flight < ROWS  # but the rows of its first batch count
    assert f"shards 0/1 | {in_flight} images this run of {ROWS} " in line
    rate = float(re.search(r"\| ([0-9.]+) images/s", line).group(1))
    assert rate > 0
    eta = re.search(r"ETA (\S+)", line).group(1)
    assert re.fullmatch(r"\d+:\d\d:\d\d", eta), line  # a time, not "–"
    assert marker["rows"] == ROWS
    last = stream.getvalue().strip().splitlines()[-1]
    assert f"shards 1/1 | {ROWS} images this run of {ROWS} (100%)" in last and "ETA 0:00:00" in last
    assert layout.progress_files() == {}  # the committed attempt's progress file is gone


def test_the_progress_file_holds_the_rows_read_and_the_shards_size(demo_shard, models_and_settings, tmp_path,
                                                                   monkeypatch):
    models, settings = models_and_settings
    layout = OutputLayout(str(tmp_path / "out")).start_run(local=True)
    written = []
    write_text = process.write_text

    def spy(path, text):
        written.append(json.loads(text))
        write_text(path, text)

    monkeypatch.setattr(process, "write_text", spy)  # PROGRESS_EVERY_S as it is: the first batch writes at once
    process.process_shard(demo_shard, models, settings, layout)
    assert written[0] == {"rows": written[0]["rows"], "total": ROWS} and BATCH <= written[0]["rows"] < ROWS


def test_a_shard_of_unknown_size_counts_as_the_mean_of_the_known_ones(tmp_path):
    """Sizes: a finished shard's rows, a running shard's recorded total; the others are estimated."""
    layout = OutputLayout(str(tmp_path))
    job = layout.start_run(local=True)

    def attempt(shard_id: str, record: dict):
        folder = job.temp_dir(shard_id)
        os.makedirs(folder)
        write_text(progress_path(folder), json.dumps(record))

    with Progress(layout, ["00000", "00001", "00002", "00003"], interval=3600, stream=io.StringIO(),
                  bar=False) as progress:
        attempt("00001", {"rows": 30, "total": 300})
        attempt("00002", {"rows": 10, "total": None})  # no img2dataset count
        os.makedirs(os.path.dirname(layout.marker("00000")), exist_ok=True)
        write_text(layout.marker("00000"), json.dumps({"rows": 100}))
        progress.update()
        # known: 100 + 300; 00002 and 00003 unknown: the mean, 200 each
        assert progress.total_this_run() == 800
        assert "shards 1/4 | 140 images this run of ~800 (18%)" in progress.line()
