"""Settings by flat name: ``configure(task, lr=..., batch_size=...)`` and the command line's ``--flags``.

Every field of ``TrainConfig`` and of its sections (``med``, ``data``, ``augment``, ``optim``) is one setting,
named by the field alone: no two share a name. A run's configuration is the task's BLIP values
(``task_config``), then what its ``--model`` preset sets (``capfilt.models.presets``), then what is given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace

from capfilt.models.config import TrainConfig, task_config
from capfilt.models.presets import TRAIN_PRESETS, preset_settings


def _settings() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Every setting's flat name -> (its section, or None for a top-level one; its field). Derived fields (set by
    the trainer, e.g. ``prompt_length``) and the sections themselves are not settings."""
    default, found = TrainConfig(), {}
    for top in dataclasses.fields(TrainConfig):
        if top.metadata.get("section"):
            entries = [(item, top.name) for item in dataclasses.fields(getattr(default, top.name))]
        else:
            entries = [(top, None)]
        for item, section in entries:
            if item.name in found:
                raise AssertionError(f"setting {item.name!r} is defined twice")
            if not item.metadata.get("derived"):
                found[item.name] = (section, item)
    return found


SETTINGS = _settings()


def setting_value(config: TrainConfig, name: str):
    """The value of the setting ``name`` in ``config``."""
    section, _ = SETTINGS[name]
    return getattr(getattr(config, section) if section else config, name)


def configure(task: str, **overrides) -> TrainConfig:
    """``task_config(task)``, then what the ``model`` preset sets (``TRAIN_PRESETS``), then ``overrides`` by flat
    name, e.g. ``configure("pretrain", model="demo", lr=1e-4, data=[...])``."""
    config = task_config(task)
    model = overrides.get("model", config.model)
    settings = preset_settings(model, task)
    preset = TRAIN_PRESETS.get(model)
    if preset and preset.tokenizer and not overrides.get("init"):  # with --init, the tokenizer its weights came with
        settings["tokenizer"] = preset.tokenizer
    top, sections = {}, {}
    for name, value in {**settings, **overrides}.items():
        if name not in SETTINGS or name == "task":
            raise TypeError(f"unknown setting {name!r}; see capfilt.models.config.TrainConfig and its sections")
        section, _ = SETTINGS[name]
        value = tuple(value) if isinstance(value, list) else value
        if section:
            sections.setdefault(section, {})[name] = value
        else:
            top[name] = value
    return replace(config, **top, **{s: replace(getattr(config, s), **v) for s, v in sections.items()})
