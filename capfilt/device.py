"""Where models run: CPU by default, CUDA with bf16 (or fp16) autocast when asked and present."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` means CPU (the default everywhere); ``"cuda"`` falls back to CPU with a warning when absent."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("CUDA was asked for but is not available; running on CPU")
        return torch.device("cpu")
    return device


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); full precision on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
