"""`make demo-models`: train the shapes-world demo captioner and filter with capfilt's own MED.

The recipe is CapFilt's first half (paper §3.3, Fig. 3) in miniature:

1. render the ``human`` (clean captions, the COCO stand-in) and ``web``
   (noisy texts, the CC12M stand-in) splits (``capfilt.shapes``);
2. pre-train a MED (the ``demo`` preset) on human + web with ITC + ITM + LM;
3. from it, fine-tune the captioner (LM, prompt ``a picture of ``) and the
   filter (ITC + ITM) on ``human``, the two at once, one core each;
4. export both as HF-format folders into ``capfilt/demo_models/``, the
   captioner with a ``capfilt_sampling.json`` (its captions are short:
   ``min_length`` 5, ``max_length`` 20 tokens with the prompt).

Every stage resumes where it stopped (the training runs checkpoint), so an
interrupted ``make demo-models`` continues when run again. Departures from
BLIP's recipe, all for a 64 px world trained on 2 CPU cores: no random crops
or flips (a crop can cut an object out of its caption; a flip swaps ``left of``
and ``right of``; the renderer already varies backgrounds, noise, jitter and
edges), higher learning rates for a small model trained from scratch, the
filter treats pairs with the same caption as positives (many scenes share one
exact caption, so in-batch "negatives" would often be correct), and
fine-tuning trains the text side only, the ViT frozen as pre-training left it.
One addition: half the training images get changed rendering details
(``render_jitter``: size, edges, colour curve, JPEG), so that the models hold
up on another renderer's images (docs/demo.md, "Changed rendering").
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from capfilt.shipped import DEMO_MODELS
from capfilt.configs import DEMO_VIT
from capfilt.help_format import HelpWithDefaults
from capfilt.models.presets import DEMO_TRAINING
from capfilt.shapes.writer import NEGATIVE_COLUMNS

WORK = Path("runs/demo")
PRETRAIN_SEED = 42  # the shipped models' pre-training seed (TrainConfig's default)
PRETRAIN_WARMUP_STEPS = 300  # linear lr warm-up of the recipe's pre-training (BLIP's default is for far longer runs)


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes and steps of `make demo-models` (2 CPU cores); the shipped models started from GPU_RECIPE below."""

    human: int = 100_000  # human (clean) pairs, seed 11
    web: int = 100_000  # web (noisy) pairs, seed 12
    # The model's shape is capfilt.configs.DEMO_VIT/DEMO_TEXT; the training values start from
    # capfilt.models.presets.DEMO_TRAINING (what `--model demo` trains with; comments there).
    batch_size: int = DEMO_TRAINING.batch_size
    pretrain_steps: int = 750
    pretrain_lr: float = DEMO_TRAINING.pretrain_lr
    captioner_steps: int = 3000
    filter_steps: int = 1250
    finetune_lr: float = DEMO_TRAINING.finetune_lr
    queue_size: int = DEMO_TRAINING.queue_size
    max_tokens: int = DEMO_TRAINING.max_tokens
    patch_size: int = DEMO_VIT.patch_size
    vision_position_init: str = DEMO_TRAINING.vision_position_init
    # The human split's column of hard negative texts that the filter's fine-tuning gives ITM in place of drawn
    # ones (capfilt.shapes.negatives). "" (BLIP's): negatives drawn by ITC similarity only. "negative_caption":
    # two-object captions with their words swapped or the relation changed. "replaced_caption": half the captions
    # with one word replaced, a relation only by one on the other axis.
    negatives: str = ""
    # Fine-tuning trains the text side only, the ViT frozen as pre-training (or the models continued from) left it.
    freeze_vision: bool = DEMO_TRAINING.freeze_vision
    # The share of training images whose rendering details are changed (AugmentConfig.render_jitter: size, edges,
    # colour curve, JPEG), in every stage, so that the models read the world and not one renderer's habits
    # (docs/demo.md, "Changed rendering").
    render_jitter: float = 0.5
    render_jitter_each: float = 0.5  # the probability of each of those changes in a jittered image
    shard_size: int = 10_000  # pairs per rendered Parquet shard
    streams: int = 0  # loader streams of every stage (0: one, which reads the files one after another)
    pretrain_seconds: float = 0.0  # wall-clock limit of pre-training (0: none; the steps above end it)
    finetune_seconds: float = 0.0  # wall-clock limit of each fine-tune, which run side by side (0: none)
    # Wall-clock budget of all training, which `split_budget` deals out (a lent machine's time per command);
    # when set it replaces the two limits above. 0: use them as given.
    train_seconds: float = 0.0
    loader_workers: int = 2  # decoders of pre-training; each fine-tune gets half
    decode_in: str = "threads"  # "threads" or "processes" (DataConfig.worker_processes: threads suffice on CPU)
    render_processes: int = 1  # processes that render the splits
    checkpoint_every: int = 250  # steps between training checkpoints (what an interrupted run resumes from)
    # Installed demo models (a folder with captioner/ and filter/) to go on fine-tuning instead of pre-training a
    # new MED: "" trains from scratch. Their own recipe is kept in capfilt_recipe.json under "continued".
    continue_from: str = ""
    # With continue_from: the filter goes on from its own text side on the captioner's ViT, so that both models
    # read one image encoder, as two fine-tunes of one pre-trained MED with the ViT frozen do. No effect without
    # continue_from (both fine-tunes then start from one pre-training).
    shared_vision: bool = False

    def __post_init__(self):
        if self.negatives not in NEGATIVE_CHOICES:
            raise ValueError(f"negatives must be one of {NEGATIVE_CHOICES}, not {self.negatives!r}")


