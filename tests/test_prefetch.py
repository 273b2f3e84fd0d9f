"""``ordered_map``: the pipeline's decoding ahead of the models, in order and bounded."""

from __future__ import annotations

import threading
import time

import pytest

from capfilt.pipelines.prefetch import ordered_map


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_results_come_in_input_order(threads):
    def slow_square(x):
        time.sleep(0.002 * ((7 * x) % 5))  # later items often finish first
        return x * x

    assert list(ordered_map(slow_square, range(40), threads=threads, ahead=8)) == [(x, x * x) for x in range(40)]


def test_at_most_ahead_items_are_taken_before_the_consumer_asks():
    taken = []

    def items():
        for x in range(100):
            taken.append(x)
            yield x

    stream = ordered_map(lambda x: x, items(), threads=2, ahead=5)
    assert next(stream) == (0, 0)
    assert len(taken) == 5  # not the whole shard
    stream.close()


def test_an_error_is_raised_at_its_items_turn_and_the_pool_stops():
    running = threading.Event()

    def fail_on_three(x):
        running.set()
        if x == 3:
            raise ValueError("bad item 3")
        return x

    seen = []
    with pytest.raises(ValueError, match="bad item 3"):
        for x, _ in ordered_map(fail_on_three, range(10), threads=2, ahead=4):
            seen.append(x)
    assert seen == [0, 1, 2]
    assert not [t for t in threading.enumerate() if t.name.startswith("capfilt-decode")]
