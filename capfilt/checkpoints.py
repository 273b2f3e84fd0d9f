"""Loading BLIP checkpoints from local paths, strictly, offline.

Three forms are read (docs/models.md, "Model references"):

- an HF-format folder (``save_pretrained`` layout: ``config.json`` +
  ``model.safetensors`` or ``pytorch_model.bin``, tokenizer files);
- an HF hub model id (``Salesforce/blip-image-captioning-large``) resolved
  from the local hub cache only: nothing tries the network;
- an original Salesforce ``.pth`` file (a dict with the weights under
  ``'model'``), whose keys are mapped to transformers' names.

Loading is strict, unlike the original loader, which drops mis-shaped keys
and loads non-strictly: a missing, unexpected or mis-shaped key is an error
that names it. The only keys set aside are those of a *known* other role of
the same file (the captioner ignores a pre-trained file's text encoder, the
filter its text decoder; both ignore momentum copies and queues), and the
``position_ids`` buffers that old transformers saved, checked to be 0..n-1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import BlipConfig, PreTrainedModel, PreTrainedTokenizerBase

from capfilt.configs import (
    ITC_EMBED_DIM, PRESETS, VIT_LAYER_NORM_EPS, TextSize, VitSize, config_from_med, default_heads, make_config,
    preset_config,
)
from capfilt.attention import use_sdpa
from capfilt.shipped import DEMO_MODELS
from capfilt.tokenizer import SpecialIds, TokenizerNotFoundError, load_tokenizer, special_ids

CAPTIONER = "captioner"
FILTER = "filter"
PTH_SUFFIXES = (".pth", ".pt", ".bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked, with the reason."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are: an HF-format folder or an original ``.pth``."""

    kind: str  # "hf" or "pth"
    path: Path


