"""The trainer's command line: presets by name, flags overriding them, and --help built from the settings."""

from __future__ import annotations

import json

import pytest

from capfilt.shipped import DEMO_MODELS
from capfilt.recipes.demo import DemoRecipe
from capfilt.models.config import TASKS, task_config
from capfilt.models.configure import SETTINGS, configure
from capfilt.models.train import _parser, main


def resolved(*argv: str):
    """The configuration the command line ``argv`` trains with."""
    args = vars(_parser().parse_args(list(argv)))
    task = args.pop("task")
    return configure(task, **{k: v for k, v in args.items() if v is not None and k != "print_config"})


def test_the_demo_preset_sets_the_demo_recipe_and_its_tokenizer():
    recipe = DemoRecipe()
    config = resolved("pretrain", "--model", "demo", "--data", "kept", "--out", "runs/pt")
    assert (config.image_size, config.patch_size, config.data.batch_size, config.med.queue_size) == (
        64, recipe.patch_size, recipe.batch_size, recipe.queue_size) == (64, 8, 64, 4096)
    assert (config.optim.lr, config.optim.warmup_steps, config.data.max_tokens) == (recipe.pretrain_lr, 30, 32)
    assert config.augment.augment is False and config.tokenizer == str(DEMO_MODELS / "captioner")
    captioner = resolved("finetune-captioner", "--model", "demo", "--init", "runs/pt", "--data", "h", "--out", "c")
    assert (captioner.image_size, captioner.optim.lr, captioner.optim.schedule, captioner.optim.warmup_steps) == (
        64, recipe.finetune_lr, "step", 0)
    assert captioner.med.freeze_vision and captioner.data.prompt == "a picture of "
    assert captioner.tokenizer == ""  # with --init, the tokenizer the init's weights came with
    filter_ = resolved("finetune-filter", "--model", "demo", "--init", "runs/pt", "--data", "h", "--out", "f")
    assert filter_.data.positives == "text" and filter_.med.losses == ("itc", "itm")


def test_explicit_flags_override_the_preset():
    config = resolved("pretrain", "--model", "demo", "--batch-size", "32", "--lr", "1e-4", "--augment",
                      "--image-size", "128", "--tokenizer", "tok/", "--data", "d", "--out", "o")
    assert (config.data.batch_size, config.optim.lr, config.augment.augment, config.image_size, config.tokenizer) \
        == (32, 1e-4, True, 128, "tok/")
    assert config.med.queue_size == 4096  # what was not given stays the preset's


def test_base_is_blips_values_and_large_adds_its_own():
    for task in TASKS:
        assert resolved(task, "--data", "d", "--out", "o") == configure(task, data=["d"], out="o") \
            == configure(task, data=["d"], out="o", model="base")
        assert configure(task, model="base") == task_config(task)
    large = resolved("pretrain", "--model", "large", "--data", "d", "--out", "o")
    assert large.optim.lr == 2e-4 and large.gradient_checkpointing and large.image_size == 224
    assert resolved("finetune-captioner", "--model", "large", "--data", "d", "--out", "o").image_size == 384


def test_print_config_shows_the_resolved_preset(capsys):
    main(["finetune-filter", "--model", "demo", "--data", "d", "--out", "o", "--print-config"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "demo" and printed["image_size"] == 64 and printed["data"]["positives"] == "text"


def test_help_lists_the_presets_and_every_flag_has_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside the texts compared below
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "model presets (--model NAME; explicit flags override what a preset sets):" in text
    for name in ("tiny:", "demo:", "base:", "large:"):
        assert f" {name} " in text
    assert "--batch-size BATCH_SIZE global batch: 2880 for ViT-B pre-training (paper §4.1) [pairs; default 2880 " \
           "(pretrain), 256 (finetune-captioner, finetune-filter); --model tiny: 8; --model demo: 64]" in text
    assert "--max-seconds MAX_SECONDS" in text and "[seconds; default 0]" in text
    assert "--out OUT run folder: tokenizer, log.jsonl, checkpoints, exports [required]" in text
    actions = {action.dest: action.help for action in _parser()._actions if action.option_strings
               and action.dest in SETTINGS}
    assert set(actions) == set(SETTINGS) - {"task"}
    for name, help_text in actions.items():  # a sentence, not the setting's own name, and its default
        assert len(help_text) > 30 and ("default" in help_text or "required" in help_text), name
