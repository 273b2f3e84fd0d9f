"""Training checkpoints: save every N steps and resume exactly.

A checkpoint is a folder ``OUT/checkpoints/step-00001000/`` holding
``training_state.pt`` (the MED's state dict with momentum encoders and
queues, the optimizer, the step/epoch counters, every data stream's position,
the files left out as unreadable and what was skipped so far, the run's
configuration) and ``rng-rank{r}.pt`` (each process's random
generators). It is written under a temporary name and renamed when complete,
so the newest folder is always whole; older ones beyond ``keep`` are removed.
The learning rate and ITC alpha are pure functions of the counters, so they
need no state of their own.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import BlipConfig

from capfilt.models import distributed
from capfilt.models.config import MEDSettings
from capfilt.models.data import StreamPosition
from capfilt.models.med import MED
from capfilt.tokenizer import load_tokenizer, special_ids

log = logging.getLogger(__name__)
STATE_FILE = "training_state.pt"
PREFIX = "step-"


SKIP_COUNTS = ("files", "row_groups", "rows")


def no_skips() -> dict[str, int]:
    return dict.fromkeys(SKIP_COUNTS, 0)


@dataclass
class TrainState:
    """Counters of a run: optimizer ``step``s done, the ``epoch`` and steps into it, stream positions.

    ``left_out``: the files (absolute paths) the run left out at its start as unreadable (--skip-bad-files); a
    resume leaves out the same ones, so that every stream keeps its files and positions. ``skipped``: what was
    skipped up to ``step``, summed over ranks: files, row groups and their rows (a row group once per epoch).
    Checkpoints written before these existed read as none.
    """

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    positions: dict[int, StreamPosition] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=no_skips)

    def to_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "positions": {int(s): [p.file, p.row] for s, p in self.positions.items()},
                "left_out": list(self.left_out), "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        positions = {int(s): StreamPosition(*p) for s, p in data["positions"].items()}
        return cls(data["step"], data["epoch"], data["step_in_epoch"], positions, list(data.get("left_out", [])),
                   {**no_skips(), **data.get("skipped", {})})


def checkpoints_folder(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def step_folder(out: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` goes in the run folder ``out``."""
    return checkpoints_folder(out) / f"{PREFIX}{step:08d}"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out`` (a run folder) or ``out`` itself if it is one."""
    out = Path(out)
    if (out / STATE_FILE).is_file():
        return out
    done = sorted(p for p in _complete(out) if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def _complete(out: str | Path) -> list[Path]:
    """Checkpoint folders of a run, without any ``.partial`` one a crash left behind."""
    return [p for p in checkpoints_folder(out).glob(PREFIX + "*") if p.suffix != ".partial"]


def _rng_state() -> dict:
    """torch's generators: dropout draws from them (data and ITM negatives use seeds of their own)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                    config: dict, keep: int = 2) -> Path:
    """Write a checkpoint of ``state.step`` (every rank calls this; rank 0 writes the shared part)."""
    positions = {}
    for rank_positions in distributed.gather_objects(state.positions):
        positions.update(rank_positions)
    state = replace(state, positions=positions)
    folder = step_folder(out, state.step)
    partial = folder.with_name(folder.name + ".partial")
    if distributed.rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    distributed.barrier()
    torch.save(_rng_state(), partial / f"rng-rank{distributed.rank()}.pt")
    distributed.barrier()
    if distributed.rank() == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state.to_dict(),
                    "config": config, "world_size": distributed.world_size()}, partial / STATE_FILE)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        for old in sorted(_complete(out))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", folder)
    distributed.barrier()
    return folder


def read_checkpoint(folder: str | Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint's ``training_state.pt`` (tensors loaded onto ``device``)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in {folder}: not a capfilt training checkpoint")
    return torch.load(path, map_location=device, weights_only=True)


def load_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device | str = "cpu", expect: dict | None = None) -> TrainState:
    """Restore model, optimizer, counters, positions and this rank's RNG.

    ``expect``: this run's configuration; the checkpoint must come from the
    same model, MED settings, task, global batch and data streams.
    """
    saved = read_checkpoint(folder, device)
    if expect is not None:
        _check_same_run(saved["config"], expect, folder)
    model.load_state_dict(saved["model"], strict=True)
    optimizer.load_state_dict(saved["optimizer"])
    rng = Path(folder) / f"rng-rank{distributed.rank()}.pt"
    if saved["world_size"] == distributed.world_size() and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    else:
        log.warning("%s was written by %d process(es), this run has %d: random generators are reseeded, "
                    "so dropout masks differ from an uninterrupted run", folder, saved["world_size"],
                    distributed.world_size())
    return TrainState.from_dict(saved["state"])


def _check_same_run(previous: dict, current: dict, folder) -> None:
    def fields(info):
        # A MED setting added since the checkpoint was written is at its default there: a new setting's default
        # is what capfilt did before it existed (e.g. freeze_vision=False), so such a run can still resume.
        med = {**asdict(MEDSettings()), **info["med"]}
        return {"model config": info["blip"], "MED settings": med, "streams": info["streams"],
                "task": info["train"]["task"], "global batch": info["train"]["data"]["batch_size"]}

    old, new = fields(previous), fields(current)
    differ = [name for name in old if old[name] != new[name]]
    if differ:
        raise ValueError(f"{folder} is a checkpoint of another run ({', '.join(differ)} differ); "
                         "use another --out to start a new run")


def config_dict(config) -> dict:
    """A dataclass configuration as plain data, for the checkpoint and the log."""
    return asdict(config)


def med_from_run(source: str | Path) -> tuple[MED, object]:
    """The MED (weights, momentum encoders, queues) and tokenizer of a run's newest checkpoint (or a given one)."""
    checkpoint = latest_checkpoint(source)
    if checkpoint is None:
        raise FileNotFoundError(f"no capfilt training checkpoint in {source}")
    saved = read_checkpoint(checkpoint)
    run = checkpoint if (checkpoint / "tokenizer").is_dir() else checkpoint.parent.parent
    tokenizer = load_tokenizer(run / "tokenizer")
    settings = MEDSettings(**{**saved["config"]["med"], "losses": tuple(saved["config"]["med"]["losses"])})
    med = MED(BlipConfig.from_dict(saved["config"]["blip"]), special_ids(tokenizer), settings)
    med.load_state_dict(saved["model"], strict=True)
    return med, tokenizer
