"""The trainer's configuration documents itself: every field carries its --help text in ``field(metadata=...)``,
and the command line shows that text for every flag."""

from __future__ import annotations

import dataclasses

import pytest

from capfilt.models.config import AugmentConfig, DataConfig, MEDSettings, OptimConfig, TrainConfig
from capfilt.models.configure import SETTINGS
from capfilt.models.flag_help import setting_help
from capfilt.models.train import _parser

CONFIGS = (TrainConfig, MEDSettings, DataConfig, AugmentConfig, OptimConfig)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.__name__)
def test_every_field_has_help_in_its_metadata(config):
    missing = [item.name for item in dataclasses.fields(config)
               if not isinstance(item.metadata.get("help"), str) or len(item.metadata["help"].split()) < 3]
    assert not missing, f"{config.__name__} fields without field(metadata={{'help': ...}}): {missing}"


def test_sections_are_the_dataclass_fields_and_every_other_field_is_a_flag():
    sections = {item.name for item in dataclasses.fields(TrainConfig) if item.metadata.get("section")}
    assert sections == {"med", "data", "augment", "optim"}
    derived = {item.name for config in CONFIGS for item in dataclasses.fields(config) if item.metadata.get("derived")}
    assert derived == {"prompt_length"}  # set by the trainer from the prompt and the tokenizer
    top = [item.name for item in dataclasses.fields(TrainConfig) if item.name not in sections]
    inner = [item.name for config in CONFIGS[1:] for item in dataclasses.fields(config) if item.name not in derived]
    assert sorted(SETTINGS) == sorted(top + inner)  # one flat name each (``data`` and ``augment`` are fields too)


def test_each_flags_help_is_its_fields_metadata():
    flags = {action.dest: action.help for action in _parser()._actions if action.option_strings}
    assert set(flags) == set(SETTINGS) - {"task"} | {"help", "print_config"}
    for name, (_, item) in SETTINGS.items():
        text = setting_help(name)
        assert text.startswith(item.metadata["help"].replace("%", "%%") + " ["), name
        if name != "task":
            assert flags[name] == text
        unit = item.metadata["unit"]
        assert (f"[{unit}; " in text) if unit else (" [default" in text or " [required" in text), name


def test_a_field_without_help_is_caught():
    @dataclasses.dataclass(frozen=True)
    class Undocumented:
        documented: int = dataclasses.field(default=1, metadata={"help": "a documented field here"})
        bare: int = 2

    with pytest.raises(AssertionError, match="bare"):
        test_every_field_has_help_in_its_metadata(Undocumented)
