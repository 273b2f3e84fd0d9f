"""One writer at a time for a local folder: an advisory lock file beside it.

Two jobs that download the same URL list into one shards folder would both run img2dataset there: every URL
fetched twice, and one job failing on the other's temporary files. ``hold(lock_path)`` takes an exclusive
``flock`` on the lock file; a second job waits for it, saying who holds it (pid and host, written into the
file), and then finds the download finished. The kernel drops the lock when its last holder ends, even when
killed, so a lock is never stale; a child process that inherits the descriptor (``fd``) holds it too.
``flock`` locks are local to a machine (and to NFS clients that map them): folders on object stores are not
locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def hold(lock_path: str | os.PathLike, on_wait: Callable[[str], None] | None = None) -> Iterator[int]:
    """Hold the exclusive lock on ``lock_path`` (created if missing) inside; yields its file descriptor.

    When another process holds it, ``on_wait`` gets a sentence naming the holder, then this waits.
    """
    path = Path(lock_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(f"{path} is held by {_holder(fd)}: waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        yield fd
    finally:
        os.close(fd)  # releases the lock unless a child still holds the descriptor


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"process {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