def resolve(ref: str | Path, role: str) -> ModelSource:
    """Find a model from a folder, a ``.pth`` file, a cached hub id or ``demo``."""
    if str(ref) == "demo":
        path = DEMO_MODELS / role
        if not (path / "config.json").is_file():
            raise CheckpointError(f"the demo {role} is not at {path}; run `make demo-models` to train it")
        return ModelSource("hf", path)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is a folder but has no config.json (not an HF-format model folder)")
        return ModelSource("hf", path)
    if path.is_file():
        if path.suffix not in PTH_SUFFIXES:
            raise CheckpointError(f"{path}: expected an original BLIP checkpoint ({', '.join(PTH_SUFFIXES)})")
        return ModelSource("pth", path)
    if path.suffix in PTH_SUFFIXES:  # a checkpoint file's name, not a hub id: the hub cache's advice would mislead
        raise CheckpointError(
            f"no such file: {path} (the original BLIP checkpoints are fetched with `wget -P checkpoints URL`, "
            f"docs/models.md, which puts them under checkpoints/; give the path where the file is)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(ref)) and not str(ref).startswith((".", "/")):
        return ModelSource("hf", _from_hub_cache(str(ref)))
    raise CheckpointError(f"no model at {ref!r}: not a folder, a .pth file, a cached hub id or 'demo'")


def _from_hub_cache(repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the local HF hub cache, never the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as error:  # huggingface_hub raises several types for "not cached"
        raise CheckpointError(
            f"{repo_id} is not in the local hub cache ({HF_HUB_CACHE}). capfilt never downloads: "
            f"on a machine with internet run `hf download {repo_id}` and copy the cache here "
            f"(or set HF_HUB_CACHE), or pass the model's folder or .pth path. ({type(error).__name__})"
        ) from None


# --- original Salesforce keys -> transformers keys -------------------------------------------
# The text side keeps its names; the ViT differs: BLIP's models/vit.py against transformers' modeling_blip.py.
# One table, read in both directions; "{n}" stands for a block number.
_VISION_KEYS = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.blocks.{n}.norm1.", "vision_model.encoder.layers.{n}.layer_norm1."),
    ("visual_encoder.blocks.{n}.norm2.", "vision_model.encoder.layers.{n}.layer_norm2."),
    ("visual_encoder.blocks.{n}.attn.qkv.", "vision_model.encoder.layers.{n}.self_attn.qkv."),
    ("visual_encoder.blocks.{n}.attn.proj.", "vision_model.encoder.layers.{n}.self_attn.projection."),
    ("visual_encoder.blocks.{n}.mlp.", "vision_model.encoder.layers.{n}.mlp."),
    ("visual_encoder.norm.", "vision_model.post_layernorm."),
]


def _rules(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(regex, replacement) rules from name templates: the source's "{n}" matches, the target's refers back."""
    return [(re.escape(source).replace(r"\{n\}", r"(\d+)"), target.replace("{n}", r"\1")) for source, target in pairs]


_VISION_TO_HF = _rules(_VISION_KEYS)
_VISION_TO_ORIGINAL = _rules([(hf, original) for original, hf in _VISION_KEYS])

# What each role takes from an original file, and what it knowingly leaves.
_ROLE_KEEPS = {
    CAPTIONER: ("visual_encoder.", "text_decoder."),
    FILTER: ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head."),
}
_MOMENTUM_AND_QUEUES = re.compile(r"^([a-z_]+_m\.|temp$|image_queue$|text_queue$|idx_queue$|ptr_queue$|queue_ptr$)")
_ROLE_LEAVES = {
    CAPTIONER: re.compile(r"^(text_encoder\.|vision_proj\.|text_proj\.|itm_head\.)"),
    FILTER: re.compile(r"^text_decoder\."),
}
_POSITION_IDS = re.compile(r"\.embeddings\.position_ids$")


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        new, count = re.subn("^" + pattern, replacement, key)
        if count:
            return new
    return key


def original_to_hf(state_dict: dict[str, torch.Tensor], role: str) -> dict[str, torch.Tensor]:
    """Select ``role``'s weights from an original state dict and rename them for transformers."""
    keeps, leaves = _ROLE_KEEPS[role], _ROLE_LEAVES[role]
    mapped, unknown = {}, []
    for key, tensor in state_dict.items():
        if _MOMENTUM_AND_QUEUES.match(key) or leaves.match(key):
            continue
        if _POSITION_IDS.search(key):
            if not torch.equal(tensor.flatten().long(), torch.arange(tensor.numel())):
                raise CheckpointError(f"{key} is not the position_ids buffer 0..n-1")
            continue
        if not key.startswith(keeps):
            unknown.append(key)
            continue
        mapped[_rename(key, _VISION_TO_HF)] = tensor
    if unknown:
        raise CheckpointError(f"unexpected keys for a BLIP {role}: {_listing(unknown)}")
    return mapped


def hf_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse key map: a transformers BLIP state dict in the original layout."""
    return {_rename(key, _VISION_TO_ORIGINAL): tensor for key, tensor in state_dict.items()}


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of an original ``.pth`` (under ``'model'``), read with ``weights_only=True``."""
    try:
        checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read {path} as a BLIP checkpoint: {error}") from error
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (expected a dict with 'model')")
    return state_dict


_FC1 = "visual_encoder.blocks.0.mlp.fc1.weight"
_ITC_KEYS = ("vision_proj.weight", "text_proj.weight")


def _itc_size(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The ITC projections' size (``embed_dim``) in the shapes, or None for a file without them (a captioner)."""
    sizes = {key: state_dict[key].shape[0] for key in _ITC_KEYS if key in state_dict}
    if len(set(sizes.values())) > 1:
        raise CheckpointError("the ITC projections disagree: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return next(iter(sizes.values()), None)


def infer_config(state_dict: dict[str, torch.Tensor]) -> BlipConfig:
    """The sizes of an original checkpoint, read from its tensors' shapes.

    Widths, depths, the ViT's MLP ratio (``fc1``'s rows / width), the ITC size
    (``vision_proj``/``text_proj`` rows; 256 for a file without them), the
    patch and image size, the vocabulary and positions are all in the shapes.
    Head counts are not (a ``width x width`` projection splits into any number
    of heads); they follow ``capfilt.configs.default_heads``: the preset of the
    same width (768: ViT-B/16 and BERT-base, 12 heads; 1024: ViT-L/16, 16 heads)
    or 64 dimensions per head otherwise. A model with other heads needs a config
    that states them (``med_config.json`` + ``"vit"``, or a ``config.json``).
    """
    try:
        pos_embed = state_dict["visual_encoder.pos_embed"]
        patch = state_dict["visual_encoder.patch_embed.proj.weight"]
        fc1 = state_dict[_FC1]
        decoder = "text_decoder.bert.embeddings.word_embeddings.weight" in state_dict
        prefix = "text_decoder.bert." if decoder else "text_encoder."
        words = state_dict[prefix + "embeddings.word_embeddings.weight"]
        positions = state_dict[prefix + "embeddings.position_embeddings.weight"]
        intermediate = state_dict[prefix + "encoder.layer.0.intermediate.dense.weight"]
    except KeyError as error:
        raise CheckpointError(f"not a BLIP checkpoint: no {error.args[0]}") from None
    width, patch_size = patch.shape[0], patch.shape[-1]
    grid = round((pos_embed.shape[-2] - 1) ** 0.5)
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"visual_encoder\.blocks\.(\d+)\.", k)))
    layer = re.escape(prefix) + r"encoder\.layer\.(\d+)\."
    layers = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(layer, k)))
    vit = VitSize(width=width, depth=depth, heads=default_heads(width), patch_size=patch_size,
                  image_size=grid * patch_size, mlp_ratio=fc1.shape[0] / width)
    hidden = words.shape[1]
    text = TextSize(hidden_size=hidden, num_layers=layers, num_heads=default_heads(hidden),
                    intermediate_size=intermediate.shape[0], vocab_size=words.shape[0],
                    max_positions=positions.shape[0])
    itc = _itc_size(state_dict)
    return make_config(vit, text, embed_dim=ITC_EMBED_DIM if itc is None else itc)


