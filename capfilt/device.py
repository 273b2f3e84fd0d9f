"""Where models run and at which precision.

Device: ``auto`` (the default) is CUDA when present, else CPU; ``cuda`` falls back to CPU with a warning
when absent. Weights stay fp32; matrix products run under autocast in a lower precision where the
hardware has it natively (``precision="auto"``):

- CUDA: bf16 (fp16 on cards without bf16).
- CPU: bf16 where the CPU has native bf16 dot products (AVX512-BF16 or AMX); elsewhere fp32, since
  emulated bf16 is slower. ``bench/bench_throughput.py --precision auto|fp32`` measures the difference
  (docs/throughput.md).

``precision="fp32"`` turns autocast off (the reference for tests); ``"bf16"`` forces it.

On a node with several GPUs, each worker process takes a slot number (``claim_slot``) and the GPU of
that number modulo the GPU count (``worker_device``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from capfilt.precision import PRECISIONS

log = logging.getLogger(__name__)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when present, else CPU; ``"cuda"`` falls back to CPU with a warning."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("CUDA was asked for but is not available; running on CPU")
        return torch.device("cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 dot-product instructions (AVX512-BF16 or AMX), where oneDNN runs bf16 natively."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype matrix products run in on ``device``, or None for full precision (fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and (precision == "bf16" or cpu_has_native_bf16()):
        return torch.bfloat16
    return None


def precision_name(device: torch.device, precision: str = "auto") -> str:
    """What ``precision`` means on ``device``: ``bf16``, ``fp16`` or ``fp32``."""
    dtype = autocast_dtype(device, precision)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, precision: str = "auto"):
    """Autocast to ``autocast_dtype(device, precision)``; a no-op at full precision."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --- one GPU per worker on a multi-GPU node ------------------------------------------------------------------------
SLOTS_DIR = Path(tempfile.gettempdir()) / "capfilt-worker-slots"  # lock files shared by a node's workers


@dataclass
class WorkerSlot:
    """A worker's number on its node, held through an exclusive lock on ``slot-N`` until released."""

    index: int
    _file: object = field(repr=False, default=None)

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock; a killed process drops it too
            self._file = None


def claim_slot(folder: str | Path = SLOTS_DIR, most: int = 4096) -> WorkerSlot:
    """The lowest slot number no live worker on this node holds (locks die with their process)."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(most):
        handle = open(folder / f"slot-{index}", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return WorkerSlot(index, handle)
    raise RuntimeError(f"more than {most} capfilt workers hold a slot in {folder}")


def worker_device(requested: str | None = "auto",
                  slots: str | Path = SLOTS_DIR) -> tuple[torch.device, WorkerSlot | None]:
    """A worker's device: with G GPUs and no index asked for, worker slot i runs on GPU i mod G.

    So ``--workers 8`` on an 8-GPU node (or 8 SDK processes, task slots or Dask workers) puts one worker on
    each GPU; ``cuda:N`` pins a GPU and ``cpu`` stays on CPU. The slot is held until ``release``.
    """
    device = pick_device(requested)
    if device.type != "cuda" or device.index is not None:
        return device, None
    count = torch.cuda.device_count()
    slot = claim_slot(slots) if count > 1 else None
    device = torch.device("cuda", slot.index % count if slot else 0)
    torch.cuda.set_device(device)
    return device, slot


# --- heads that stay in fp32 under autocast --------------------------------------------------------------------------
_FP32_CLASSES: dict[type, type] = {}


def _fp32_forward(self, *args, **kwargs):
    args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    with torch.autocast(next(self.parameters()).device.type, enabled=False):
        return super(type(self), self).forward(*args, **kwargs)


def compute_in_fp32(module: torch.nn.Module) -> torch.nn.Module:
    """Make ``module`` compute in fp32 inside an autocast region (its inputs cast up), in place; returns it.

    Same parameters, same state-dict keys (its class becomes a subclass whose ``forward`` turns autocast off,
    as ``capfilt.attention.use_sdpa`` swaps classes), and a deep copy keeps it. For output heads, where
    bf16 rounding would change what is drawn or decided and fp32 costs little.
    """
    cls = type(module)
    if cls in _FP32_CLASSES.values():
        return module
    if cls not in _FP32_CLASSES:
        _FP32_CLASSES[cls] = type(f"Fp32{cls.__name__}", (cls,), {"forward": _fp32_forward})
    module.__class__ = _FP32_CLASSES[cls]
    return module