NEGATIVE_CHOICES = ("", *NEGATIVE_COLUMNS)  # DemoRecipe.negatives: none (BLIP's) or a column of the human split


# `python -m capfilt.recipes.demo --gpu`: the same model and data on one GPU with 16 CPU cores. Every stage runs to its
# wall-clock limit instead of a step count (the steps reached go into capfilt_recipe.json); 16 files per split so
# that 16 streams mix files within every batch. Batch 256, 4x the CPU recipe's (a GPU step of this small model
# costs about as much at 256 as at 64: bench/bench_gpu_step.py), so the learning rates are the CPU recipe's times 2,
# the square root of 4. The ViT starts from 2-D sin-cos positions (MAE's; capfilt.models.med.init_sincos_positions).
GPU_RECIPE = DemoRecipe(shard_size=6_250, streams=16, batch_size=256, pretrain_lr=1e-3, finetune_lr=4e-4,
                        vision_position_init="sincos", pretrain_steps=10**7, captioner_steps=10**7,
                        filter_steps=10**7, pretrain_seconds=170.0, finetune_seconds=220.0, loader_workers=14,
                        decode_in="processes", render_processes=16, checkpoint_every=2_000)


PRETRAIN_SHARE = 0.45  # of ``train_seconds``, when pre-training; the rest goes to the fine-tunes (side by side)


def split_budget(recipe: DemoRecipe) -> DemoRecipe:
    """``train_seconds`` dealt out: 45% pre-training, 55% fine-tuning; all of it fine-tuning when continuing."""
    if recipe.train_seconds <= 0:
        return recipe
    if recipe.continue_from:
        return replace(recipe, pretrain_seconds=0.0, finetune_seconds=recipe.train_seconds)
    pretrain_seconds = recipe.train_seconds * PRETRAIN_SHARE
    return replace(recipe, pretrain_seconds=pretrain_seconds, finetune_seconds=recipe.train_seconds - pretrain_seconds)


def split_folders(work: Path) -> dict[str, Path]:
    """Where the rendered ``human`` and ``web`` splits live in the work folder."""
    return {"human": work / "data" / "human", "web": work / "data" / "web"}


def needed_splits(recipe: DemoRecipe) -> tuple[str, ...]:
    """Going on from installed models only fine-tunes, on ``human``: the ``web`` split is not needed."""
    return ("human",) if recipe.continue_from else ("human", "web")


