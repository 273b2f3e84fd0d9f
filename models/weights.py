"""Initialising a MED from trained weights: a capfilt run, an exported captioner/filter, an original ``.pth``.

Loading is strict, as everywhere in capfilt: every key of the source must be
a MED key, and every key the MED being built needs must be there, with one
set of known exceptions:

- a source may hold parts of a role this MED was built without (a
  pre-trained MED's text encoder when fine-tuning the captioner): they are
  set aside, and listed in the log;
- momentum encoders missing from the source start as copies of the online
  encoders (as BLIP's ``copy_params``), and a missing ITC temperature at its
  initial 0.07 (transformers' retrieval class has none); queues always start
  fresh (a new run's queue is filled by its own batches);
- the ViT's position embeddings are interpolated (bicubic, over the patch
  grid) when the image size changes, e.g. 224 px pre-training -> 384 px
  fine-tuning (paper §4.1; the original's ``interpolate_pos_embed``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.checkpoints import (
    CAPTIONER, FILTER, CheckpointError, load_hf_folder, load_original_state_dict, original_to_hf,
)
from capfilt.models.checkpointing import latest_checkpoint, read_checkpoint
from capfilt.models.med import LOSSES, MED, MEDSettings

log = logging.getLogger(__name__)
QUEUES = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
POSITION_EMBEDDINGS = ("vision_model.embeddings.position_embedding", "vision_model_m.embeddings.position_embedding")
HF_CLASSES = {"BlipForConditionalGeneration": BlipForConditionalGeneration,
              "BlipForImageTextRetrieval": BlipForImageTextRetrieval}


def read_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """A MED-named state dict from a capfilt run/checkpoint folder, an HF BLIP folder or an original ``.pth``."""
    source = Path(source)
    if source.is_dir() and (checkpoint := latest_checkpoint(source)) is not None:
        return read_checkpoint(checkpoint)["model"]
    if source.is_dir() and (source / "config.json").is_file():
        architectures = json.loads((source / "config.json").read_text()).get("architectures") or []
        model_class = next((HF_CLASSES[name] for name in architectures if name in HF_CLASSES), None)
        if model_class is None:
            raise CheckpointError(f"{source}: config.json names {architectures}; expected one of {sorted(HF_CLASSES)}")
        return load_hf_folder(model_class, source).state_dict()
    if source.is_file():
        original = load_original_state_dict(source)
        weights = {}
        for role, needs in ((CAPTIONER, "text_decoder."), (FILTER, "text_encoder.")):
            if any(key.startswith(needs) for key in original):
                weights.update(original_to_hf(original, role))
        if "temp" in original:
            weights["temp"] = original["temp"]
        return weights
    raise CheckpointError(f"no weights at {source}: expected a capfilt run or checkpoint folder, "
                          "an HF captioner/filter folder, or an original BLIP .pth")


def resize_position_embedding(position_embedding: torch.Tensor, num_positions: int) -> torch.Tensor:
    """``[1, 1 + g*g, D]`` -> ``[1, num_positions, D]``: the class position kept, the patch grid resized."""
    old_grid, new_grid = round((position_embedding.shape[1] - 1) ** 0.5), round((num_positions - 1) ** 0.5)
    if old_grid ** 2 + 1 != position_embedding.shape[1] or new_grid ** 2 + 1 != num_positions:
        raise CheckpointError(f"cannot resize position embeddings {tuple(position_embedding.shape)} "
                              f"to {num_positions} positions: not a square patch grid")
    dim = position_embedding.shape[-1]
    grid = position_embedding[:, 1:].reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(position_embedding.dtype)
    return torch.cat([position_embedding[:, :1], grid], dim=1)


def _complete_keys(med: MED) -> set[str]:
    """The keys of a MED of the same config with every objective (built on the meta device: no memory)."""
    with torch.device("meta"):
        full = MED(med.config, med.ids, MEDSettings(losses=LOSSES, queue_size=1))
    return set(full.state_dict())


def load_med_weights(med: MED, source: str | Path) -> None:
    """Fill ``med`` (in place) from ``source``, strictly (see the module's docstring)."""
    weights = read_weights(source)
    own = med.state_dict()
    unknown = sorted(set(weights) - _complete_keys(med))
    if unknown:
        raise CheckpointError(f"{source}: keys that are not MED keys: {unknown[:10]}")
    other_role = sorted(set(weights) - set(own))
    weights = {key: value for key, value in weights.items() if key in own and key not in QUEUES}
    for key in POSITION_EMBEDDINGS:
        if key in weights and weights[key].shape != own[key].shape:
            log.info("interpolating %s from %s to %s", key, tuple(weights[key].shape), tuple(own[key].shape))
            weights[key] = resize_position_embedding(weights[key], own[key].shape[1])
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
                  for k, v in weights.items() if v.shape != own[k].shape]
    has_momentum = any(key.endswith("_m") or "_m." in key for key in weights)
    missing = sorted(key for key in own if key not in weights and key not in QUEUES and key != "temp"
                     and not (not has_momentum and key.split(".")[0].endswith("_m")))
    if mismatched or missing:
        raise CheckpointError(f"{source} does not fit this MED; mis-shaped: {mismatched[:10]}; missing: {missing[:10]}")
    _check_shared_agree(med, weights, source)
    med.load_state_dict(weights, strict=False)
    if not has_momentum and med.has("itc"):
        med.reset_momentum()
    if other_role:
        log.info("%s: set aside %d keys of parts this MED does not have (e.g. %s)", source, len(other_role),
                 other_role[0])


def _check_shared_agree(med: MED, weights: dict[str, torch.Tensor], source) -> None:
    """Keys naming one shared tensor (encoder and decoder views) must carry the same values."""
    by_tensor: dict[int, list[str]] = {}
    for key, tensor in med.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(key)
    for keys in by_tensor.values():
        given = [key for key in keys if key in weights]
        if any(not torch.equal(weights[given[0]], weights[key]) for key in given[1:]):
            raise CheckpointError(f"{source}: {given} are one shared parameter in the MED but differ in the source "
                                  "(an encoder and a decoder fine-tuned apart cannot be re-tied)")
