"""Console progress of a running job, read from the completion markers as they appear.

It watches the output folder, not the runner, so it reports the same way
for the DirectRunner in this process and for a remote runner writing to a
bucket: shards done, images judged, images per second and an ETA, one line
every ``interval`` seconds and a last one when the job ends.
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
        self.images = 0
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
        self.print(self.line())

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.update()
            self.print(self.line())

    def update(self) -> None:
        """Read the markers that appeared since the last update (their input rows count as images)."""
        for shard_id in sorted((self.layout.done_ids() & self.shard_ids) - self.before - self.counted):
            try:
                with FileSystems.open(self.layout.marker(shard_id)) as f:
                    self.images += json.loads(f.read())["rows"]
            except (OSError, ValueError, KeyError):
                continue  # being written: counted at the next update
            self.counted.add(shard_id)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        done = len(self.before) + len(self.counted)
        remaining = len(self.shard_ids) - done
        rate = self.images / elapsed
        eta = "–"
        if self.counted and remaining > 0:
            eta = str(timedelta(seconds=round(elapsed / len(self.counted) * remaining)))
        elif remaining == 0:
            eta = "0:00:00"
        return (f"shards {done}/{len(self.shard_ids)} | {self.images} images this run | {rate:.1f} images/s | "
                f"elapsed {timedelta(seconds=round(elapsed))} | ETA {eta}")

    def print(self, text: str) -> None:
        print(f"[capfilt] {text}", file=self.stream, flush=True)
