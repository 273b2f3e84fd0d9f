"""Checkpoint averaging: one model folder whose weights are the mean of several exported folders' weights.

The checkpoints of one fine-tuning run near its end lie close together, and
their mean tends to sit where the loss is flatter than at any one of them
(Polyak averaging; Izmailov et al., 2018, "Averaging Weights Leads to Wider
Optima"). The filter shipped with the demo models is such a mean (its
``capfilt_average.json`` lists the folders).

The folders are exports of one architecture (``capfilt.models.export``, or
any transformers folder with a single ``model.safetensors``): the same
``config.json`` but for how it was stored (dtype, transformers version),
and the same keys and shapes. Floating-point weights are averaged in
float64 and stored in the first folder's dtype (an installed demo model is
fp16, a run's export fp32); any other tensor must be equal in every folder.
The output is the first folder's files (config, tokenizer, capfilt's
settings files) with the averaged weights and ``capfilt_average.json``,
which lists the folders averaged. It is loaded back strictly, as each class
its ``architectures`` names, before it takes its name: a failure leaves no
half-written folder.

Command line: ``python -m capfilt.models.average OUT FOLDER FOLDER [FOLDER ...]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from capfilt.help_format import HelpWithDefaults

if TYPE_CHECKING:
    import torch

# torch, transformers and safetensors are imported where used: --help stays quick.

WEIGHTS = "model.safetensors"
RECORD = "capfilt_average.json"  # the averaged folders, in order


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of ``states``' floating-point tensors, in the first state's dtypes; other tensors must
    agree exactly."""
    import torch

    if not states:
        raise ValueError("nothing to average")
    first = states[0]
    for index, state in enumerate(states[1:], start=1):
        if set(state) != set(first):
            differ = sorted(set(state) ^ set(first))
            raise ValueError(f"weights {index} and 0 have different keys: {differ[:5]}")
        for key, value in state.items():
            same_kind = value.is_floating_point() == first[key].is_floating_point()
            if value.shape != first[key].shape or not same_kind:
                raise ValueError(f"{key}: {tuple(value.shape)} {value.dtype} in weights {index}, "
                                 f"{tuple(first[key].shape)} {first[key].dtype} in weights 0")
    mean = {}
    for key, value in first.items():
        if value.is_floating_point():
            total = sum(state[key].to(torch.float64) for state in states)
            mean[key] = (total / len(states)).to(value.dtype)
        elif all(torch.equal(state[key], value) for state in states):
            mean[key] = value.clone()
        else:
            raise ValueError(f"{key}: a {value.dtype} tensor that differs between the folders cannot be averaged")
    return mean


IGNORED_CONFIG_KEYS = ("dtype", "torch_dtype", "transformers_version")  # how a folder was stored, not its model


def _comparable(config):
    """A config.json's content less what says how it was stored (``IGNORED_CONFIG_KEYS``), at any depth."""
    if isinstance(config, dict):
        return {key: _comparable(value) for key, value in config.items() if key not in IGNORED_CONFIG_KEYS}
    return config


def _model_classes(config: dict, folder: Path) -> list[type]:
    """The transformers classes a config.json names (``architectures``), for the strict reload."""
    import transformers

    names = config.get("architectures") or []
    if not names:
        raise ValueError(f"{folder}/config.json names no architectures: the average could not be loaded back")
    unknown = [name for name in names if not hasattr(transformers, name)]
    if unknown:
        raise ValueError(f"{folder}/config.json: transformers has no {', '.join(unknown)}")
    return [getattr(transformers, name) for name in names]


def average_folders(folders: list[str | Path], out: str | Path) -> Path:
    """Write the mean of ``folders`` (exported models of one architecture) to ``out``; returns ``out``.

    ``out`` is new or an empty folder, outside every input folder. It is written beside itself first and renamed
    when complete and loaded back, so that a failure leaves nothing half-written.
    """
    from safetensors.torch import load_file, save_file

    from capfilt.checkpoints import load_hf_folder

    folders, out = [Path(folder) for folder in folders], Path(out)
    if len(folders) < 2:
        raise ValueError("averaging needs at least two folders")
    resolved = [folder.resolve() for folder in folders]
    if len(set(resolved)) < len(resolved):
        raise ValueError("a folder is given twice: each would count as many times as it is named")
    for folder, place in zip(folders, resolved):
        if not (folder / WEIGHTS).is_file():
            raise FileNotFoundError(f"{folder}: no {WEIGHTS} (sharded or non-safetensors weights are not supported)")
        if out.resolve() == place or place in out.resolve().parents:
            raise ValueError(f"the output {out} is, or is inside, {folder}, one of the folders averaged")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")
    configs = [json.loads((folder / "config.json").read_text()) for folder in folders]
    for folder, config in zip(folders[1:], configs[1:]):
        if _comparable(config) != _comparable(configs[0]):
            raise ValueError(f"{folder}/config.json differs from {folders[0]}/config.json (beyond how it is stored): "
                             "not one architecture")
    classes = _model_classes(configs[0], folders[0])
    mean = average_state_dicts([load_file(folder / WEIGHTS) for folder in folders])
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(folders[0], partial, ignore=shutil.ignore_patterns(WEIGHTS, RECORD))
        save_file(mean, partial / WEIGHTS, metadata={"format": "pt"})
        (partial / RECORD).write_text(json.dumps({"averaged": [str(folder) for folder in folders]}, indent=2) + "\n")
        for model_class in classes:
            load_hf_folder(model_class, partial)  # strict round trip: raises on any key problem
        if out.exists():
            out.rmdir()  # empty, checked above
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m capfilt.models.average", description=__doc__.split("\n")[0],
                                     formatter_class=HelpWithDefaults)
    parser.add_argument("out", help="the folder to write (new or empty)")
    parser.add_argument("folders", nargs="+", help="exported model folders of one architecture (two or more)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        print(average_folders(args.folders, args.out))
    except (FileExistsError, FileNotFoundError, ValueError) as error:  # a CheckpointError is a ValueError
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
