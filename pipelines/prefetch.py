"""Work ahead of the models: a function over a stream, in a pool of threads, results in input order.

The pipeline decodes and resizes images here while the models run on the previous batch, so that an
accelerator does not wait for PIL (which releases the GIL while it decodes and resamples). At most
``ahead`` items are in flight or done before the consumer takes them: what is held does not grow with
the shard.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(fn: Callable[[Item], Result], items: Iterable[Item], threads: int,
                ahead: int) -> Iterator[tuple[Item, Result]]:
    """``(item, fn(item))`` for each item, in order; ``fn`` runs in ``threads`` threads (0: in the caller's).

    An exception raised by ``fn`` is raised here, when its item's turn comes.
    """
    if threads <= 0:
        for item in items:
            yield item, fn(item)
        return
    ahead = max(ahead, threads)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="capfilt-decode")
    pending: deque[tuple[Item, Future]] = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= ahead:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # the consumer stopped early: drop what it will not take
