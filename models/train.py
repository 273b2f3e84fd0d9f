"""Training the MED: pre-training (ITC+ITM+LM), captioner fine-tuning (LM), filter fine-tuning (ITC+ITM).

One loop for the three tasks of CapFilt (paper §3.3); what differs is the
configuration, ``task_config(task)``, whose values are BLIP's (paper §4.1 and
the original ``configs/*.yaml``). From Python::

    config = configure("pretrain", data=["web/*.parquet"], out="runs/pt", model="base", tokenizer="bert/")
    train(config)

From the shell (any field of the configuration is a ``--flag``; ``--model NAME`` picks a preset, which sets the
model's shape and the settings that go with it, see ``TRAIN_PRESETS`` and ``--help``)::

    python -m capfilt.models.train pretrain --data 'web/*.parquet' --out runs/pt --tokenizer bert/
    python -m capfilt.models.train pretrain --model demo --data out/bootstrap/kept --out runs/demo-pt
    torchrun --nproc_per_node 8 -m capfilt.models.train finetune-captioner --data 'coco/*.parquet' \\
        --out runs/cap --init runs/pt --tokenizer runs/pt/tokenizer

A run folder holds ``tokenizer/``, ``log.jsonl`` (one line per logged step),
``checkpoints/step-*`` and, after fine-tuning, the exported ``captioner/`` or
``filter/`` folder. Running the same command again resumes from the newest
checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import re
import sys
import textwrap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import BlipConfig

from capfilt.configs import PRESETS, check_patch_size, preset_config
from capfilt.models import distributed
from capfilt.models.augment import AugmentConfig
from capfilt.models.checkpointing import (
    SKIP_COUNTS, TrainState, config_dict, latest_checkpoint, load_checkpoint, no_skips,
    save_checkpoint,
)
from capfilt.models.data import (
    DataConfig, EpochLoader, Skipped, check_files, close_decoding_processes, epoch_streams, find_files, longest_text,
    seed_for, steps_in_epoch, trim_padding,
)
from capfilt.models.export import SAMPLING_FILE, check_sampling_file, find_sampling_file
from capfilt.models.med import MED, MEDSettings, init_sincos_positions, prompt_length
from capfilt.models.presets import DEMO_TRAINING
from capfilt.tokenizer import TokenizerNotFoundError, load_tokenizer, special_ids

log = logging.getLogger("capfilt.train")
TASKS = ("pretrain", "finetune-captioner", "finetune-filter")
EXPORT_ROLE = {"finetune-captioner": "captioner", "finetune-filter": "filter"}


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule; defaults are BLIP pre-training's (paper §4.1, pretrain.yaml)."""

    lr: float = 3e-4  # peak lr: 3e-4 ViT-B, 2e-4 ViT-L pre-training; 1e-5 fine-tuning (caption/retrieval_coco.yaml)
    weight_decay: float = 0.05  # AdamW, on every parameter as in the original
    schedule: str = "step"  # "step": warm-up then lr * lr_decay**epoch; "cosine": per-epoch cosine to min_lr
    warmup_steps: int = 3000  # linear warm-up over the first steps of epoch 0 (pretrain.yaml)
    warmup_lr: float = 1e-6  # warm-up starts here (pretrain.yaml)
    lr_decay: float = 0.85  # per epoch (paper; the released pretrain.yaml says 0.9)
    min_lr: float = 1e-6  # floor: 1e-6 pre-training, 0 fine-tuning
    epochs: int = 20  # 20 pre-training (paper), 5 captioner, 6 filter (caption/retrieval_coco.yaml)
    max_steps: int = 0  # stop after this many steps in all (0: run every epoch)
    # Stop (checkpoint, export) after the first step that ends this many seconds after this process started
    # training (0: no limit), for jobs with a wall-clock budget. The lr schedule does not depend on it.
    max_seconds: float = 0.0
    alpha: float = 0.4  # ITC soft-target weight; alpha * min(1, step / steps of epoch 0) in epoch 0