def check_sizes(config: BlipConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a stated MLP ratio, ITC size or head count that the checkpoint's shapes contradict, naming both.

    Other sizes (widths, depths, vocabulary) show up as mis-shaped keys in ``load_strict``.
    """
    vision = config.vision_config
    for name, part in (("ViT", vision), ("text", config.text_config)):
        if part.hidden_size % part.num_attention_heads:
            raise CheckpointError(f"the config's {name} heads ({part.num_attention_heads}) do not divide "
                                  f"its width ({part.hidden_size})")
    fc1 = state_dict.get(_FC1)
    if fc1 is not None and fc1.shape[1] == vision.hidden_size and fc1.shape[0] != vision.intermediate_size:
        raise CheckpointError(
            f"the config states a ViT MLP ratio of {vision.intermediate_size / vision.hidden_size:g} "
            f"(intermediate size {vision.intermediate_size}) but the checkpoint's {_FC1} has "
            f"{fc1.shape[0]} rows (MLP ratio {fc1.shape[0] / fc1.shape[1]:g})")
    itc = _itc_size(state_dict)
    if itc is not None and itc != config.image_text_hidden_size:
        raise CheckpointError(f"the config states an ITC size (embed_dim) of {config.image_text_hidden_size} "
                              f"but the checkpoint's vision_proj/text_proj give {itc}")


def original_config(state_dict: dict[str, torch.Tensor], config: str | Path | BlipConfig | None) -> BlipConfig:
    """The config for an original checkpoint: inferred, a preset name, a ``BlipConfig`` or a JSON file.

    A JSON file is either a transformers ``config.json`` or BLIP's own
    ``med_config.json`` extended with a ``"vit"`` entry (``width``, ``depth``,
    ``patch_size``, ``image_size``, and optionally ``heads``, ``mlp_ratio``,
    ``embed_dim``: see ``capfilt.configs.config_from_med``). A ``config.json``
    without ``vision_config.layer_norm_eps`` gets BLIP's 1e-6 (timm's ViT),
    not transformers' 1e-5. A stated size that the shapes contradict is an
    error (``check_sizes``).
    """
    if config is None:
        return infer_config(state_dict)
    if isinstance(config, BlipConfig):
        blip_config = config
    elif str(config) in PRESETS:
        blip_config = preset_config(str(config))
    else:
        data = json.loads(Path(config).read_text())
        if "vit" in data:
            try:
                blip_config = config_from_med(data)
            except (TypeError, ValueError, KeyError) as error:
                raise CheckpointError(f"{config}: {error}") from error
        else:
            vision = data.setdefault("vision_config", {})
            if isinstance(vision, dict):
                vision.setdefault("layer_norm_eps", VIT_LAYER_NORM_EPS)
            blip_config = BlipConfig.from_dict(data)
    check_sizes(blip_config, state_dict)
    return blip_config


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict`` that names every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state_dict) & set(expected)
        if state_dict[k].shape != expected[k].shape
    )
    problems = [
        f"{label}: {_listing(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source} does not match the model; " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def load_hf_folder(model_class: type[PreTrainedModel], folder: Path) -> PreTrainedModel:
    """``from_pretrained`` offline, refusing any missing, unexpected or mis-shaped key."""
    model, info = model_class.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    problems = [
        f"{label}: {_listing(sorted(map(str, info.get(name) or [])))}"
        for name, label in (
            ("missing_keys", "missing keys"),
            ("unexpected_keys", "unexpected keys"),
            ("mismatched_keys", "mis-shaped keys"),
        )
        if info.get(name)
    ]
    if problems:
        raise CheckpointError(f"{folder} does not match {model_class.__name__}; " + "; ".join(problems))
    return model


def load_model(
    model_class: type[PreTrainedModel],
    ref: str | Path,
    role: str,
    config: str | Path | BlipConfig | None = None,
    tokenizer: str | Path | None = None,
) -> tuple[PreTrainedModel, object, ModelSource]:
    """Build ``model_class`` (a transformers BLIP class) for ``role`` with its tokenizer, from any source.

    An HF folder brings its config and tokenizer. An original ``.pth``
    brings neither: its sizes come from ``config`` (or its tensors' shapes)
    and its special ids from the tokenizer.
    """
    source = resolve(ref, role)
    if source.kind == "hf":
        if config is not None:
            raise CheckpointError(f"{source.path} carries its own config.json; config= is for .pth files")
        model = use_sdpa(load_hf_folder(model_class, source.path))  # same maths, fused (capfilt/attention.py)
        return model, tokenizer_for(source, model.config, tokenizer), source
    state_dict = load_original_state_dict(source.path)
    loaded_tokenizer = _tokenizer_at(tokenizer or source.path.parent, source)
    blip_config = with_special_ids(original_config(state_dict, config), special_ids(loaded_tokenizer))
    model = use_sdpa(model_class(blip_config))
    load_strict(model, original_to_hf(state_dict, role), source=str(source.path))
    return model, tokenizer_for(source, model.config, loaded_tokenizer), source


def with_special_ids(config: BlipConfig, ids: SpecialIds) -> BlipConfig:
    """``config`` with the text side's bos/eos/pad ids set to the tokenizer's ``[DEC]``/``[SEP]``/``[PAD]``."""
    text = config.text_config
    text.bos_token_id, text.sep_token_id, text.eos_token_id, text.pad_token_id = ids.dec, ids.sep, ids.sep, ids.pad
    return config


def _tokenizer_at(path: str | Path, source: ModelSource):
    try:
        return load_tokenizer(path)
    except TokenizerNotFoundError as error:
        raise CheckpointError(f"{error} (the model at {source.path} needs a tokenizer: pass tokenizer=PATH)") from None


def tokenizer_for(source: ModelSource, config: BlipConfig, tokenizer=None):
    """The model's tokenizer, checked to fit it: same vocabulary size and ``[DEC]``/``[SEP]``/``[PAD]`` ids.

    ``tokenizer`` is a loaded tokenizer, a path, or ``None`` for the one in
    the model's folder.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = _tokenizer_at(tokenizer or source.path, source)
    ids, text = special_ids(tokenizer), config.text_config
    expected = (text.vocab_size, text.bos_token_id, text.sep_token_id, text.pad_token_id)
    found = (len(tokenizer), ids.dec, ids.sep, ids.pad)
    if found != expected:
        raise CheckpointError(
            f"the tokenizer does not fit the model at {source.path}: "
            f"(vocab size, [DEC], [SEP], [PAD]) = {found}, the model expects {expected}"
        )
    return tokenizer


def _listing(keys: list[str], most: int = 10) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" (+{len(keys) - most} more)" if len(keys) > most else "")

