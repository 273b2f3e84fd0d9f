"""Progress on stderr for work that takes more than a few seconds: a tqdm bar on a terminal, plain lines elsewhere.

A log file or a pipe gets tqdm's own text as whole lines (at the start, at most every ``PLAIN_PROGRESS_S`` and at
the end), never carriage returns.
"""

from __future__ import annotations

import contextlib
import sys
import time

from tqdm import tqdm

PLAIN_PROGRESS_S = 10.0  # off a terminal, a stage's progress line at most this often (and at its start and end)
PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit}s, {percentage:.0f}% [{elapsed}<{remaining}, {rate_fmt}]"


@contextlib.contextmanager
def progress(total: int, what: str | None, unit: str = "pair"):
    """Yields ``advance(n)``, which counts ``n`` more of ``total`` done, shown on stderr: a tqdm bar on a terminal;
    elsewhere (a log file, a pipe) tqdm's same text as plain lines, no carriage returns. ``what`` None: nothing
    shown (a caller other than the command line)."""
    if what is None:
        yield lambda n: None
        return
    if sys.stderr.isatty():
        with tqdm(total=total, desc=what, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
            yield bar.update
        return
    start, done, shown = time.monotonic(), 0, -PLAIN_PROGRESS_S

    def show(now: float) -> None:
        nonlocal shown
        shown = now
        print(tqdm.format_meter(done, total, now - start, prefix=what, unit=unit, bar_format=PLAIN_FORMAT),
              file=sys.stderr, flush=True)

    def advance(n: int) -> None:
        nonlocal done
        done += n
        now = time.monotonic()
        if now - shown >= PLAIN_PROGRESS_S and done < total:
            show(now)

    show(start)
    yield advance
    show(time.monotonic())