@dataclass(frozen=True)
class TrainConfig:
    """A training run. ``task_config`` fills in each task's values."""

    task: str = "pretrain"  # one of TASKS
    out: str = ""  # run folder: tokenizer, log.jsonl, checkpoints, exports
    # A preset (tiny, demo, base, large: its shape and the trainer settings that go with it, listed in --help) or a
    # transformers BlipConfig config.json (a file, or a folder holding one)
    model: str = "base"
    image_size: int = 224  # 224 pre-training, 384 fine-tuning (paper §4.1)
    patch_size: int = 0  # ViT patch side in pixels; 0 = the model's own (16 for base and large, 8 for demo)
    # How a randomly initialised ViT's position embeddings start: "random" (BLIP's truncated normal) or "sincos"
    # (2-D sine-cosine, MAE's; still trained). Weights from `init` or a checkpoint replace either.
    vision_position_init: str = "random"
    # A tokenizer folder or vocab.txt; "" = the --init folder's, else the run's own tokenizer/, else the preset's
    tokenizer: str = ""
    init: str = ""  # start from: a capfilt run/checkpoint, an HF captioner/filter folder, an original .pth; "" = random
    seed: int = 42  # model init, data order, augmentation and ITM negatives derive from it
    device: str = ""  # "" = CUDA when present, else CPU
    bf16: bool = True  # bf16 autocast on CUDA (never on CPU)
    gradient_checkpointing: bool = False  # recompute activations in backward (the original's vit_grad_ckpt)
    checkpoint_every: int = 1000  # steps between checkpoints, plus one at the end; 0 = never (no resume)
    keep_checkpoints: int = 2  # newest checkpoints kept
    log_every: int = 50  # steps between log lines / log.jsonl records
    resume: bool = True  # continue from the newest checkpoint in `out`, if any (False: refuse to touch one)
    export: bool = True  # after fine-tuning, write the captioner/ or filter/ folder into `out`
    med: MEDSettings = field(default_factory=MEDSettings)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def task_config(task: str) -> TrainConfig:
    """BLIP's settings for ``task`` (ViT-B values; override per run)."""
    # Fine-tuning (caption_coco.yaml, retrieval_coco.yaml): 384 px, lr 1e-5 with a per-epoch cosine to 0,
    # 32 pairs per GPU on 8 GPUs, random crops of 0.5..1 (AugmentConfig's default).
    finetune_optim = OptimConfig(lr=1e-5, schedule="cosine", warmup_steps=0, min_lr=0.0)
    if task == "pretrain":  # paper §4.1: 2880 pairs per batch, random crops of 0.2..1; the rest as defined above
        return TrainConfig(task=task, augment=AugmentConfig(crop_min_scale=0.2))
    if task == "finetune-captioner":  # LM only, 5 epochs, captions "a picture of " + text, 40 tokens
        return TrainConfig(task=task, image_size=384, med=MEDSettings(losses=("lm",)),
                           data=DataConfig(batch_size=256, max_tokens=40, prompt="a picture of "),
                           optim=replace(finetune_optim, epochs=5))
    if task == "finetune-filter":  # ITC + ITM, 6 epochs, 35 tokens, every caption of an image is its positive
        return TrainConfig(task=task, image_size=384,
                           med=MEDSettings(losses=("itc", "itm"), same_image_positives=True),
                           data=DataConfig(batch_size=256, max_tokens=35), optim=replace(finetune_optim, epochs=6))
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


# --- model presets: --model NAME sets the model's shape and the trainer settings that go with it ------------------
@dataclass(frozen=True)
class TrainPreset:
    """What ``--model NAME`` sets beyond the model's shape (``capfilt.configs.PRESETS``); explicit flags win."""

    about: str  # one line for --help
    settings: dict  # flat settings for every task
    per_task: dict = field(default_factory=dict)  # task -> flat settings for that task only (after ``settings``)
    tokenizer: str = ""  # the tokenizer a run uses when neither --tokenizer nor --init gives one ("": none)
    sampling: str = ""  # a captioner folder's capfilt_sampling.json that exported captioners carry ("": none)


def _demo_tokenizer() -> str:
    """The shapes-world tokenizer of the installed demo captioner (the package's folder, not the cwd's)."""
    from capfilt.checkpoints import DEMO_MODELS

    return str(DEMO_MODELS / "captioner")