def write_splits(recipe: DemoRecipe, work: Path) -> dict[str, Path]:
    """Render the splits the recipe needs (``needed_splits``) and the shapes-world tokenizer into ``work`` (once).

    ``human`` carries the hard negatives' columns; a ``human`` split rendered
    before it had the one the recipe reads (``negatives``) is rendered again.
    """
    import pyarrow.parquet as pq

    from capfilt.shapes import VOCABULARY, write_split
    from capfilt.vocab import compact_tokenizer

    def ready(split: str, folder: Path) -> bool:
        shards = sorted(folder.glob("*.parquet"))
        needs_negatives = split == "human" and bool(recipe.negatives)
        return (folder / "_done").exists() and bool(shards) and (
            not needs_negatives or recipe.negatives in pq.read_schema(shards[0]).names)

    folders = split_folders(work)
    for (split, folder), (n, seed) in zip(folders.items(), ((recipe.human, 11), (recipe.web, 12))):
        if split in needed_splits(recipe) and not ready(split, folder):
            write_split(split, n, seed, folder, shard_size=recipe.shard_size, overwrite=True,
                        processes=recipe.render_processes, negatives=split == "human")
            (folder / "_done").touch()
    tokenizer = compact_tokenizer([*VOCABULARY, "picture"], work / "tokenizer")
    tokenizer.save_pretrained(work / "tokenizer")
    return folders


def _common(recipe: DemoRecipe, work: Path) -> dict:
    return dict(model="demo", image_size=DEMO_VIT.image_size, patch_size=recipe.patch_size,
                vision_position_init=recipe.vision_position_init, tokenizer=str(work / "tokenizer"),
                batch_size=recipe.batch_size, augment=False, render_jitter=recipe.render_jitter,
                render_jitter_each=recipe.render_jitter_each, max_tokens=recipe.max_tokens,
                checkpoint_every=recipe.checkpoint_every, log_every=50, workers=recipe.loader_workers,
                worker_processes=recipe.decode_in == "processes")


def pretrain(recipe: DemoRecipe, work: Path, data: list[Path], out: Path, seed: int = PRETRAIN_SEED,
             streams: int = 0) -> Path:
    """Pre-train a MED with ITC + ITM + LM on ``data`` (the recipe's steps; resumes); returns the run folder.

    ``make demo-models`` pre-trains on human + raw web; ``make experiment``
    also on human + the bootstrapped web, with the same steps and seed.
    ``streams``: the loader's file streams (0: one per process, which reads
    the files one after another; more mix files within every batch).
    """
    from capfilt.models.configure import configure
    from capfilt.models.loop import train

    train(configure("pretrain", **_common(recipe, work), data=[str(folder) for folder in data], out=str(out),
                    max_steps=recipe.pretrain_steps, lr=recipe.pretrain_lr, warmup_steps=PRETRAIN_WARMUP_STEPS,
                    queue_size=recipe.queue_size, seed=seed, streams=streams, max_seconds=recipe.pretrain_seconds))
    return out


