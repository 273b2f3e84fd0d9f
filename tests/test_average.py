"""Checkpoint averaging (capfilt.models.average): the folder written holds the element-wise mean of the inputs'
weights, in the first folder's dtype, as transformers loads them back, and refuses what it cannot average."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BlipForImageTextRetrieval

from capfilt.checkpoints import CheckpointError
from capfilt.filter import Filter
from capfilt.models.average import RECORD, WEIGHTS, average_folders, average_state_dicts, main


@pytest.fixture
def three_filters(tmp_path, tiny_config, tokenizer):
    """Three tiny filters of one architecture with other random weights; the first stored in fp16, as an installed
    demo model is, the others in fp32, as a run's exports are."""
    folders = []
    for seed, dtype in ((3, torch.float16), (4, torch.float32), (5, torch.float32)):
        torch.manual_seed(seed)
        model = BlipForImageTextRetrieval(tiny_config).eval().to(dtype)
        folder = tmp_path / f"filter-{seed}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders


def test_the_average_holds_the_mean_of_the_weights_in_the_first_folders_dtype(tmp_path, three_filters):
    out = average_folders(three_filters, tmp_path / "mean")
    inputs = [load_file(folder / WEIGHTS) for folder in three_filters]
    mean = load_file(out / WEIGHTS)
    assert set(mean) == set(inputs[0])
    for key, value in mean.items():
        assert value.dtype == inputs[0][key].dtype == torch.float16, key
        expected = sum(state[key].double() for state in inputs) / 3
        assert torch.equal(value, expected.to(torch.float16)), key
    assert any(not torch.equal(inputs[1][key], inputs[2][key]) for key in inputs[1])  # the inputs do differ
    assert json.loads((out / RECORD).read_text()) == {"averaged": [str(folder) for folder in three_filters]}
    assert (out / "tokenizer.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["filter-3", "filter-4", "filter-5", "mean"]
    Filter.load(str(out))  # a filter capfilt runs


def test_a_folder_averaged_with_a_copy_of_itself_is_unchanged(tmp_path, filter_folder):
    copy = shutil.copytree(filter_folder, tmp_path / "copy")
    out = average_folders([filter_folder, copy], tmp_path / "same")
    before = BlipForImageTextRetrieval.from_pretrained(filter_folder).state_dict()
    after = BlipForImageTextRetrieval.from_pretrained(out).state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_weights_of_another_shape_or_kind_are_refused():
    a = {"w": torch.zeros(2, 3), "steps": torch.tensor([1])}
    with pytest.raises(ValueError, match="w: \\(3, 2\\)"):
        average_state_dicts([a, {**a, "w": torch.zeros(3, 2)}])
    with pytest.raises(ValueError, match="different keys"):
        average_state_dicts([a, {"w": a["w"]}])
    with pytest.raises(ValueError, match="steps: a torch.int64 tensor that differs"):
        average_state_dicts([a, {**a, "steps": torch.tensor([2])}])
    assert torch.equal(average_state_dicts([a, {**a, "w": torch.ones(2, 3)}])["w"], torch.full((2, 3), 0.5))


def test_folders_of_another_architecture_are_refused_with_a_clear_error(tmp_path, filter_folder, captioner_folder,
                                                                        capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "mixed"), str(filter_folder), str(captioner_folder)])
    assert exit_.value.code == 2
    assert "config.json differs" in capsys.readouterr().err
    assert not (tmp_path / "mixed").exists()


def test_outputs_and_inputs_that_cannot_be_averaged_are_refused(tmp_path, three_filters):
    first, second, _ = three_filters
    with pytest.raises(ValueError, match="at least two"):
        average_folders([first], tmp_path / "one")
    with pytest.raises(ValueError, match="given twice"):
        average_folders([first, second, first], tmp_path / "twice")
    with pytest.raises(ValueError, match="inside"):
        average_folders([first, second], first)
    with pytest.raises(ValueError, match="inside"):
        average_folders([first, second], first / "mean")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        average_folders([first, second], tmp_path / "a-file")
    config = json.loads((second / "config.json").read_text())
    (second / "config.json").write_text(json.dumps({**config, "transformers_version": "4.15.0"}))
    average_folders([first, second], tmp_path / "other-version")  # how a folder was stored is not its model
    del config["architectures"]
    for folder in (first, second):
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names no architectures"):
        average_folders([first, second], tmp_path / "no-class")
    assert not (tmp_path / "no-class").exists()


def test_an_average_that_does_not_load_back_leaves_nothing_behind(tmp_path, three_filters):
    first, second, _ = three_filters
    for folder in (first, second):  # both lose a weight: the mean is consistent, the model misses a key
        state = load_file(folder / WEIGHTS)
        del state["itm_head.bias"]
        save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="itm_head.bias"):
        average_folders([first, second], tmp_path / "broken")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["filter-3", "filter-4", "filter-5"]