def _train_presets() -> dict[str, TrainPreset]:
    # The demo's values are `make demo-models`' (capfilt.models.presets, which capfilt.recipes.demo.DemoRecipe starts
    # from), except the pre-training warm-up: the recipe's 300 steps are for 750 steps of 200,000 pairs; a loop
    # on `make bootstrap`'s output (1,400 pairs kept) trains 21 steps an epoch, so 30.
    recipe, demo_vit, tiny_vit = DEMO_TRAINING, PRESETS["demo"][0], PRESETS["tiny"][0]
    shapes_world = "the shapes-world tokenizer shipped in capfilt/demo_models/captioner"
    finetune = dict(lr=recipe.finetune_lr, schedule="step", warmup_steps=0, freeze_vision=recipe.freeze_vision)
    return {
        "tiny": TrainPreset(
            about=f"a 2-layer, 32-wide MED for tests and smoke runs; {shapes_world}",
            settings=dict(image_size=tiny_vit.image_size, patch_size=tiny_vit.patch_size, batch_size=8,
                          queue_size=64, lr=1e-3, warmup_steps=10),
            tokenizer=_demo_tokenizer()),
        "demo": TrainPreset(
            about=f"the shapes-world demo MED (4 layers, 128 wide), `make demo-models`' recipe (capfilt.recipes.demo); "
                  f"{shapes_world}; exported captioners get its capfilt_sampling.json",
            settings=dict(image_size=demo_vit.image_size, patch_size=recipe.patch_size,
                          vision_position_init=recipe.vision_position_init, batch_size=recipe.batch_size,
                          queue_size=recipe.queue_size, max_tokens=recipe.max_tokens, augment=False),
            per_task={"pretrain": dict(lr=recipe.pretrain_lr, warmup_steps=30),
                      "finetune-captioner": finetune, "finetune-filter": dict(finetune, positives="text")},
            tokenizer=_demo_tokenizer(), sampling=str(Path(_demo_tokenizer()) / SAMPLING_FILE)),
        "base": TrainPreset(
            about="BLIP w/ ViT-B/16 + BERT-base (224 px pre-training, 384 fine-tuning): every value BLIP's; "
                  "needs --tokenizer (bert-base-uncased)", settings={}),
        "large": TrainPreset(
            about="BLIP w/ ViT-L/16 + BERT-base: as base, pre-training lr 2e-4 (paper §4.1) and gradient "
                  "checkpointing (the original's vit_grad_ckpt); needs --tokenizer (bert-base-uncased)",
            settings=dict(gradient_checkpointing=True), per_task={"pretrain": dict(lr=2e-4)}),
    }


TRAIN_PRESETS = _train_presets()
if set(TRAIN_PRESETS) != set(PRESETS):
    raise AssertionError(f"train presets {sorted(TRAIN_PRESETS)} differ from capfilt.configs {sorted(PRESETS)}")

# How to get BERT's tokenizer onto a machine that cannot download it (base and large ship none).
BERT_TOKENIZER_HELP = (
    "BLIP's tokenizer is bert-base-uncased's WordPiece plus [DEC] and [ENC] (added on load). It is not shipped: on "
    "a machine with internet run `hf download bert-base-uncased vocab.txt tokenizer_config.json tokenizer.json "
    "--local-dir bert-base-uncased` (or use the folder of a downloaded BLIP checkpoint such as "
    "Salesforce/blip-image-captioning-large, which holds its tokenizer files), copy the folder here and pass "
    "--tokenizer bert-base-uncased (a folder, or its vocab.txt)")


def preset_settings(model: str, task: str) -> dict:
    """The flat settings that ``--model model`` gives ``task`` ({} for a config.json)."""
    preset = TRAIN_PRESETS.get(model)
    if preset is None:
        return {}
    return {**preset.settings, **preset.per_task.get(task, {})}


# --- settings by flat name: configure(...) and the command line ------------------------------
SECTIONS = ("med", "data", "augment", "optim")
DERIVED = ("prompt_length",)  # computed from data.prompt and the tokenizer


def _settings() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Every setting's flat name -> (its section, or None for a top-level one; its field)."""
    default, found = TrainConfig(), {}
    for top in dataclasses.fields(TrainConfig):
        if top.name in SECTIONS:
            entries = [(item, top.name) for item in dataclasses.fields(getattr(default, top.name))]
        else:
            entries = [(top, None)]
        for item, section in entries:
            if item.name in found:
                raise AssertionError(f"setting {item.name!r} is defined twice")
            if item.name not in DERIVED:
                found[item.name] = (section, item)
    return found


SETTINGS = _settings()