def finetune_jobs(recipe: DemoRecipe, work: Path) -> list[tuple[str, dict]]:
    """The captioner's and the filter's fine-tuning on ``human``: each from the pre-trained MED, or from its own
    installed model when the recipe continues (``continue_from``)."""
    finetune = dict(_common(recipe, work), data=[str(split_folders(work)["human"])],
                    lr=recipe.finetune_lr, schedule="step", warmup_steps=0, workers=max(1, recipe.loader_workers // 2),
                    freeze_vision=recipe.freeze_vision,
                    streams=recipe.streams, max_seconds=recipe.finetune_seconds)

    def start(role: str) -> str:
        if not recipe.continue_from:
            return str(work / "pretrain")
        if role == "filter" and recipe.shared_vision:
            return str(work / SHARED_VISION_START)  # written by filter_on_captioner_vision
        return str(Path(recipe.continue_from) / role)

    return [
        ("finetune-captioner", dict(finetune, init=start("captioner"), out=str(work / "captioner"),
                                    max_steps=recipe.captioner_steps)),
        ("finetune-filter", dict(finetune, init=start("filter"), out=str(work / "filter"),
                                 max_steps=recipe.filter_steps, queue_size=recipe.queue_size, positives="text",
                                 negatives=recipe.negatives)),
    ]


SHARED_VISION_START = "filter-start"  # in the work folder: the filter to go on from with ``shared_vision``


def filter_on_captioner_vision(models: Path, out: Path) -> Path:
    """The filter in ``models`` with the ViT of the captioner beside it in place of its own (``shared_vision``)."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.checkpoints import load_hf_folder
    from capfilt.tokenizer import load_tokenizer

    filter_ = load_hf_folder(BlipForImageTextRetrieval, models / "filter")
    captioner = load_hf_folder(BlipForConditionalGeneration, models / "captioner")
    filter_.vision_model.load_state_dict(captioner.vision_model.state_dict())
    filter_.save_pretrained(out)
    load_tokenizer(models / "filter").save_pretrained(out)
    return out


def finetune(job: tuple[str, dict]) -> None:
    """Run one fine-tuning job on one core."""
    task, overrides = job
    import torch

    _log_to_console()
    from capfilt.models.configure import configure
    from capfilt.models.loop import train

    from capfilt.models.loop import TrainingStopped

    torch.set_num_threads(1)  # two fine-tunes share the machine's two cores
    try:
        train(configure(task, **overrides))
    except TrainingStopped as stopped:  # its checkpoint is saved: one line, not a traceback
        print(f"[demo-models] {task} {stopped}", file=sys.stderr, flush=True)
        sys.exit(stopped.status)


def train_demo_models(recipe: DemoRecipe = DemoRecipe(), work: Path = WORK, install: Path = DEMO_MODELS) -> None:
    """Run the whole recipe; the models land in ``install`` (``capfilt/demo_models``)."""
    start = time.time()
    folders = write_splits(recipe, work)
    print(f"[demo-models] splits ready ({time.time() - start:.0f} s)", flush=True)
    if recipe.continue_from:
        missing = [role for role in ("captioner", "filter") if not (Path(recipe.continue_from) / role).is_dir()]
        if missing:
            raise FileNotFoundError(f"--continue-from {recipe.continue_from}: no {' or '.join(missing)} folder")
        print(f"[demo-models] going on fine-tuning the models in {recipe.continue_from}", flush=True)
        if recipe.shared_vision:
            filter_on_captioner_vision(Path(recipe.continue_from), work / SHARED_VISION_START)
    else:
        pretrain(recipe, work, [folders["human"], folders["web"]], work / "pretrain", streams=recipe.streams)
        print(f"[demo-models] pre-trained ({(time.time() - start) / 60:.0f} min)", flush=True)
    # Plain processes, not a Pool: a Pool's daemonic workers could not start the loader's decoding processes.
    jobs = [multiprocessing.get_context("spawn").Process(target=finetune, args=(job,), name=job[0])
            for job in finetune_jobs(recipe, work)]
    for job in jobs:
        job.start()
    try:
        for job in jobs:
            job.join()
    except BaseException:  # SIGINT or SIGTERM here: each fine-tune saves a checkpoint of its step and ends
        for job in jobs:
            if job.is_alive():
                job.terminate()
        for job in jobs:
            job.join()
        raise
    failed = [job.name for job in jobs if job.exitcode]
    if failed:
        raise RuntimeError(f"{', '.join(failed)} failed (see the log above); run again to resume")
    print(f"[demo-models] fine-tuned ({(time.time() - start) / 60:.0f} min)", flush=True)
    install_models(work, install, recipe)
    print(f"[demo-models] installed in {install} ({(time.time() - start) / 60:.0f} min in all)", flush=True)


def install_models(work: Path, install: Path, recipe: DemoRecipe) -> None:
    """Copy the exported captioner and filter into ``install`` with their sampling defaults and recipe."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.checkpoints import load_hf_folder
    from capfilt.tokenizer import load_tokenizer

    roles = (("captioner", BlipForConditionalGeneration), ("filter", BlipForImageTextRetrieval))
    # Read before anything is replaced: ``install`` may be the very folder the run continued from.
    continued = {role: json.loads((Path(recipe.continue_from) / role / "capfilt_recipe.json").read_text())
                 for role, _ in roles if recipe.continue_from}
    for role, model_class in roles:
        exported, target = work / role / role, install / role
        shutil.rmtree(target, ignore_errors=True)
        # Stored in fp16 to keep the repository small; Captioner and Filter run them in fp32.
        load_hf_folder(model_class, exported).half().save_pretrained(target)
        load_tokenizer(exported).save_pretrained(target)
        record = {**asdict(recipe), "steps_trained": steps_trained(work)}
        if role in continued:  # the recipe that made the models this run started from
            record["continued"] = continued[role]
        (target / "capfilt_recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    sampling = {"min_length": 5, "max_length": 20}  # "[DEC] a picture of" + 1 to 10 words
    (install / "captioner" / "capfilt_sampling.json").write_text(json.dumps(sampling, indent=2) + "\n")


def steps_trained(work: Path) -> dict[str, int]:
    """The step each stage's newest checkpoint reached (time-limited stages end wherever the clock says)."""
    from capfilt.models.checkpointing import PREFIX, latest_checkpoint

    checkpoints = {stage: latest_checkpoint(work / stage) for stage in ("pretrain", "captioner", "filter")}
    return {stage: int(found.name.removeprefix(PREFIX)) for stage, found in checkpoints.items() if found}


def _log_to_console() -> None:
    """Training progress (steps/s, losses, ETA) on the console, in this process and in each fine-tune's."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def _yes_no(text: str) -> bool:
    """A boolean recipe setting on the command line: true/false, yes/no or 1/0."""
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capfilt demo-models", description=__doc__.split("\n")[0],
                                     formatter_class=HelpWithDefaults,
                                     epilog="The recipe's settings (DemoRecipe) default to the CPU recipe's values; "
                                            "--gpu starts from GPU_RECIPE's instead.")
    parser.add_argument("--work", default=str(WORK), help="splits and training runs (resumable)")
    parser.add_argument("--install", default=str(DEMO_MODELS), help="where the models go")
    parser.add_argument("--gpu", action="store_true", help="start from GPU_RECIPE (one GPU, 16 cores, ~10 min)")
    parser.add_argument("--splits-only", action="store_true", help="render the splits and the tokenizer, then stop")
    for name, value in asdict(DemoRecipe()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=_yes_no if isinstance(value, bool) else type(value),
                            default=None, help=f"DemoRecipe.{name} (default: {value!r})",
                            **({"choices": NEGATIVE_CHOICES} if name == "negatives" else {}))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    work, install = Path(args.pop("work")), Path(args.pop("install"))
    gpu, splits_only = args.pop("gpu"), args.pop("splits_only")
    chosen = {name: value for name, value in args.items() if value is not None}
    recipe = split_budget(replace(GPU_RECIPE if gpu else DemoRecipe(), **chosen))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _log_to_console()
    if splits_only:
        start = time.time()
        write_splits(recipe, work)
        print(f"[demo-models] splits ready in {work / 'data'} ({time.time() - start:.0f} s)", flush=True)
        return
    if recipe.continue_from:
        print(f"[demo-models] no pre-training; fine-tuning goes on from {recipe.continue_from} for "
              + (f"{recipe.finetune_seconds:.0f} s" if recipe.finetune_seconds else
                 f"{recipe.captioner_steps} (captioner) and {recipe.filter_steps} (filter) steps"), flush=True)
    elif gpu:
        print(f"[demo-models] splits, then {recipe.pretrain_seconds:.0f} s of pre-training and "
              f"{recipe.finetune_seconds:.0f} s of fine-tuning", flush=True)
    else:
        print("[demo-models] about 1 h 30 min on 2 CPU cores (splits 9 min, pre-training 23 min, "
              "fine-tuning 58 min); rerun to resume", flush=True)
    from capfilt.models.loop import TrainingStopped

    try:
        train_demo_models(recipe, work, install)
    except TrainingStopped as stopped:  # pre-training's checkpoint is saved: one line, not a traceback
        print(f"[demo-models] pre-training {stopped}", file=sys.stderr, flush=True)
        sys.exit(stopped.status)


if __name__ == "__main__":
    main()
