"""What a run reports: ``log.jsonl`` records and log lines every ``log_every`` steps, log lines at the first
steps and then at least every ``HEARTBEAT_S`` seconds, and what ``--skip-bad-files`` skipped, counted over all
ranks."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from capfilt.models import distributed
from capfilt.models.checkpointing import SKIP_COUNTS, TrainState, no_skips
from capfilt.models.data import Skipped

log = logging.getLogger("capfilt.train")
EARLY_STEPS = 3  # a process's first steps each get a log line: a new run shows at once that it trains, and how fast
HEARTBEAT_S = 30.0  # between the log_every lines, one at least this often (seconds), so a slow run is never silent


class ProgressLog:
    """Every ``every`` steps: losses averaged over ranks, a log line and a ``log.jsonl`` record (rank 0).

    Between them, rank 0 logs the first ``EARLY_STEPS`` steps of the process and then a line at least every
    ``HEARTBEAT_S`` seconds, with its own losses (no collective: ranks need not agree on when a clock runs out),
    its speed since its first step (which includes start-up) and the ETA. These lines go to the log only:
    ``log.jsonl`` keeps one record per ``every`` steps.
    """

    def __init__(self, path: Path, every: int, total_steps: int, batch_size: int, is_main: bool,
                 max_seconds: float = 0.0, report_skipped: bool = False):
        self.path, self.every, self.total, self.batch = path, max(every, 1), total_steps, batch_size
        self.max_seconds, self.report_skipped = max_seconds, report_skipped
        self.is_main = is_main
        self.last_time, self.last_step, self.start = time.perf_counter(), None, time.perf_counter()
        self.first_step: int | None = None  # the first step this process trains, and when it ended
        self.first_done = self.last_line = 0.0
        self.line_step = -1  # the step of the last line between the every steps' (a forced record's line repeats it)

    def update(self, state: TrainState, losses: dict[str, torch.Tensor], lr: float, alpha: float,
               force: bool = False) -> dict | None:
        if self.last_step is None:
            self.last_step = state.step - 1
        if self.first_step is None:
            self.first_step, self.first_done = state.step, time.perf_counter()
        if state.step % self.every and not force:
            self._between(state, losses, lr)
            return None
        names = sorted(losses)
        values = distributed.all_reduce_sum(torch.stack([losses[n].float() for n in names])) / distributed.world_size()
        now = time.perf_counter()
        steps_per_s = (state.step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, state.step
        record = {"step": state.step, "epoch": state.epoch, "lr": lr, "alpha": alpha,
                  **{f"loss_{n}": float(v) for n, v in zip(names, values)},
                  "steps_per_s": steps_per_s, "samples_per_s": steps_per_s * self.batch,
                  "elapsed_s": now - self.start, "eta_s": max(self.total - state.step, 0) / max(steps_per_s, 1e-9)}
        if self.max_seconds:  # a time-limited run ends at its limit at the latest
            record["eta_s"] = min(record["eta_s"], max(self.max_seconds - record["elapsed_s"], 0.0))
        if self.report_skipped:  # --skip-bad-files: what was left out so far (run totals, all ranks)
            record.update({f"skipped_{name}": state.skipped[name] for name in SKIP_COUNTS})
        if self.is_main:
            self._write(record, state, names, values, lr)
            self.last_line = now
        return record

    def _between(self, state: TrainState, losses: dict[str, torch.Tensor], lr: float) -> None:
        """A line between the ``every`` steps' (rank 0): at the first steps, then when ``HEARTBEAT_S`` passed."""
        now = time.perf_counter()
        trained = state.step - self.first_step + 1  # steps this process trained
        if not self.is_main or (trained > EARLY_STEPS and now - self.last_line < HEARTBEAT_S):
            return
        self.last_line, self.line_step = now, state.step
        losses_text = " ".join(f"{n} {float(losses[n]):.4f}" for n in sorted(losses))
        if distributed.world_size() > 1:
            losses_text += " (rank 0)"
        if trained == 1:  # one step's time includes start-up and warm-up: no ETA from it
            speed = f"first step done {now - self.start:.1f} s after the start"
        else:
            steps_per_s = (trained - 1) / max(now - self.first_done, 1e-9)
            eta = max(self.total - state.step, 0) / max(steps_per_s, 1e-9)
            if self.max_seconds:
                eta = min(eta, max(self.max_seconds - (now - self.start), 0.0))
            speed = f"{steps_per_s * self.batch:.1f} samples/s | eta {_duration(eta)}"
        log.info("step %d/%d epoch %d | %s | lr %.2e | %s", state.step, self.total, state.epoch, losses_text, lr,
                 speed)

    def _write(self, record: dict, state: TrainState, names: list[str], values: torch.Tensor, lr: float) -> None:
        """The record into log.jsonl and its line into the log (rank 0)."""
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if state.step == self.line_step:  # a run's last step, logged already as a line between
            return
        losses_text = " ".join(f"{n} {float(v):.4f}" for n, v in zip(names, values))
        eta_text = _duration(record["eta_s"])
        skipped_text = "" if not any(state.skipped.values()) else (
            " | skipped %(files)d file(s), %(row_groups)d row group(s), %(rows)d row(s)" % state.skipped)
        log.info("step %d/%d epoch %d | %s | lr %.2e | %.1f samples/s | eta %s%s", state.step, self.total,
                 state.epoch, losses_text, lr, record["samples_per_s"], eta_text, skipped_text)


def _duration(seconds: float) -> str:
    """H:MM:SS, or days past one."""
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} days"


def truncate_log(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a resumed run starts from)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


class SkipCounts:
    """What --skip-bad-files skipped: run totals over all ranks in ``state.skipped``, plus this rank's since.

    Each batch carries what its rows' reading skipped; it is logged and counted when the batch is trained on
    (not when prefetched), so the totals in a checkpoint are those of its step and a resume counts on from them,
    and the totals are the same with any number of processes reading the same streams. What a stream meets only
    as it runs out at an epoch's end is logged, not counted: whether it is met at all depends on how the streams
    are spread over processes (one process stops reading at the first stream that runs short).
    """

    def __init__(self, state: TrainState, device: torch.device, enabled: bool):
        self.state, self.device, self.enabled, self.pending = state, device, enabled, no_skips()

    def add(self, skipped: list[Skipped]) -> None:
        for item in skipped:
            log.warning("skipped %s", item)
            self.pending["files" if item.row_group is None else "row_groups"] += 1
            self.pending["rows"] += item.rows

    def flush(self) -> None:
        """Add every rank's pending counts to the totals; every rank calls this at the same steps."""
        if not self.enabled:  # nothing is ever skipped: unreadable data is an error
            return
        counts = [self.pending[name] for name in SKIP_COUNTS]
        if distributed.world_size() > 1:
            counts = distributed.all_reduce_sum(torch.tensor(counts, device=self.device)).tolist()
        for name, count in zip(SKIP_COUNTS, counts):
            self.state.skipped[name] += int(count)
        self.pending = no_skips()