# --- help texts: each flag's field comment, unit and defaults (written once, where the field is defined) -----------
# The unit of a setting whose comment does not give one.
UNITS = {
    "image_size": "pixels, square", "patch_size": "pixels", "seed": "integer", "checkpoint_every": "steps",
    "keep_checkpoints": "checkpoints", "log_every": "steps", "queue_size": "features", "batch_size": "pairs",
    "streams": "streams", "block_rows": "rows", "max_words": "words", "max_tokens": "tokens", "workers": "count",
    "prefetch": "batches", "lr": "learning rate", "weight_decay": "coefficient", "warmup_steps": "steps",
    "warmup_lr": "learning rate", "lr_decay": "factor per epoch", "min_lr": "learning rate", "epochs": "epochs",
    "max_steps": "steps", "max_seconds": "seconds", "alpha": "weight in [0, 1]", "momentum": "factor",
    "temp_init": "temperature", "temp_min": "temperature", "temp_max": "temperature",
    "label_smoothing": "probability", "crop_min_scale": "fraction of the area", "randaugment_ops": "ops",
}
# Settings whose field carries no comment of its own.
EXTRA_HELP = {"temp_min": "lower clamp of the learned ITC temperature, applied before every use",
              "temp_max": "upper clamp of the learned ITC temperature",
              "randaugment_magnitude": "RandAugment's strength: every op's magnitude, out of 10 (BLIP: 5)",
              "randaugment_ops": "RandAugment ops drawn per image (BLIP: 2)"}
REQUIRED = ("out", "data")  # no default: every run names them
_FIELD_LINE = re.compile(r"^(\w+)\s*:[^=#]*=[^#]*(?:#\s?(.*))?$")


def _field_comments(cls) -> dict[str, str]:
    """A dataclass's fields -> their comment in its source: the one on the field's line, else the lines above."""
    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        match = _FIELD_LINE.match(text)
        if match:
            comments[match.group(1)] = match.group(2) or " ".join(above)
        above = []
    return comments


def _value_text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if value == "" else str(value)


def _by_task(values: dict[str, object]) -> str:
    """``{task: value}`` as "V" when every task has V, else "V1 (task, task), V2 (task)"."""
    groups: dict[str, list[str]] = {}
    for task, value in values.items():
        groups.setdefault(_value_text(value), []).append(task)
    if len(groups) == 1 and len(values) == len(TASKS):
        return next(iter(groups))
    return ", ".join(f"{text} ({', '.join(tasks)})" for text, tasks in groups.items())


def _preset_values(preset: str, name: str) -> dict[str, object]:
    """``{task: value}`` where the preset sets ``name`` to other than the task's default."""
    values = {task: preset_settings(preset, task).get(name, _setting(task_config(task), name)) for task in TASKS}
    return {task: value for task, value in values.items() if value != _setting(task_config(task), name)}


def _setting(config: TrainConfig, name: str):
    section, _ = SETTINGS[name]
    return getattr(getattr(config, section) if section else config, name)


def setting_help(name: str) -> str:
    """The --help text of a setting: its comment, unit, the tasks' defaults and what each preset sets."""
    section, item = SETTINGS[name]
    owner = {"med": MEDSettings, "data": DataConfig, "augment": AugmentConfig, "optim": OptimConfig}.get(
        section, TrainConfig)
    comment = EXTRA_HELP.get(name) or _field_comments(owner).get(name) or name.replace("_", " ")
    unit = f"{UNITS[name]}; " if name in UNITS else ""
    defaults = "required" if name in REQUIRED else \
        f"default {_by_task({task: _setting(task_config(task), name) for task in TASKS})}"
    text = f"{comment} [{unit}{defaults}"
    for preset in TRAIN_PRESETS:
        values = _preset_values(preset, name)
        if values:
            text += f"; --model {preset}: {_by_task(values)}"
    return (text + "]").replace("%", "%%")


