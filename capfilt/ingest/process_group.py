"""A job run in its own process group, so that stopping it stops every process it started.

img2dataset runs a pool of worker processes (and a logger process) that outlive their parent when the parent is
killed, and it installs a SIGINT handler that exits 0. So capfilt runs it as a child in a new session
(``start_new_session``: its own process group, which its workers join, and no terminal signals of its own):

- the child's target and arguments travel pickled on its standard input and it runs with this interpreter;
- Ctrl-C (SIGINT) or SIGTERM in capfilt reaches capfilt alone (``Terminated`` is SIGTERM as an exception:
  ``terminate_raises``); capfilt then sends SIGTERM to the whole group, waits ``STOP_GRACE_S``, sends SIGKILL
  to what is left, and re-raises, so the command exits 130 or 143 and nothing of the job runs on;
- a child that fails is ``ChildFailed`` with its exit status, never a silent success.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

STOP_GRACE_S = 5.0  # seconds between SIGTERM and SIGKILL to what is left of a stopped group
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # the shell's statuses: 130, 143
_CHILD = "from capfilt.ingest.process_group import _child_main; _child_main()"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (``terminate_raises``) so that ``finally`` blocks run.

    A BaseException, as KeyboardInterrupt is: ``except Exception`` must not swallow it.
    """


class ChildFailed(RuntimeError):
    """The child process ended with a non-zero status (its own messages went to stderr)."""


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` in the main thread while inside; the earlier handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    earlier = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, earlier)


def run_in_own_group(target: Callable, *args, pass_fds: tuple[int, ...] = ()) -> None:
    """``target(*args)`` in a child process in a process group of its own; returns when it succeeded.

    ``target`` and ``args`` must pickle (``target`` a module-level function). ``pass_fds`` stay open in the
    child (a lock held by the parent is then held until the last of them ends). On any exception while waiting
    (KeyboardInterrupt, ``Terminated``) the whole group is stopped before the exception goes on.
    """
    payload = pickle.dumps((target, args))
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, start_new_session=True,
                             pass_fds=pass_fds)
    try:
        child.stdin.write(payload)
        child.stdin.close()
        status = child.wait()
    except BaseException:
        stop_group(child)
        raise
    if status != 0:
        stop_group(child)  # its workers, if the leader died alone
        raise ChildFailed(f"exit status {status}" if status > 0 else f"killed by signal {-status}")


def stop_group(child: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to every process of ``child``'s group, SIGKILL after ``grace`` seconds to what is left; reaped."""
    group = child.pid  # the session leader's pid is its group's id
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(group, child):
        time.sleep(0.05)
    if _group_alive(group, child):
        _signal_group(group, signal.SIGKILL)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(group, child):
            time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=grace)


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


def _group_alive(group: int, child: subprocess.Popen) -> bool:
    """Whether a live (not zombie) process of ``group`` remains; the leader is reaped on the way."""
    child.poll()
    members = group_members(group)
    if members is None:  # no /proc: ask the kernel, zombies included
        try:
            os.killpg(group, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    return bool(members)


def group_members(group: int) -> list[int] | None:
    """The live (not zombie) processes of a process group, from /proc; None where there is no /proc."""
    if not os.path.isdir("/proc"):
        return None
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after the command name, which may hold spaces
        state, pgrp = fields[0], int(fields[2])
        if pgrp == group and state not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def _child_main() -> None:
    """The child's side: read the pickled call from stdin and make it; an exception exits 1 with its traceback."""
    target, args = pickle.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    target(*args)
