"""The Parquet files a run reads: those found, less what ``--skip-bad-files`` leaves out, the same on resume;
and the error for files that make no global batch."""

from __future__ import annotations

import logging
import os

from capfilt.models.checkpointing import TrainState
from capfilt.models.config import TrainConfig
from capfilt.models.data import Skipped, epoch_streams

log = logging.getLogger("capfilt.train")


def run_files(found: list[str], counts: dict[str, int], unreadable: list[Skipped], state: TrainState,
              resumed: bool, is_main: bool) -> list[str]:
    """The files this run reads: ``found`` less what is left out as unreadable (``check_files``' ``unreadable``,
    which only --skip-bad-files leaves non-empty).

    A new run leaves out the files whose footer does not read and records them in its state (so in every
    checkpoint). A resumed run leaves out exactly the files its checkpoint records: which files each stream
    reads, and so what its position means, stays the run's from its start, and the steps per epoch stay the
    same. Such a file that reads again stays out (train on it in a new run); a file the run has been reading that
    no longer reads stays in its stream's list with 0 rows and is skipped where its stream reaches it.
    """
    if not resumed:
        if is_main:
            for item in unreadable:
                log.warning("left out %s", item)
        state.left_out = [os.path.abspath(item.path) for item in unreadable]
        state.skipped["files"] += len(unreadable)
        bad = {item.path for item in unreadable}
        return [path for path in found if path not in bad]
    recorded = set(state.left_out)
    files = [path for path in found if os.path.abspath(path) not in recorded]
    for path in found:
        if is_main and os.path.abspath(path) in recorded and path in counts:
            log.warning("%s reads now but stays left out, as the run that wrote the checkpoint left it out "
                        "(start a new run to train on it)", path)
    for item in unreadable:
        if os.path.abspath(item.path) in recorded:
            if is_main:
                log.warning("left out %s, as since the run's start", item)
        else:
            counts[item.path] = 0
            if is_main:
                log.warning("%s no longer reads (%s); this run has been reading it, so it stays in its stream "
                            "and is skipped where the stream reaches it", item.path, item.error)
    return files


def too_little_data(files: list[str], counts: dict[str, int], config: TrainConfig, streams: int) -> str:
    """The error for data that makes no global batch: what was found, what a batch needs, what to pass."""
    batch, rows = config.data.batch_size, sum(counts.get(path, 0) for path in files)
    stream_rows = [sum(counts.get(path, 0) for path in group)
                   for group in epoch_streams(files, streams, 0, config.seed, config.data.shuffle)]
    text = (f"too little data for one step: {len(files)} file(s) hold {rows} pair(s) with an image, and a global batch "
            f"is {batch} pairs (--batch-size)")
    if streams > 1:
        text += (f", {batch // streams} from each of {streams} streams, whose files hold {min(stream_rows)} to "
                 f"{max(stream_rows)} pairs")
    largest = min(stream_rows) * streams
    if not largest:
        return text + f". A stream has no data: pass fewer --streams (at most {len(files)}, one file each) or more data"
    text += f". Pass a smaller --batch-size (at most {largest}"
    if "itc" in config.med.losses:
        text += f"; the ITC queue, --queue-size {config.med.queue_size}, must stay a multiple of it"
    return text + ") or more data (--data takes several files, folders or globs)"