def presets_help() -> str:
    """The --help section that lists the presets."""
    lines = ["model presets (--model NAME; explicit flags override what a preset sets):"]
    for name, preset in TRAIN_PRESETS.items():
        vit, text = PRESETS[name]
        shape = (f"ViT {vit.depth}x{vit.width} patch {vit.patch_size}, text {text.num_layers}x{text.hidden_size}")
        names = dict.fromkeys(setting for task in TASKS for setting in preset_settings(name, task))
        sets = {setting: _by_task(values) for setting in names if (values := _preset_values(name, setting))}
        settings = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in sets.items())
        text = (f"{name}: {preset.about}. {shape}." + (f" Sets {settings}." if settings else "")
                + (f" Tokenizer: {preset.tokenizer}." if preset.tokenizer else ""))
        lines.append(textwrap.fill(text, width=118, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def configure(task: str, **overrides) -> TrainConfig:
    """``task_config(task)``, then what the ``model`` preset sets (``TRAIN_PRESETS``), then ``overrides`` by flat
    name, e.g. ``configure("pretrain", model="demo", lr=1e-4, data=[...])``."""
    config = task_config(task)
    model = overrides.get("model", config.model)
    settings = preset_settings(model, task)
    preset = TRAIN_PRESETS.get(model)
    if preset and preset.tokenizer and not overrides.get("init"):  # with --init, the tokenizer its weights came with
        settings["tokenizer"] = preset.tokenizer
    top, sections = {}, {name: {} for name in SECTIONS}
    for name, value in {**settings, **overrides}.items():
        if name not in SETTINGS or name == "task":
            raise TypeError(f"unknown setting {name!r}; see capfilt.models.train.TrainConfig and its sections")
        section, _ = SETTINGS[name]
        value = tuple(value) if isinstance(value, list) else value
        (sections[section] if section else top)[name] = value
    return replace(config, **top, **{s: replace(getattr(config, s), **v) for s, v in sections.items() if v})


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


# --- building the pieces ----------------------------------------------------------------------
def model_config(config: TrainConfig, tokenizer) -> BlipConfig:
    """The run's ``BlipConfig``: a preset, or a config.json, at ``image_size``, fitted to ``tokenizer``."""
    if config.model in PRESETS:
        return preset_config(config.model, image_size=config.image_size, patch_size=config.patch_size or None,
                             tokenizer=tokenizer)
    path = Path(config.model)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"model {config.model!r} is neither a preset ({sorted(PRESETS)}) nor a config.json")
    blip = BlipConfig.from_json_file(str(path))
    blip.vision_config.image_size = config.image_size
    if config.patch_size:
        blip.vision_config.patch_size = config.patch_size
    check_patch_size(config.image_size, blip.vision_config.patch_size)
    if blip.text_config.vocab_size != len(tokenizer):
        raise ValueError(f"{path}: vocabulary {blip.text_config.vocab_size} but the tokenizer has {len(tokenizer)}")
    return blip


def _tokenizer(config: TrainConfig, out: Path):
    """``--tokenizer``, else the ``--init`` folder's (an HF folder or a capfilt run), else the run's own, else the
    preset's (tiny and demo: the shapes-world tokenizer)."""
    preset = TRAIN_PRESETS.get(config.model)
    if config.tokenizer:
        try:
            return load_tokenizer(config.tokenizer)
        except TokenizerNotFoundError as error:
            raise TokenizerNotFoundError(f"{error}{_how_to_get_a_tokenizer(config)}") from None
    candidates = [out / "tokenizer"]
    if config.init and Path(config.init).is_dir():
        init = Path(config.init)
        candidates = [init, init / "tokenizer", init.parent.parent / "tokenizer"] + candidates
    if preset and preset.tokenizer:
        candidates.append(Path(preset.tokenizer))
    for candidate in candidates:
        try:
            return load_tokenizer(candidate)
        except TokenizerNotFoundError:
            continue
    raise FileNotFoundError(f"no tokenizer for this run (looked in {', '.join(map(str, candidates))}). Pass "
                            f"--tokenizer FOLDER_OR_VOCAB_TXT{_how_to_get_a_tokenizer(config)}")


def _how_to_get_a_tokenizer(config: TrainConfig) -> str:
    """The end of a missing-tokenizer error: the presets that bring one, and how to get BERT's offline."""
    shipped = [name for name, preset in TRAIN_PRESETS.items() if preset.tokenizer]
    if config.model in shipped:
        return f". --model {config.model} brings {TRAIN_PRESETS[config.model].tokenizer}, used without --tokenizer"
    text = (f". The presets {' and '.join(shipped)} bring the shapes-world tokenizer (e.g. --model demo for a "
            f"loop on `make bootstrap`'s output); --model {config.model} brings none")
    if config.model in ("base", "large") or config.model not in TRAIN_PRESETS:
        text += ". " + BERT_TOKENIZER_HELP
    return text


def _sampling_file(config: TrainConfig) -> Path | None:
    """The captioner sampling defaults this run carries: those of the ``--init`` source (a captioner folder, or a
    run or checkpoint that has them), else its preset's (demo); None for a run without LM (the filter's)."""
    if "lm" not in config.med.losses:
        return None
    if config.init:
        found = find_sampling_file(config.init)
        if found is not None:
            return found
    preset = TRAIN_PRESETS.get(config.model)
    return Path(preset.sampling) if preset and preset.sampling else None


def _too_little_data(files: list[str], counts: dict[str, int], config: TrainConfig, streams: int) -> str:
    """The error for data that makes no global batch: what was found, what a batch needs, what to pass."""
    batch, rows = config.data.batch_size, sum(counts.get(path, 0) for path in files)
    stream_rows = [sum(counts.get(path, 0) for path in group)
                   for group in epoch_streams(files, streams, 0, config.seed, config.data.shuffle)]
    text = (f"too little data for one step: {len(files)} file(s) hold {rows} pair(s) with an image, and a global batch "
            f"is {batch} pairs (--batch-size)")
    if streams > 1:
        text += (f", {batch // streams} from each of {streams} streams, whose files hold {min(stream_rows)} to "
                 f"{max(stream_rows)} pairs")
    largest = min(stream_rows) * streams
    if not largest:
        return text + f". A stream has no data: pass fewer --streams (at most {len(files)}, one file each) or more data"
    text += f". Pass a smaller --batch-size (at most {largest}"
    if "itc" in config.med.losses:
        text += f"; the ITC queue, --queue-size {config.med.queue_size}, must stay a multiple of it"
    return text + ") or more data (--data takes several files, folders or globs)"


def _check(config: TrainConfig, streams: int, world: distributed.World) -> None:
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


class ProgressLog:
    """Every ``every`` steps: losses averaged over ranks, a log line and a ``log.jsonl`` record (rank 0)."""

    def __init__(self, path: Path, every: int, total_steps: int, batch_size: int, is_main: bool,
                 max_seconds: float = 0.0, report_skipped: bool = False):
        self.path, self.every, self.total, self.batch = path, max(every, 1), total_steps, batch_size
        self.max_seconds, self.report_skipped = max_seconds, report_skipped
        self.is_main = is_main
        self.last_time, self.last_step, self.start = time.perf_counter(), None, time.perf_counter()

    def update(self, state: TrainState, losses: dict[str, torch.Tensor], lr: float, alpha: float,
               force: bool = False) -> dict | None:
        if self.last_step is None:
            self.last_step = state.step - 1
        if state.step % self.every and not force:
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
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            losses_text = " ".join(f"{n} {float(v):.4f}" for n, v in zip(names, values))
            eta = record["eta_s"]
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 else f"{eta / 86400:.1f} days"
            skipped_text = "" if not any(state.skipped.values()) else (
                " | skipped %(files)d file(s), %(row_groups)d row group(s), %(rows)d row(s)" % state.skipped)
            log.info("step %d/%d epoch %d | %s | lr %.2e | %.1f samples/s | eta %s%s", state.step, self.total,
                     state.epoch, losses_text, lr, record["samples_per_s"], eta_text, skipped_text)
        return record


class _SkipCounts:
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


def _run_files(found: list[str], counts: dict[str, int], unreadable: list[Skipped], state: TrainState,
               resumed: bool, is_main: bool) -> list[str]:
    """The files this run reads: ``found`` less what is left out as unreadable (``check_files``' ``unreadable``,
    which only --skip-bad-files leaves non-empty).

    A new run leaves out the files whose footer does not read and records them in its state (so in every
    checkpoint). A resumed run leaves out exactly the files its checkpoint records: which files each stream
    reads, and so what its position means, stays the run's from its start, and the steps per epoch stay the
    same. Such a file that reads again stays out (train on it in a new run); a file the run has been reading that
    no longer reads stays in its stream's list with 0 rows and is skipped where its stream reaches it.
    """
    if not resumed:
        if is_main:
            for item in unreadable:
                log.warning("left out %s", item)
        state.left_out = [os.path.abspath(item.path) for item in unreadable]
        state.skipped["files"] += len(unreadable)
        bad = {item.path for item in unreadable}
        return [path for path in found if path not in bad]
    recorded = set(state.left_out)
    files = [path for path in found if os.path.abspath(path) not in recorded]
    for path in found:
        if is_main and os.path.abspath(path) in recorded and path in counts:
            log.warning("%s reads now but stays left out, as the run that wrote the checkpoint left it out "
                        "(start a new run to train on it)", path)
    for item in unreadable:
        if os.path.abspath(item.path) in recorded:
            if is_main:
                log.warning("left out %s, as since the run's start", item)
        else:
            counts[item.path] = 0
            if is_main:
                log.warning("%s no longer reads (%s); this run has been reading it, so it stays in its stream "
                            "and is skipped where the stream reaches it", item.path, item.error)
    return files


def _truncate_log(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a resumed run starts from)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


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


# --- the loop ---------------------------------------------------------------------------------
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
class _Run:
    """What a run trains: the MED (and its DDP wrapper), optimizer, counters, and what checkpoints record."""

    tokenizer: object
    blip_config: BlipConfig
    med: MED
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState
    info: dict  # the configuration stored in every checkpoint
    resumed: bool


def _prepare(config: TrainConfig, world: distributed.World, out: Path) -> _Run:
    """Tokenizer, config, MED (random, ``init`` weights or the newest checkpoint's), optimizer, DDP."""
    tokenizer = _tokenizer(config, out)
    out.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        tokenizer.save_pretrained(out / "tokenizer")
        sampling = _sampling_file(config)
        if sampling is not None:  # the run's captioner samples as its source did; export copies it on
            check_sampling_file(sampling)
            (out / SAMPLING_FILE).write_bytes(sampling.read_bytes())
    blip_config = model_config(config, tokenizer)
    settings = replace(config.med, prompt_length=prompt_length(tokenizer, config.data.prompt))
    torch.manual_seed(config.seed)
    med = MED(blip_config, special_ids(tokenizer), settings)
    if config.vision_position_init == "sincos":
        init_sincos_positions(med)
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None and not config.resume:
        raise ValueError(f"{out} already holds checkpoints ({checkpoint.name}); use another --out to start over")
    if checkpoint is None and config.init:
        from capfilt.models.weights import load_med_weights

        load_med_weights(med, config.init)
    if config.gradient_checkpointing:
        med.enable_gradient_checkpointing()
    med.to(world.device)
    optimizer = torch.optim.AdamW([p for p in med.parameters() if p.requires_grad], lr=config.optim.lr,
                                  weight_decay=config.optim.weight_decay)
    torch.manual_seed(seed_for(config.seed, world.rank))  # dropout masks differ between ranks
    info = {"train": config_dict(config), "blip": blip_config.to_dict(), "med": dataclasses.asdict(settings),
            "streams": config.data.streams or world.size}
    state = TrainState()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, med, optimizer, world.device, expect=info)
        if world.is_main:
            _truncate_log(out / "log.jsonl", state.step)
        log.info("resuming from %s (step %d, epoch %d)", checkpoint, state.step, state.epoch)
    # Queues are the same on every rank: no buffer sync. Only ITC alone leaves parameters (cross-attention) unused.
    model = med if world.size == 1 else DistributedDataParallel(
        med, device_ids=[world.device] if world.device.type == "cuda" else None, forward_sync_buffers=False,
        find_unused_parameters=not {"itm", "lm"} & set(settings.losses))
    return _Run(tokenizer, blip_config, med, model, optimizer, state, info, checkpoint is not None)


