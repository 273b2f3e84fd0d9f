"""Console progress of a running job, in images, read from the completion markers and the running shards' progress
files.

It watches the output folder, not the runner, so it reports the same way
for the DirectRunner in this process, for several local worker processes and
for a remote runner writing to a bucket: shards done, images read in this run
(of about how many), images per second and an ETA. Images of shards still
running count from their attempts' progress files (``.capfilt/tmp/{run}/*/progress.json``,
written by ``capfilt.pipelines.process`` after a shard's first batch and then
every few seconds, with the rows read so far and the shard's size where
img2dataset recorded it), so a job of one large shard shows its rate and ETA
from its first batch on.

The ETA is the images left over the rate of this run so far. Images left: the
selected shards' sizes (a finished shard's rows, a running shard's recorded
size; a shard of unknown size counts as the mean of the known ones) less the
images done. On a terminal the line is a tqdm bar redrawn every few seconds;
elsewhere (a log file, a pipe) a plain line every ``interval`` seconds, and a
last one when the job ends.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import timedelta

from apache_beam.io.filesystems import FileSystems

from capfilt.pipelines.layout import OutputLayout

TERMINAL_REFRESH_S = 2.0  # seconds between redraws of the bar on a terminal (at most --progress-interval)


class Progress:
    """``with Progress(layout, shard_ids): run()`` shows progress while ``run`` works.

    ``bar``: a tqdm bar (True), plain lines (False), or a bar when ``stream`` is a terminal (None, the default).
    """

    def __init__(self, layout: OutputLayout, shard_ids: list[str], interval: float = 10.0, stream=None,
                 bar: bool | None = None):
        self.layout, self.interval = layout, interval
        self.stream = stream or sys.stderr
        self.use_bar = _is_terminal(self.stream) if bar is None else bar
        self.shard_ids = set(shard_ids)
        self.before = self.layout.done_ids() & self.shard_ids  # finished by earlier runs
        self.counted: set[str] = set()  # shards finished in this run, their markers read
        self._before_read: set[str] = set()  # shards finished by earlier runs, their markers read
        self.sizes: dict[str, int] = {}  # shard -> its rows: a finished shard's, or a running one's recorded size
        self.images = 0  # input rows of the shards finished in this run
        self.images_before = 0  # input rows of the shards finished by earlier runs
        self.in_flight = 0  # rows read so far by the shards still running
        self.stale = set(self.layout.progress_files())  # left by killed earlier attempts: never counted
        self._last_read: dict[str, dict] = {}  # each progress file's last good read (a rewrite may be caught midway)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="capfilt-progress", daemon=True)
        self._bar = None

    def __enter__(self):
        self.start = time.monotonic()
        self.update()
        self.print(f"{len(self.shard_ids)} shard(s), {len(self.before)} already done")
        if self.use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_this_run(), desc="[capfilt]", unit="img", file=self.stream,
                             dynamic_ncols=True, leave=False, mininterval=0)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.update()
        self.in_flight = 0  # the job is over: a shard that did not finish did not judge its rows
        if self._bar is not None:
            self._bar.close()
        self.print(self.line())

    def _loop(self):
        every = min(self.interval, TERMINAL_REFRESH_S) if self._bar is not None else self.interval
        while not self._stop.wait(every):
            self.update()
            if self._bar is not None:
                self._draw()
            else:
                self.print(self.line())

    def _draw(self) -> None:
        total = self.total_this_run()
        self._bar.total = total
        self._bar.n = min(self.images + self.in_flight, total) if total is not None else self.images + self.in_flight
        done = len(self.before) + len(self.counted)
        self._bar.set_postfix_str(f"shards {done}/{len(self.shard_ids)}, ETA {self.eta()}", refresh=False)
        self._bar.refresh()

    def update(self) -> None:
        """Read the markers that appeared since the last update, then the running shards' progress files."""
        for shard_id in sorted((self.layout.done_ids() & self.shard_ids) - self.counted - self._before_read):
            try:
                with FileSystems.open(self.layout.marker(shard_id)) as f:
                    rows = int(json.loads(f.read())["rows"])
            except Exception:  # noqa: BLE001 - being written (on any filesystem): counted at the next update
                continue
            self.sizes[shard_id] = rows
            if shard_id in self.before:
                self.images_before += rows
                self._before_read.add(shard_id)
            else:
                self.images += rows
                self.counted.add(shard_id)
        running: dict[str, int] = {}
        for path, shard_id in self.layout.progress_files().items():
            if path in self.stale or shard_id not in self.shard_ids or shard_id in self.counted | self.before:
                continue
            try:
                with FileSystems.open(path) as f:
                    self._last_read[path] = json.loads(f.read())
            except Exception:  # noqa: BLE001 - being rewritten, or committed and gone (on any filesystem)
                pass
            record = self._last_read.get(path, {})
            rows = int(record.get("rows", 0))
            if isinstance(record.get("total"), int) and shard_id not in self.sizes:
                self.sizes[shard_id] = record["total"]
            running[shard_id] = max(rows, running.get(shard_id, 0))  # a retried shard: its furthest attempt
        self.in_flight = sum(running.values())

    def total_this_run(self) -> int | None:
        """About how many images this run reads: the selected shards' sizes (estimated where unknown) less the
        shards finished before it; None while no shard's size is known."""
        if not self.sizes:
            return None
        known = [self.sizes[s] for s in self.shard_ids if s in self.sizes]
        mean = sum(known) / len(known)
        unknown = len(self.shard_ids) - len(known)
        return max(0, round(sum(known) + mean * unknown) - self.images_before)

    def eta(self) -> str:
        """The time left at this run's rate so far: "–" until an image is counted or while no size is known."""
        done = len(self.before) + len(self.counted)
        if done == len(self.shard_ids):
            return "0:00:00"
        images, total = self.images + self.in_flight, self.total_this_run()
        if not images or total is None:
            return "–"
        rate = images / max(time.monotonic() - self.start, 1e-9)
        return str(timedelta(seconds=round(max(0, total - images) / rate)))

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        done = len(self.before) + len(self.counted)
        images = self.images + self.in_flight
        total = self.total_this_run()
        of = ""
        if total:
            exact = len(self.sizes) == len(self.shard_ids)
            of = f" of {'' if exact else '~'}{total} ({100 * min(images / total, 1):.0f}%)"
        return (f"shards {done}/{len(self.shard_ids)} | {images} images this run{of} | {images / elapsed:.1f} "
                f"images/s | elapsed {timedelta(seconds=round(elapsed))} | ETA {self.eta()}")

    def print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(f"[capfilt] {text}", file=self.stream)
        else:
            print(f"[capfilt] {text}", file=self.stream, flush=True)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream: plain lines
        return False
