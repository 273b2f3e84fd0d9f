"""The trainer's configuration: ``TrainConfig`` and its sections, and BLIP's values for each task.

Every field carries its ``--help`` text in ``field(metadata=...)`` (see ``setting``): the command line
(``capfilt.models.flag_help``) reads it from there, so a default is documented where it is defined. Defaults
are BLIP pre-training's (paper §4.1, the original ``configs/pretrain.yaml``); ``task_config`` gives each task
its values (``configs/caption_coco.yaml``, ``configs/retrieval_coco.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from capfilt.configs import DEMO_VIT, PRESETS

TASKS = ("pretrain", "finetune-captioner", "finetune-filter")
LOSSES = ("itc", "itm", "lm")  # paper §3.2: image-text contrastive, image-text matching, language modelling


def setting(default, text: str, unit: str = "", *, required: bool = False, derived: bool = False):
    """A configuration field whose ``--help`` text is ``text``: ``field(metadata={"help": text, ...})``.

    ``unit``: what --help shows before the defaults, where ``text`` gives none. ``required``: no usable default,
    every run names it. ``derived``: computed by the trainer from other settings (no flag).
    """
    return field(default=default, metadata={"help": text, "unit": unit, "required": required, "derived": derived})


def section(kind: type, text: str):
    """A field holding one section of settings (a dataclass of its own), each of its fields a flag."""
    return field(default_factory=kind, metadata={"help": text, "section": True})


@dataclass(frozen=True)
class MEDSettings:
    """The MED's hyper-parameters; defaults are BLIP pre-training's (paper §3.2, ``configs/pretrain.yaml``)."""

    losses: tuple[str, ...] = setting(
        LOSSES, 'objectives to build for: pretrain all; captioner ("lm",); filter ("itc", "itm")')
    queue_size: int = setting(
        57600, "ITC feature queue (paper/pretrain.yaml); a multiple of the global batch", "features")
    momentum: float = setting(0.995, "momentum encoders: p_m <- m p_m + (1 - m) p, every step", "factor")
    temp_init: float = setting(0.07, "learned ITC temperature, initial value", "temperature")
    temp_min: float = setting(
        0.001, "lower clamp of the learned ITC temperature, applied before every use", "temperature")
    temp_max: float = setting(0.5, "upper clamp of the learned ITC temperature", "temperature")
    label_smoothing: float = setting(0.1, "LM cross-entropy label smoothing", "probability")
    prompt_length: int = setting(
        0, 'leading decoder tokens ([DEC] + prompt) not trained on; 4 for "a picture of "', derived=True)
    same_image_positives: bool = setting(
        False, "ITC/ITM: all pairs of one image are positives (retrieval fine-tuning)")
    freeze_vision: bool = setting(
        False, "Train the text side only: the ViT keeps the weights it was loaded with (no gradient, no dropout). "
               "capfilt's, not BLIP's: BLIP fine-tunes the ViT too.")

    def __post_init__(self):
        unknown = set(self.losses) - set(LOSSES)
        if unknown or not self.losses:
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {self.losses}")
        if "itm" in self.losses and "itc" not in self.losses:
            raise ValueError("ITM draws its hard negatives from ITC similarities: 'itm' needs 'itc'")
        if self.queue_size < 1 or not 0 <= self.momentum <= 1 or not 0 < self.temp_min <= self.temp_max:
            raise ValueError(f"bad ITC settings: {self}")


@dataclass(frozen=True)
class DataConfig:
    """What is read and how batches are made; defaults are BLIP pre-training's."""

    data: tuple[str, ...] = setting((), "Parquet files, folders of them or glob patterns", required=True)
    batch_size: int = setting(2880, "global batch: 2880 for ViT-B pre-training (paper §4.1)", "pairs")
    streams: int = setting(
        0, "file streams per global batch; 0 = one per process. Fix it to compare runs across world sizes", "streams")
    shuffle: bool = setting(True, "shuffle the file order each epoch and the rows within each block")
    block_rows: int = setting(1024, "rows read (and shuffled) at a time per stream: bounds memory", "rows")
    max_words: int = setting(30, "captions cut to 30 words (BLIP's pre_caption)", "words")
    max_tokens: int = setting(
        30, "token length, padded/truncated: 30 pre-training, 40 captioner, 35 filter (BLIP)", "tokens")
    prompt: str = setting("", 'prepended to every caption: "a picture of " for the captioner (BLIP)')
    workers: int = setting(4, "threads (or processes, below) that decode and augment images", "count")
    worker_processes: bool = setting(
        False, "Decode in spawned worker processes instead of threads. Decoding and augmenting an image is mostly "
               "GIL-holding Python and Pillow work, so more threads do not decode faster (bench/bench_loader.py "
               "measures both): threads are enough for a CPU, not for a GPU. Batches are the same either way.")
    prefetch: int = setting(2, "batches prepared ahead of the training step", "batches")
    positives: str = setting(
        "image", 'What makes two pairs positives for ITC/ITM when same_image_positives is on: "image", the same '
                 "image bytes (BLIP's retrieval fine-tuning: COCO's five captions of an image); \"text\", the same "
                 "normalised caption (worlds where many images share one exact caption, such as the shapes world, "
                 'whose in-batch "negatives" would otherwise often be correct captions).')
    negatives: str = setting(
        "", "A column of texts known to be wrong for their row's image (null where a row has none): ITM then uses a "
            "row's text as its image's hard negative text instead of one drawn by ITC similarity. \"\" (BLIP): no "
            'such column. The shapes world writes two: "negative_caption" and "replaced_caption" '
            "(capfilt.shapes.negatives).")
    skip_bad_files: bool = setting(
        False, "A Parquet file or row group that cannot be read (no footer, a garbled page): False (default) stops "
               "with an error naming it, as losing training data should be a decision; True leaves it out (each "
               "one logged, counted in log.jsonl and the checkpoint) and trains on. Either way a resume replays the "
               "uninterrupted run exactly.")

    def __post_init__(self):
        if self.positives not in ("image", "text"):
            raise ValueError(f"positives must be 'image' or 'text', not {self.positives!r}")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentations; defaults are BLIP fine-tuning's (pre-training: ``crop_min_scale=0.2``)."""

    augment: bool = setting(True, "False: only resize to a square (BLIP's evaluation transform)")
    crop_min_scale: float = setting(
        0.5, "random resized crop area in [min_scale, 1]: 0.2 pre-training, 0.5 fine-tuning", "fraction of the area")
    hflip: bool = setting(True, "flip with p 0.5 (paper); turn off where left/right matter (the shapes world)")
    randaugment: bool = setting(True, "RandAugment as in BLIP's recipe")
    randaugment_ops: int = setting(2, "RandAugment ops drawn per image (BLIP: 2)", "ops")
    randaugment_magnitude: int = setting(5, "RandAugment's strength: every op's magnitude, out of 10 (BLIP: 5)")
    render_jitter: float = setting(
        0.0, "capfilt's, not BLIP's: the probability that an image's rendering details are changed "
             "(``jitter_rendering``: size and position by a fraction, edge blur, colour curve, JPEG re-compression) "
             "before anything above. For synthetic worlds, so that a model learns the scene and not one renderer's "
             "habits (the demo models). 0: never.")
    render_jitter_each: float = setting(
        0.5, "The probability of each of ``jitter_rendering``'s four changes in a jittered image: 0.5 draws every "
             "mix of them equally often (all four together 1 time in 16); higher values put more changes on one "
             "image.")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule; defaults are BLIP pre-training's (paper §4.1, pretrain.yaml)."""

    lr: float = setting(
        3e-4, "peak lr: 3e-4 ViT-B, 2e-4 ViT-L pre-training; 1e-5 fine-tuning (caption/retrieval_coco.yaml)",
        "learning rate")
    weight_decay: float = setting(0.05, "AdamW, on every parameter as in the original", "coefficient")
    schedule: str = setting(
        "step", '"step": warm-up then lr * lr_decay**epoch; "cosine": per-epoch cosine to min_lr')
    warmup_steps: int = setting(3000, "linear warm-up over the first steps of epoch 0 (pretrain.yaml)", "steps")
    warmup_lr: float = setting(1e-6, "warm-up starts here (pretrain.yaml)", "learning rate")
    lr_decay: float = setting(0.85, "per epoch (paper; the released pretrain.yaml says 0.9)", "factor per epoch")
    min_lr: float = setting(1e-6, "floor: 1e-6 pre-training, 0 fine-tuning", "learning rate")
    epochs: int = setting(
        20, "20 pre-training (paper), 5 captioner, 6 filter (caption/retrieval_coco.yaml)", "epochs")
    max_steps: int = setting(0, "stop after this many steps in all (0: run every epoch)", "steps")
    max_seconds: float = setting(
        0.0, "Stop (checkpoint, export) after the first step that ends this many seconds after this process "
             "started training (0: no limit), for jobs with a wall-clock budget. The lr schedule does not depend on "
             "it.", "seconds")
    alpha: float = setting(
        0.4, "ITC soft-target weight; alpha * min(1, step / steps of epoch 0) in epoch 0", "weight in [0, 1]")


