"""Model presets: what ``--model NAME`` sets beyond the model's shape (``capfilt.configs.PRESETS``).

``base`` and ``large`` are BLIP's; ``demo`` trains the shapes-world demo MED as ``make demo-models`` does
(``capfilt.recipes.demo.DemoRecipe`` starts from ``DEMO_TRAINING``, so the trainer never imports the recipe above
it); ``tiny`` is for tests and smoke runs. Settings are by flat name (``capfilt.models.configure``); explicit
flags win over a preset's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from capfilt.shipped import DEMO_MODELS
from capfilt.configs import DEMO_TEXT, DEMO_VIT, PRESETS
from capfilt.sampling_settings import SETTINGS_FILE as SAMPLING_FILE


@dataclass(frozen=True)
class DemoTraining:
    """How the shapes-world demo MED trains (2 CPU cores); its shape is ``capfilt.configs.DEMO_VIT``/``DEMO_TEXT``.

    Departures from BLIP's values, for a small model trained from scratch on the shapes world; see
    ``capfilt.recipes.demo.DemoRecipe`` for the rest of the recipe.
    """

    batch_size: int = 64
    pretrain_lr: float = 5e-4  # higher than BLIP's 3e-4: a small model from scratch
    finetune_lr: float = 2e-4  # higher than BLIP's 1e-5, likewise
    queue_size: int = 4096  # ITC queue: a multiple of the batch; 57,600 in the paper is for 2,880-pair batches
    max_tokens: int = 32  # the shapes world's captions and texts are short
    vision_position_init: str = "random"  # BLIP's; "sincos" starts pre-training's ViT positions at 2-D sin-cos
    # Fine-tuning trains the text side only, the ViT frozen as pre-training left it (MEDSettings.freeze_vision).
    # capfilt's, not BLIP's: BLIP fine-tunes the ViT too.
    freeze_vision: bool = True


DEMO_TRAINING = DemoTraining()
# The demo's pre-training warm-up on `make bootstrap`'s output (about 1,400 pairs kept: some 20 steps an epoch at
# the demo's batch); `make demo-models` sizes its own for its 200,000 rendered pairs.
DEMO_LOOP_WARMUP_STEPS = 30
SHAPES_WORLD_TOKENIZER = DEMO_MODELS / "captioner"  # the installed demo captioner's (the package's, not the cwd's)
_SHAPES_WORLD = "the shapes-world tokenizer shipped in capfilt/demo_models/captioner"

# How to get BERT's tokenizer onto a machine that cannot download it (base and large ship none).
BERT_TOKENIZER_HELP = (
    "BLIP's tokenizer is bert-base-uncased's WordPiece plus [DEC] and [ENC] (added on load). It is not shipped: on "
    "a machine with internet run `hf download bert-base-uncased vocab.txt tokenizer_config.json tokenizer.json "
    "--local-dir bert-base-uncased` (or use the folder of a downloaded BLIP checkpoint such as "
    "Salesforce/blip-image-captioning-large, which holds its tokenizer files), copy the folder here and pass "
    "--tokenizer bert-base-uncased (a folder, or its vocab.txt)")


@dataclass(frozen=True)
class TrainPreset:
    """What ``--model NAME`` sets beyond the model's shape (``capfilt.configs.PRESETS``); explicit flags win."""

    about: str  # one line for --help
    settings: dict  # flat settings for every task
    per_task: dict = field(default_factory=dict)  # task -> flat settings for that task only (after ``settings``)
    tokenizer: str = ""  # the tokenizer a run uses when neither --tokenizer nor --init gives one ("": none)
    sampling: str = ""  # a captioner folder's capfilt_sampling.json that exported captioners carry ("": none)


def _tiny() -> TrainPreset:
    vit, text = PRESETS["tiny"]
    return TrainPreset(
        about=f"a {text.num_layers}-layer, {text.hidden_size}-wide MED for tests and smoke runs; {_SHAPES_WORLD}",
        settings=dict(image_size=vit.image_size, patch_size=vit.patch_size, batch_size=8, queue_size=64, lr=1e-3,
                      warmup_steps=10),
        tokenizer=str(SHAPES_WORLD_TOKENIZER))


def _demo() -> TrainPreset:
    demo = DEMO_TRAINING
    finetune = dict(lr=demo.finetune_lr, schedule="step", warmup_steps=0, freeze_vision=demo.freeze_vision)
    return TrainPreset(
        about=f"the shapes-world demo MED ({DEMO_TEXT.num_layers} layers, {DEMO_TEXT.hidden_size} wide), `make "
              f"demo-models`' recipe (capfilt.recipes.demo); {_SHAPES_WORLD}; exported captioners get its "
              f"{SAMPLING_FILE}",
        settings=dict(image_size=DEMO_VIT.image_size, patch_size=DEMO_VIT.patch_size,
                      vision_position_init=demo.vision_position_init, batch_size=demo.batch_size,
                      queue_size=demo.queue_size, max_tokens=demo.max_tokens, augment=False),
        per_task={"pretrain": dict(lr=demo.pretrain_lr, warmup_steps=DEMO_LOOP_WARMUP_STEPS),
                  "finetune-captioner": finetune, "finetune-filter": dict(finetune, positives="text")},
        tokenizer=str(SHAPES_WORLD_TOKENIZER), sampling=str(SHAPES_WORLD_TOKENIZER / SAMPLING_FILE))

TRAIN_PRESETS: dict[str, TrainPreset] = {
    "tiny": _tiny(),
    "demo": _demo(),
    "base": TrainPreset(
        about="BLIP w/ ViT-B/16 + BERT-base (224 px pre-training, 384 fine-tuning): every value BLIP's; "
              "needs --tokenizer (bert-base-uncased)", settings={}),
    "large": TrainPreset(
        about="BLIP w/ ViT-L/16 + BERT-base: as base, pre-training lr 2e-4 (paper §4.1) and gradient "
              "checkpointing (the original's vit_grad_ckpt); needs --tokenizer (bert-base-uncased)",
        settings=dict(gradient_checkpointing=True), per_task={"pretrain": dict(lr=2e-4)}),
}
if set(TRAIN_PRESETS) != set(PRESETS):
    raise AssertionError(f"train presets {sorted(TRAIN_PRESETS)} differ from capfilt.configs {sorted(PRESETS)}")


def preset_settings(model: str, task: str) -> dict:
    """The flat settings that ``--model model`` gives ``task`` ({} for a config.json)."""
    preset = TRAIN_PRESETS.get(model)
    if preset is None:
        return {}
    return {**preset.settings, **preset.per_task.get(task, {})}
