"""Console progress of a running job, read from the completion markers and the running shards' progress files.

It watches the output folder, not the runner, so it reports the same way
for the DirectRunner in this process and for a remote runner writing to a
bucket: shards done, images judged, images per second and an ETA, one line
every ``interval`` seconds and a last one when the job ends. Images of shards
still running count from their attempts' progress files (``_tmp/{run}/*/progress.json``,
rewritten every few seconds), so a job of a few large shards shows progress
before its first shard is done.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import timedelta

from apache_beam.io.filesystems import FileSystems

from capfilt.pipelines.layout import OutputLayout


class Progress:
    """``with Progress(layout, shard_ids): run()`` prints progress lines while ``run`` works."""

    def __init__(self, layout: OutputLayout, shard_ids: list[str], interval: float = 10.0, stream=None):
        self.layout, self.interval = layout, interval
        self.stream = stream or sys.stderr
        self.shard_ids = set(shard_ids)
        self.before = self.layout.done_ids() & self.shard_ids  # finished by earlier runs
        self.counted: set[str] = set()
        self.images = 0  # input rows of the shards finished in this run
        self.in_flight = 0  # rows read so far by the shards still running
        self.stale = set(self.layout.progress_files())  # left by killed earlier attempts: never counted
        self._last_read: dict[str, int] = {}  # each progress file's last good read (a rewrite may be caught midway)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="capfilt-progress", daemon=True)

    def __enter__(self):
        self.start = time.monotonic()
        self.print(f"{len(self.shard_ids)} shard(s), {len(self.before)} already done")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.update()
        self.in_flight = 0  # the job is over: a shard that did not finish did not judge its rows
        self.print(self.line())

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.update()
            self.print(self.line())

    def update(self) -> None:
        """Read the markers that appeared since the last update, then the running shards' progress files."""
        for shard_id in sorted((self.layout.done_ids() & self.shard_ids) - self.before - self.counted):
            try:
                with FileSystems.open(self.layout.marker(shard_id)) as f:
                    self.images += json.loads(f.read())["rows"]
            except Exception:  # noqa: BLE001 - being written (on any filesystem): counted at the next update
                continue
            self.counted.add(shard_id)
        running: dict[str, int] = {}
        for path, shard_id in self.layout.progress_files().items():
            if path in self.stale or shard_id not in self.shard_ids or shard_id in self.counted | self.before:
                continue
            try:
                with FileSystems.open(path) as f:
                    self._last_read[path] = int(json.loads(f.read())["rows"])
            except Exception:  # noqa: BLE001 - being rewritten, or committed and gone (on any filesystem)
                pass
            rows = self._last_read.get(path, 0)
            running[shard_id] = max(rows, running.get(shard_id, 0))  # a retried shard: its furthest attempt
        self.in_flight = sum(running.values())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        done = len(self.before) + len(self.counted)
        remaining = len(self.shard_ids) - done
        images = self.images + self.in_flight
        rate = images / elapsed
        eta = "–"
        if self.counted and remaining > 0:
            eta = str(timedelta(seconds=round(elapsed / len(self.counted) * remaining)))
        elif remaining == 0:
            eta = "0:00:00"
        return (f"shards {done}/{len(self.shard_ids)} | {images} images this run | {rate:.1f} images/s | "
                f"elapsed {timedelta(seconds=round(elapsed))} | ETA {eta}")

    def print(self, text: str) -> None:
        print(f"[capfilt] {text}", file=self.stream, flush=True)
