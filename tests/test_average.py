"""Checkpoint averaging (capfilt.models.average): the folder written holds the element-wise mean of the inputs'
weights, as transformers loads them back, and refuses folders that are not one architecture."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BlipForImageTextRetrieval

from capfilt.filter import Filter
from capfilt.models.average import RECORD, average_folders, average_state_dicts, main


@pytest.fixture
def two_filters(tmp_path, tiny_config, tokenizer):
    """Two tiny filters of one architecture, other random weights; the second stored in fp16."""
    folders = []
    for seed, dtype in ((3, torch.float32), (4, torch.float16)):
        torch.manual_seed(seed)
        model = BlipForImageTextRetrieval(tiny_config).eval().to(dtype)
        folder = tmp_path / f"filter-{seed}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders


def test_the_average_holds_the_mean_of_the_weights(tmp_path, two_filters):
    out = average_folders(two_filters, tmp_path / "mean")
    first, second = (BlipForImageTextRetrieval.from_pretrained(folder, dtype=torch.float32).state_dict()
                     for folder in two_filters)
    mean = BlipForImageTextRetrieval.from_pretrained(out, dtype=torch.float32).state_dict()
    assert set(mean) == set(first)
    for key, value in mean.items():
        assert torch.allclose(value, (first[key] + second[key]) / 2, atol=1e-6), key
    assert any(not torch.equal(first[key], second[key]) for key in first)  # the inputs do differ
    assert json.loads((out / RECORD).read_text()) == {"averaged": [str(folder) for folder in two_filters]}
    assert (out / "tokenizer.json").is_file()
    Filter.load(str(out))  # a filter capfilt runs


def test_a_folder_averaged_with_itself_is_unchanged(tmp_path, filter_folder):
    out = average_folders([filter_folder, filter_folder], tmp_path / "same")
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
    with pytest.raises(ValueError, match="at least two"):
        average_folders([filter_folder], tmp_path / "one")
    with pytest.raises(ValueError, match="is one of the folders"):
        average_folders([filter_folder, filter_folder], filter_folder)