def _train(config: TrainConfig, world: distributed.World) -> dict:
    streams = config.data.streams or world.size
    _check(config, streams, world)
    out, found = Path(config.out), find_files(config.data.data)
    # Every footer is read before the run folder is touched: an unreadable file stops the run here, named,
    # unless --skip-bad-files leaves it out.
    counts, unreadable = check_files(found, config.data.skip_bad_files)
    run = _prepare(config, world, out)
    state, optim = run.state, config.optim
    files = _run_files(found, counts, unreadable, state, run.resumed, world.is_main)
    if not files:
        raise ValueError(f"none of the {len(found)} Parquet file(s) of {list(config.data.data)} can be read")
    first_epoch_steps = steps_in_epoch(files, config.data, streams, 0, config.seed, counts)
    if first_epoch_steps < 1:
        raise ValueError(_too_little_data(files, counts, config, streams))
    progress = ProgressLog(out / "log.jsonl", config.log_every, optim.max_steps or first_epoch_steps * optim.epochs,
                           config.data.batch_size, world.is_main, optim.max_seconds, config.data.skip_bad_files)
    skips = _SkipCounts(state, world.device, config.data.skip_bad_files)

    started, out_of_time = time.monotonic(), False

    def done() -> bool:
        return (bool(optim.max_steps) and state.step >= optim.max_steps) or out_of_time

    def checkpoint() -> None:
        skips.flush()
        save_checkpoint(out, run.med, run.optimizer, state, run.info, config.keep_checkpoints)

    record, saved_step, losses, lr, alpha = None, state.step if run.resumed else -1, {}, 0.0, 0.0
    run.model.train()
    while state.epoch < optim.epochs and not done():
        loader = EpochLoader(files, config.data, run.tokenizer, run.blip_config.vision_config.image_size,
                             config.augment, seed=config.seed, epoch=state.epoch, streams=streams, rank=world.rank,
                             world_size=world.size, positions=state.positions)
        try:
            for batch in _together(loader, world.device):
                lr = learning_rate(optim, state.epoch, state.step_in_epoch)
                alpha = itc_alpha(optim, state.epoch, state.step_in_epoch, first_epoch_steps)
                losses = _step(run.model, run.optimizer, batch, lr, alpha, seed_for(config.seed, state.step),
                               config, world)
                state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
                state.positions = batch.positions
                skips.add(batch.skipped)
                if state.step % progress.every == 0:
                    skips.flush()
                if optim.max_seconds:  # every rank stops after the same step
                    out_of_time = not distributed.all_ranks_true(time.monotonic() - started < optim.max_seconds,
                                                                 world.device)
                record = progress.update(state, losses, lr, alpha) or record
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    checkpoint()
                    saved_step = state.step
                if done():
                    break
        finally:
            loader.close()
        if not done():
            if loader.finished:  # told, not counted: what a stream meets as it runs out depends on the processes
                for item in loader.tail_skipped:
                    log.warning("skipped %s, met as epoch %d ended (not in the counts)", item, state.epoch)
            state.epoch, state.step_in_epoch, state.positions = state.epoch + 1, 0, {}
    if losses and state.step % config.log_every:
        skips.flush()
        record = progress.update(state, losses, lr, alpha, force=True)
    if config.checkpoint_every and saved_step != state.step:
        checkpoint()
    stopped, why = _stop_reason(config, state.step, out_of_time, first_epoch_steps)
    log.info("%s", why)
    if config.export and config.task in EXPORT_ROLE and world.is_main:
        from capfilt.models.export import export

        role = EXPORT_ROLE[config.task]
        sampling = out / SAMPLING_FILE if role == "captioner" and (out / SAMPLING_FILE).is_file() else None
        log.info("exported the %s to %s%s", role, export(run.med, run.tokenizer, role, out / role, sampling),
                 f" with the sampling defaults of {_sampling_file(config)}" if sampling else "")
    distributed.barrier()
    return {**(record or {}), "stopped": stopped, "stop_reason": why}