_BASE_PATCH = PRESETS["base"][0].patch_size  # large's too


@dataclass(frozen=True)
class TrainConfig:
    """A training run. ``task_config`` fills in each task's values."""

    task: str = setting("pretrain", "one of TASKS")
    out: str = setting("", "run folder: tokenizer, log.jsonl, checkpoints, exports", required=True)
    model: str = setting(
        "base", "A preset (tiny, demo, base, large: its shape and the trainer settings that go with it, listed in "
                "--help) or a transformers BlipConfig config.json (a file, or a folder holding one)")
    image_size: int = setting(224, "224 pre-training, 384 fine-tuning (paper §4.1)", "pixels, square")
    patch_size: int = setting(
        0, f"ViT patch side in pixels; 0 = the model's own ({_BASE_PATCH} for base and large, "
           f"{DEMO_VIT.patch_size} for demo)", "pixels")
    vision_position_init: str = setting(
        "random", 'How a randomly initialised ViT\'s position embeddings start: "random" (BLIP\'s truncated normal) '
                  'or "sincos" (2-D sine-cosine, MAE\'s; still trained). Weights from `init` or a checkpoint replace '
                  "either.")
    tokenizer: str = setting(
        "", 'A tokenizer folder or vocab.txt; "" = the --init folder\'s, else the run\'s own tokenizer/, else the '
            "preset's")
    init: str = setting(
        "", 'start from: a capfilt run/checkpoint, an HF captioner/filter folder, an original .pth; "" = random')
    seed: int = setting(42, "model init, data order, augmentation and ITM negatives derive from it", "integer")
    device: str = setting("", '"" = CUDA when present, else CPU')
    bf16: bool = setting(True, "bf16 autocast on CUDA (never on CPU)")
    gradient_checkpointing: bool = setting(
        False, "recompute activations in backward (the original's vit_grad_ckpt)")
    checkpoint_every: int = setting(
        1000, "steps between checkpoints, plus one at the end; 0 = never (no resume)", "steps")
    keep_checkpoints: int = setting(2, "newest checkpoints kept", "checkpoints")
    log_every: int = setting(50, "steps between log lines / log.jsonl records", "steps")
    resume: bool = setting(
        True, "continue from the newest checkpoint in `out`, if any (False: refuse to touch one)")
    export: bool = setting(True, "after fine-tuning, write the captioner/ or filter/ folder into `out`")
    med: MEDSettings = section(MEDSettings, "the MED's objectives and ITC/LM settings")
    data: DataConfig = section(DataConfig, "what is read and how batches are made")
    augment: AugmentConfig = section(AugmentConfig, "how training images are augmented")
    optim: OptimConfig = section(OptimConfig, "AdamW and the learning-rate schedule")


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
