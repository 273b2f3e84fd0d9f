"""The training loop: one for the three tasks of CapFilt (paper §3.3), every process of a torchrun job running it.

Each step trains on a global batch (this rank's slice of it), each epoch on what the streams hold until one runs
out; checkpoints every ``checkpoint_every`` steps and at the end, so that a run resumes exactly; after
fine-tuning, the captioner or filter is exported into the run folder. SIGINT (Ctrl-C) or SIGTERM stops the loop
after the step in progress, with a checkpoint of that step (``TrainingStopped``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from capfilt.models import distributed
from capfilt.models.checkpointing import save_checkpoint, step_folder
from capfilt.models.config import TASKS, TrainConfig
from capfilt.models.data import (
    EpochLoader, check_files, close_decoding_processes, find_files, longest_text, seed_for, steps_in_epoch,
    trim_padding,
)
from capfilt.models.export import SAMPLING_FILE
from capfilt.models.progress import ProgressLog, SkipCounts
from capfilt.models.run_files import run_files, too_little_data
from capfilt.models.run_setup import Run, prepare_run, sampling_file
from capfilt.models.schedule import itc_alpha, learning_rate

log = logging.getLogger("capfilt.train")
EXPORT_ROLE = {"finetune-captioner": "captioner", "finetune-filter": "filter"}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(BaseException):
    """SIGINT or SIGTERM stopped a run between two steps, after a checkpoint of the step it reached.

    A BaseException, as KeyboardInterrupt is: ``except Exception`` must not swallow it. ``status`` is the shell's
    status for the signal (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(signum, step, checkpoint)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.status = 128 + signum

    def __str__(self) -> str:
        return (f"stopped by {signal.Signals(self.signum).name} at step {self.step}: checkpoint {self.checkpoint} "
                "saved; rerun the same command to resume")


def train(config: TrainConfig) -> dict:
    """Run (or resume) ``config``; every process of a torchrun job calls this. Returns the last log record."""
    owns_group = not torch.distributed.is_initialized()
    world = distributed.init_world(config.device or None)
    try:
        return _train(config, world)
    finally:
        close_decoding_processes()
        if owns_group:
            distributed.close_world()


@dataclass
class _Loop:
    """A run in progress: what the loop reads, and what it carries from step to step."""

    config: TrainConfig
    world: distributed.World
    run: Run
    out: Path
    files: list[str]
    streams: int
    first_epoch_steps: int
    progress: ProgressLog
    skips: SkipCounts
    started: float = field(default_factory=time.monotonic)
    out_of_time: bool = False
    signalled: int | None = None  # the signal this process received (set by the handler, read after each step)
    stop_signal: int | None = None  # the signal every rank stops for, agreed after a step
    saved_step: int = -1  # the step of the newest checkpoint written or resumed from (-1: none)
    record: dict | None = None  # the last log record
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    lr: float = 0.0
    alpha: float = 0.0

    def done(self) -> bool:
        optim = self.config.optim
        return ((bool(optim.max_steps) and self.run.state.step >= optim.max_steps) or self.out_of_time
                or self.stop_signal is not None)

    def checkpoint(self) -> Path:
        self.skips.flush()
        folder = save_checkpoint(self.out, self.run.med, self.run.optimizer, self.run.state, self.run.info,
                                 self.config.keep_checkpoints)
        self.saved_step = self.run.state.step
        return folder


def _train(config: TrainConfig, world: distributed.World) -> dict:
    loop = _start(config, world)
    loop.run.model.train()
    log.info("training from step %d: %d steps in all, a log line every %d steps (and at the first ones)",
             loop.run.state.step, loop.progress.total, loop.progress.every)
    with _signals_stop_the_loop(loop):
        while loop.run.state.epoch < config.optim.epochs and not loop.done():
            _epoch(loop)
    if loop.stop_signal is not None:
        _stop(loop)
    return _finish(loop)


@contextlib.contextmanager
def _signals_stop_the_loop(loop: _Loop):
    """While inside, SIGINT and SIGTERM only mark ``loop.signalled``; the loop reads it after each step, so that
    the checkpoint it then writes is of a whole step. Repeated signals change nothing (torchrun passes a terminal's
    Ctrl-C on to workers that got it already). Outside the main thread signals cannot be caught: nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if loop.signalled is None:
            loop.signalled = signum

    earlier = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, previous in earlier.items():
            signal.signal(signum, previous)


def _stop(loop: _Loop) -> None:
    """After a signal: the last step's log record and a checkpoint of it (unless one exists), then
    ``TrainingStopped``, without the export of a finished run."""
    state = loop.run.state
    if loop.losses and state.step % loop.progress.every:
        loop.skips.flush()
        loop.progress.update(state, loop.losses, loop.lr, loop.alpha, force=True)
    folder = loop.checkpoint() if loop.saved_step != state.step else step_folder(loop.out, state.step)
    distributed.barrier()
    raise TrainingStopped(loop.stop_signal, state.step, folder)


def _start(config: TrainConfig, world: distributed.World) -> _Loop:
    """Check the configuration and the data, then build the run (``prepare_run``) and what its loop reports to."""
    streams = config.data.streams or world.size
    check_config(config, streams, world)
    out, found = Path(config.out), find_files(config.data.data)
    # Every footer is read before the run folder is touched: an unreadable file stops the run here, named,
    # unless --skip-bad-files leaves it out.
    counts, unreadable = check_files(found, config.data.skip_bad_files)
    run = prepare_run(config, world, out)
    files = run_files(found, counts, unreadable, run.state, run.resumed, world.is_main)
    if not files:
        raise ValueError(f"none of the {len(found)} Parquet file(s) of {list(config.data.data)} can be read")
    first_epoch_steps = steps_in_epoch(files, config.data, streams, 0, config.seed, counts)
    if first_epoch_steps < 1:
        raise ValueError(too_little_data(files, counts, config, streams))
    optim = config.optim
    progress = ProgressLog(out / "log.jsonl", config.log_every, optim.max_steps or first_epoch_steps * optim.epochs,
                           config.data.batch_size, world.is_main, optim.max_seconds, config.data.skip_bad_files)
    skips = SkipCounts(run.state, world.device, config.data.skip_bad_files)
    return _Loop(config, world, run, out, files, streams, first_epoch_steps, progress, skips,
                 saved_step=run.state.step if run.resumed else -1)


def _epoch(loop: _Loop) -> None:
    """Train on the current epoch from where its streams stand, until one runs out or the run is done."""
    config, state, world = loop.config, loop.run.state, loop.world
    loader = EpochLoader(loop.files, config.data, loop.run.tokenizer, loop.run.blip_config.vision_config.image_size,
                         config.augment, seed=config.seed, epoch=state.epoch, streams=loop.streams, rank=world.rank,
                         world_size=world.size, positions=state.positions)
    try:
        for batch in _together(loader, world.device):
            _train_on(loop, batch)
            if loop.done():
                break
    finally:
        loader.close()
    if not loop.done():
        if loader.finished:  # told, not counted: what a stream meets as it runs out depends on the processes
            for item in loader.tail_skipped:
                log.warning("skipped %s, met as epoch %d ended (not in the counts)", item, state.epoch)
        state.epoch, state.step_in_epoch, state.positions = state.epoch + 1, 0, {}


def _train_on(loop: _Loop, batch) -> None:
    """One step on ``batch``, then what follows it: counters, skip counts, the time limit, the log, checkpoints."""
    config, state, optim = loop.config, loop.run.state, loop.config.optim
    loop.lr = learning_rate(optim, state.epoch, state.step_in_epoch)
    loop.alpha = itc_alpha(optim, state.epoch, state.step_in_epoch, loop.first_epoch_steps)
    loop.losses = _step(loop.run.model, loop.run.optimizer, batch, loop.lr, loop.alpha,
                        seed_for(config.seed, state.step), config, loop.world)
    state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
    state.positions = batch.positions
    loop.skips.add(batch.skipped)
    if state.step % loop.progress.every == 0:
        loop.skips.flush()
    if optim.max_seconds:  # every rank stops after the same step
        loop.out_of_time = not distributed.all_ranks_true(time.monotonic() - loop.started < optim.max_seconds,
                                                          loop.world.device)
    _agree_on_signals(loop)
    loop.record = loop.progress.update(state, loop.losses, loop.lr, loop.alpha) or loop.record
    if config.checkpoint_every and state.step % config.checkpoint_every == 0:
        loop.checkpoint()


def _agree_on_signals(loop: _Loop) -> None:
    """Whether any rank got a signal: then every rank stops after this step, for SIGINT if any rank got it (a
    terminal's Ctrl-C), else SIGTERM."""
    device = loop.world.device
    if distributed.all_ranks_true(loop.signalled is None, device):
        return
    got_sigint = not distributed.all_ranks_true(loop.signalled != signal.SIGINT, device)
    loop.stop_signal = signal.SIGINT if got_sigint else signal.SIGTERM


def _finish(loop: _Loop) -> dict:
    """The last log record and checkpoint, why the run stopped, the export; returns the last record and why."""
    config, state = loop.config, loop.run.state
    if loop.losses and state.step % config.log_every:
        loop.skips.flush()
        loop.record = loop.progress.update(state, loop.losses, loop.lr, loop.alpha, force=True)
    if config.checkpoint_every and loop.saved_step != state.step:
        loop.checkpoint()
    stopped, why = stop_reason(config, state.step, loop.out_of_time, loop.first_epoch_steps)
    log.info("%s", why)
    if config.export and config.task in EXPORT_ROLE and loop.world.is_main:
        _export(loop)
    distributed.barrier()
    return {**(loop.record or {}), "stopped": stopped, "stop_reason": why}


def _export(loop: _Loop) -> None:
    """The fine-tuned captioner or filter into the run folder, a captioner with the run's sampling defaults."""
    from capfilt.models.export import export

    role, out = EXPORT_ROLE[loop.config.task], loop.out
    sampling = out / SAMPLING_FILE if role == "captioner" and (out / SAMPLING_FILE).is_file() else None
    log.info("exported the %s to %s%s", role, export(loop.run.med, loop.run.tokenizer, role, out / role, sampling),
             f" with the sampling defaults of {sampling_file(loop.config)}" if sampling else "")


def stop_reason(config: TrainConfig, step: int, out_of_time: bool, first_epoch_steps: int) -> tuple[str, str]:
    """Why the run ended: ("max_steps" | "max_seconds" | "epochs", a sentence for the log)."""
    optim = config.optim
    if out_of_time:
        return "max_seconds", f"stopped at step {step}: the time limit (--max-seconds {optim.max_seconds:g}) passed"
    if optim.max_steps and step >= optim.max_steps:
        return "max_steps", f"stopped at step {step}: --max-steps {optim.max_steps} reached"
    why = (f"stopped at step {step}: the {optim.epochs} epoch(s) of --epochs ran out ({first_epoch_steps} steps in "
           f"epoch 0: an epoch ends when a stream runs out of pairs, at a global batch of {config.data.batch_size})")
    if optim.max_steps:
        needed = math.ceil(optim.max_steps / first_epoch_steps)
        why += (f"; --max-steps {optim.max_steps} was not reached: it needs about {needed} epochs, so pass "
                f"--epochs {needed} (or more data)")
    return "epochs", why


def check_config(config: TrainConfig, streams: int, world: distributed.World) -> None:
    """What a run needs before it touches anything: a task, a run folder, data, and sizes that divide evenly."""
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; choose one of {TASKS}")
    if not config.out:
        raise ValueError("no run folder: pass out= / --out")
    if not config.data.data:
        raise ValueError("no training data: pass data= / --data PARQUET_GLOB")
    batch = config.data.batch_size
    if batch % world.size or streams % world.size or batch % streams:
        raise ValueError(f"global batch {batch}, {streams} streams and {world.size} processes must divide evenly")
    if "itc" in config.med.losses and config.med.queue_size % batch:
        raise ValueError(f"queue size {config.med.queue_size} must be a multiple of the global batch {batch}")
    learning_rate(config.optim, 0, 0)  # validates the schedule's name
    if config.vision_position_init not in ("random", "sincos"):
        raise ValueError(f"vision_position_init must be 'random' or 'sincos', not {config.vision_position_init!r}")
    if config.data.negatives and "itm" not in config.med.losses:
        raise ValueError(f"negatives={config.data.negatives!r} feeds ITM, which task {config.task!r} does not train")


def _together(loader: EpochLoader, device: torch.device):
    """The loader's batches while every rank still has one (the epoch ends for all at once)."""
    iterator = iter(loader)
    while True:
        batch = next(iterator, None)
        if not distributed.all_ranks_true(batch is not None, device):
            return
        yield batch


def _autocast(config: TrainConfig, device: torch.device):
    if config.bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _step(model, optimizer, batch, lr: float, alpha: float, negatives_seed: int, config: TrainConfig,
          world: distributed.World) -> dict[str, torch.Tensor]:
    """One optimizer step on this rank's slice of a global batch; returns the detached losses."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    device = world.device
    batch = trim_padding(batch, distributed.max_over_ranks(longest_text(batch), device))
    with _autocast(config, device):
        losses = model(pixel_values=batch.pixel_values.to(device, non_blocking=True),
                       input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                       image_ids=batch.image_ids.to(device), alpha=alpha,
                       generator=torch.Generator().manual_seed(negatives_seed),
                       **({} if batch.has_negative is None else dict(
                           negative_ids=batch.negative_ids.to(device), negative_mask=batch.negative_mask.to(device),
                           has_negative=batch.has_negative.to(device))))
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()
    return {name: value.detach() for name, value in losses.items()}
