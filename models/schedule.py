"""The learning rate and ITC's soft-target weight of a step: pure functions of the step counters, so a resumed
run needs no state for them (the original's ``utils.py``: ``warmup_lr_schedule``, ``step_lr_schedule``,
``cosine_lr_schedule``)."""

from __future__ import annotations

import math

from capfilt.models.config import OptimConfig


def learning_rate(optim: OptimConfig, epoch: int, step_in_epoch: int) -> float:
    """The lr of a step: linear warm-up in epoch 0 then ``lr * lr_decay**epoch`` ("step"), or a per-epoch cosine."""
    if optim.schedule == "step":
        if epoch == 0 and step_in_epoch < optim.warmup_steps:
            return optim.warmup_lr + (optim.lr - optim.warmup_lr) * step_in_epoch / optim.warmup_steps
        return max(optim.min_lr, optim.lr * optim.lr_decay ** epoch)
    if optim.schedule == "cosine":
        return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / optim.epochs))
    raise ValueError(f"unknown lr schedule {optim.schedule!r}; choose 'step' or 'cosine'")


def itc_alpha(optim: OptimConfig, epoch: int, step_in_epoch: int, first_epoch_steps: int) -> float:
    """ITC's soft-target weight, ramped up linearly over the first epoch as in BLIP's training scripts."""
    return optim.alpha * (min(1.0, step_in_epoch / first_epoch_steps) if epoch == 0 else 1.0)
