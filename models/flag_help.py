"""The trainer's ``--help`` texts: each flag's text, unit and required mark from its field's metadata
(``capfilt.models.config.setting``), the tasks' defaults, and what each ``--model`` preset sets."""

from __future__ import annotations

import textwrap

from capfilt.configs import PRESETS
from capfilt.models.config import TASKS, task_config
from capfilt.models.configure import SETTINGS, setting_value
from capfilt.models.presets import TRAIN_PRESETS, preset_settings

HELP_WIDTH = 118  # the presets' section and the epilog come wrapped: a raw description keeps them as written


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
    defaults = {task: setting_value(task_config(task), name) for task in TASKS}
    values = {task: preset_settings(preset, task).get(name, defaults[task]) for task in TASKS}
    return {task: value for task, value in values.items() if value != defaults[task]}


def setting_help(name: str) -> str:
    """The --help text of a setting: its field's help and unit, the tasks' defaults and what each preset sets."""
    _, item = SETTINGS[name]
    unit = f"{item.metadata['unit']}; " if item.metadata["unit"] else ""
    defaults = "required" if item.metadata["required"] else \
        f"default {_by_task({task: setting_value(task_config(task), name) for task in TASKS})}"
    text = f"{item.metadata['help']} [{unit}{defaults}"
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
        shape = f"ViT {vit.depth}x{vit.width} patch {vit.patch_size}, text {text.num_layers}x{text.hidden_size}"
        names = dict.fromkeys(setting for task in TASKS for setting in preset_settings(name, task))
        sets = {setting: _by_task(values) for setting in names if (values := _preset_values(name, setting))}
        settings = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in sets.items())
        text = (f"{name}: {preset.about}. {shape}." + (f" Sets {settings}." if settings else "")
                + (f" Tokenizer: {preset.tokenizer}." if preset.tokenizer else ""))
        lines.append(textwrap.fill(text, width=HELP_WIDTH, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def epilog() -> str:
    """What --help shows after the flags: the presets, where the other defaults come from, the demo loop."""
    return presets_help() + "\n\n" + textwrap.fill(
        "Every other setting defaults to the task's BLIP value (capfilt.models.config.task_config); "
        "--print-config shows the resolved configuration. The demo loop on `make bootstrap`'s output "
        "(docs/training.md):", width=HELP_WIDTH) + "\n  capfilt train pretrain --model demo " \
        "--data out/bootstrap/kept --out runs/pretrain"