def _stop_reason(config: TrainConfig, step: int, out_of_time: bool, first_epoch_steps: int) -> tuple[str, str]:
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


# --- command line -----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m capfilt.models.train", description="Pre-train the MED or fine-tune the captioner / filter.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=presets_help() + "\n\n" + textwrap.fill(
            "Every other setting defaults to the task's BLIP value (capfilt.models.train.task_config); "
            "--print-config shows the resolved configuration. The demo loop on `make bootstrap`'s output "
            "(docs/training.md):", width=118) + "\n  python -m capfilt.models.train pretrain --model demo "
               "--data out/bootstrap/kept --out runs/pretrain")
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    for name, (section, item) in SETTINGS.items():
        if name == "task":
            continue
        flag, text = "--" + name.replace("_", "-"), setting_help(name)
        if item.type == "bool":
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif item.type.startswith("tuple"):
            parser.add_argument(flag, dest=name, nargs="+", default=None, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}[item.type]
            parser.add_argument(flag, dest=name, type=kind, default=None, help=text,
                                **({"metavar": "NAME_OR_CONFIG"} if name == "model" else {}))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("task", "print_config")}
    config = configure(args.task, **overrides)
    if args.print_config:
        print(json.dumps(config_dict(config), indent=2))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if os.environ.get("RANK", "0") != "0":  # one process reports progress
        logging.getLogger().setLevel(logging.WARNING)
    try:
        train(config)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
