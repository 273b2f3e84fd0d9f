"""Initialising a MED from trained weights: a capfilt run, an exported captioner/filter, an original ``.pth``.

Loading is strict, as everywhere in capfilt: every key of the source must be
a MED key, and every key the MED being built needs must be there, with one
set of known exceptions:

- a source may hold parts of a role this MED was built without (a
  pre-trained MED's text encoder when fine-tuning the captioner): they are
  set aside, and listed in the log;
- momentum encoders are the source's where it has them (a capfilt run, an
  original pre-training or retrieval ``.pth``: BLIP's ``load_checkpoint``
  loads them too), mapped as the online ones and checked as strictly;
  missing from the source (an exported or fine-tuned captioner, an HF
  folder) they start as copies of the online encoders (as BLIP's
  ``copy_params``), and a missing ITC temperature at its initial 0.07
  (transformers' retrieval class has none);
- ITC feature queues are the source's where it has them (``fit_queue``: kept
  oldest first with the pointer at 0, so any global batch that divides the
  queue size lines up; a longer one keeps its newest features, a shorter one
  fills the rest with fresh ones), else fresh. The image-id queue always
  starts empty: its ids name images of the source's data, not this run's;
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
from capfilt.models.config import LOSSES, MEDSettings
from capfilt.models.med import MED

log = logging.getLogger(__name__)
QUEUES = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
# An original checkpoint's momentum modules -> the online module whose names (and key mapping) they share.
ORIGINAL_MOMENTUM = {"visual_encoder_m": "visual_encoder", "vision_proj_m": "vision_proj",
                     "text_encoder_m": "text_encoder", "text_proj_m": "text_proj"}
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
        weights.update(original_momentum(original, source))
        weights.update(original_queues(original, source))
        return weights
    raise CheckpointError(f"no weights at {source}: expected a capfilt run or checkpoint folder, "
                          "an HF captioner/filter folder, or an original BLIP .pth")


def original_momentum(original: dict[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """An original state dict's momentum copies (``visual_encoder_m.*``, ...) under the MED's ``*_m`` names.

    Each is renamed as its online module is (``visual_encoder_m.blocks.0.*`` ->
    ``vision_model_m.encoder.layers.0.*``); a ``*_m`` module the MED has no
    momentum copy of is an error that names its keys.
    """
    momentum = {key: tensor for key, tensor in original.items() if key.split(".")[0] in ORIGINAL_MOMENTUM}
    unknown = sorted(key for key in original if "." in key and key.split(".")[0].endswith("_m") and key not in momentum)
    if unknown:
        raise CheckpointError(f"{source}: momentum keys of no MED part (expected {sorted(ORIGINAL_MOMENTUM)}): "
                              f"{unknown[:10]}")
    as_online = {ORIGINAL_MOMENTUM[key.split(".")[0]] + key[key.index("."):]: tensor
                 for key, tensor in momentum.items()}
    renamed = original_to_hf(as_online, FILTER)  # the online weights' mapping (FILTER keeps all four modules)
    return {f"{key.split('.')[0]}_m{key[key.index('.'):]}": tensor for key, tensor in renamed.items()}


def original_queues(original: dict[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """An original state dict's ITC queues in the MED's layout.

    BLIP keeps features in columns (``image_queue``/``text_queue``
    ``[embed_dim, queue_size]``), the pointer as ``[1]`` (``queue_ptr``;
    ``ptr_queue`` in the retrieval model) and image ids as ``idx_queue``
    ``[1, queue_size]``; the MED keeps rows, a 0-d pointer and ``[queue_size]``.
    """
    queues = {}
    for key in ("image_queue", "text_queue"):
        if key in original:
            if original[key].dim() != 2:
                raise CheckpointError(f"{source}: {key} {tuple(original[key].shape)} is not [embed_dim, queue_size]")
            queues[key] = original[key].t().contiguous()
    if "idx_queue" in original:
        queues["idx_queue"] = original["idx_queue"].reshape(-1)
    pointers = [key for key in ("queue_ptr", "ptr_queue") if key in original]
    if len(pointers) > 1:
        raise CheckpointError(f"{source}: two queue pointers, {pointers}")
    for key in pointers:
        if original[key].numel() != 1:
            raise CheckpointError(f"{source}: {key} {tuple(original[key].shape)} is not one queue position")
        queues["queue_ptr"] = original[key].reshape(())
    return queues


def fit_queue(queue: torch.Tensor, pointer: int, fresh: torch.Tensor) -> torch.Tensor:
    """A ring buffer ``queue`` whose next write goes to row ``pointer``, as ``len(fresh)`` rows, oldest first.

    The result is read with its pointer at 0: row 0 is overwritten first.
    Longer than ``fresh``: its newest ``len(fresh)`` rows. Shorter: all its
    rows, after the first rows of ``fresh`` (features of a new queue), which
    are then overwritten first.
    """
    ordered = torch.roll(queue, -pointer, dims=0)
    size = len(fresh)
    if len(ordered) >= size:
        return ordered[len(ordered) - size:]
    return torch.cat([fresh[:size - len(ordered)].to(ordered.dtype), ordered])


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
    queues = {key: weights[key] for key in QUEUES if key in weights and key in own}
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
    if med.has("itc"):
        _load_queues(med, queues, source)
        if has_momentum:
            log.info("%s: momentum encoders loaded from the source", source)
        else:
            med.reset_momentum()
            log.info("%s has no momentum encoders: they start as copies of the online ones", source)
    if other_role:
        log.info("%s: set aside %d keys of parts this MED does not have (e.g. %s)", source, len(other_role),
                 other_role[0])


@torch.no_grad()
def _load_queues(med: MED, queues: dict[str, torch.Tensor], source) -> None:
    """The source's image and text queues into ``med``'s (``fit_queue``), or fresh ones where it has none."""
    given = [key for key in ("image_queue", "text_queue") if key in queues]
    if not given:
        log.info("%s has no ITC queues: they start fresh", source)
        return
    if len(given) == 1:
        raise CheckpointError(f"{source} has {given[0]} but not the other ITC queue")
    size, dim = med.image_queue.shape
    length = len(queues["image_queue"])
    for key in given:
        shape = tuple(queues[key].shape)
        if len(shape) != 2 or shape[1] != dim or shape[0] != length:
            raise CheckpointError(f"{source}: {key} {shape} does not fit this MED's queues of {dim}-d features "
                                  f"(image_queue {tuple(queues['image_queue'].shape)})")
    pointer = int(queues["queue_ptr"]) if "queue_ptr" in queues else 0
    if not 0 <= pointer < length:
        raise CheckpointError(f"{source}: queue_ptr {pointer} is outside its queues of {length} features")
    for key in given:
        buffer = getattr(med, key)
        buffer.copy_(fit_queue(queues[key], pointer, buffer))
    med.queue_ptr.zero_()
    med.idx_queue.fill_(-100)
    if length == size:
        log.info("%s: ITC queues of %d features loaded (oldest first, pointer at 0)", source, size)
    elif length > size:
        log.info("%s: ITC queues of %d features, this run's hold %d: kept the newest %d", source, length, size,
                 size)
    else:
        log.info("%s: ITC queues of %d features, this run's hold %d: kept all %d, the other %d start fresh "
                 "(and are overwritten first)", source, length, size, length, size - length)
    if "idx_queue" in queues and bool((queues["idx_queue"] != -100).any()):
        log.info("%s: the queued features' image ids are not loaded (they name the source's images): "
                 "every queued feature is a negative", source)


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
