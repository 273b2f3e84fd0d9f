"""What a run trains, built from its configuration: the tokenizer, the ``BlipConfig``, the MED (random, ``init``
weights or the newest checkpoint's), the optimizer and the DDP wrapper; the run folder's ``tokenizer/`` and
captioner sampling defaults are written on the way."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import BlipConfig

from capfilt.configs import PRESETS, check_patch_size, preset_config
from capfilt.models import distributed
from capfilt.models.checkpointing import TrainState, config_dict, latest_checkpoint, load_checkpoint
from capfilt.models.config import TrainConfig
from capfilt.models.data import seed_for
from capfilt.models.export import SAMPLING_FILE, check_sampling_file, find_sampling_file
from capfilt.models.med import MED, init_sincos_positions, prompt_length
from capfilt.models.presets import BERT_TOKENIZER_HELP, TRAIN_PRESETS
from capfilt.models.progress import truncate_log
from capfilt.tokenizer import TokenizerNotFoundError, load_tokenizer, special_ids

log = logging.getLogger("capfilt.train")


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


def run_tokenizer(config: TrainConfig, out: Path):
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


def sampling_file(config: TrainConfig) -> Path | None:
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


@dataclass
class Run:
    """What a run trains: the MED (and its DDP wrapper), optimizer, counters, and what checkpoints record."""

    tokenizer: object
    blip_config: BlipConfig
    med: MED
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState
    info: dict  # the configuration stored in every checkpoint
    resumed: bool


def _write_run_folder(config: TrainConfig, out: Path, tokenizer) -> None:
    """The run's ``tokenizer/`` and, for a captioner, the sampling defaults its source had (export copies them on)."""
    tokenizer.save_pretrained(out / "tokenizer")
    sampling = sampling_file(config)
    if sampling is not None:
        check_sampling_file(sampling)
        (out / SAMPLING_FILE).write_bytes(sampling.read_bytes())


def prepare_run(config: TrainConfig, world: distributed.World, out: Path) -> Run:
    """Tokenizer, config, MED (random, ``init`` weights or the newest checkpoint's), optimizer, DDP."""
    tokenizer = run_tokenizer(config, out)
    out.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        _write_run_folder(config, out, tokenizer)
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
            truncate_log(out / "log.jsonl", state.step)
        log.info("resuming from %s (step %d, epoch %d)", checkpoint, state.step, state.epoch)
    # Queues are the same on every rank: no buffer sync. Only ITC alone leaves parameters (cross-attention) unused.
    model = med if world.size == 1 else DistributedDataParallel(
        med, device_ids=[world.device] if world.device.type == "cuda" else None, forward_sync_buffers=False,
        find_unused_parameters=not {"itm", "lm"} & set(settings.losses))
    return Run(tokenizer, blip_config, med, model, optimizer, state, info, checkpoint is not None)

