"""`python -m capfilt.recipes.demo` end to end in miniature: splits, pre-training, both fine-tunes, install."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from capfilt.recipes import demo
from capfilt.captioner import Captioner
from capfilt.filter import Filter
from capfilt.models.checkpointing import latest_checkpoint, read_checkpoint
from capfilt.shapes.splits import iter_split


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    """Splits, work folder and installed models of ``--gpu``'s recipe in miniature."""
    tmp_path = tmp_path_factory.mktemp("miniature")
    work, install = tmp_path / "work", tmp_path / "install"
    # --gpu's settings (16 streams aside, patch 4) on 48 + 48 pairs; 2 ms of training: every stage stops after
    # its first step.
    demo.main(["--gpu", "--work", str(work), "--install", str(install), "--human", "48", "--web", "48",
               "--shard-size", "12", "--streams", "2", "--batch-size", "8", "--queue-size", "16",
               "--loader-workers", "2", "--render-processes", "2", "--train-seconds", "0.002",
               "--patch-size", "4"])
    return work, install


@pytest.mark.slow
def test_the_gpu_recipe_runs_in_miniature_with_time_limits_and_decoding_processes(miniature):
    work, install = miniature
    assert sorted(p.name for p in (work / "data" / "human").glob("*.parquet")) == [f"{i:05d}.parquet" for i in range(4)]
    assert sum(pq.read_metadata(p).num_rows for p in (work / "data" / "web").glob("*.parquet")) == 48
    recipe = json.loads((install / "filter" / "capfilt_recipe.json").read_text())
    assert recipe["decode_in"] == "processes"
    # --train-seconds dealt out: 45% to pre-training, the rest to each of the fine-tunes (side by side).
    assert recipe["train_seconds"] == 0.002 and recipe["pretrain_seconds"] == pytest.approx(0.0009)
    assert recipe["finetune_seconds"] == pytest.approx(0.0011)
    assert recipe["vision_position_init"] == "sincos" and recipe["batch_size"] == 8  # --gpu's start, the flag's batch
    assert recipe["steps_trained"] == {"pretrain": 1, "captioner": 1, "filter": 1}
    assert json.loads((install / "captioner" / "capfilt_recipe.json").read_text()) == recipe
    # The human split carries the hard negatives' columns; by default (BLIP's) no stage reads them.
    assert recipe["negatives"] == ""
    assert all({"negative_caption", "replaced_caption"} <= set(pq.read_schema(p).names)
               for p in (work / "data" / "human").glob("*.parquet"))
    assert stage_settings(work, "data", "negatives") == {"pretrain": "", "captioner": "", "filter": ""}
    # The fine-tunes train the text side only; pre-training trains the ViT.
    assert stage_settings(work, "med", "freeze_vision") == {"pretrain": False, "captioner": True, "filter": True}
    for role in ("captioner", "filter"):  # --patch-size reached every stage: a 16x16 grid on 64 px
        assert json.loads((install / role / "config.json").read_text())["vision_config"]["patch_size"] == 4
    # The installed folders are models the pipeline loads and runs.
    samples = list(iter_split("web", 2, 5))
    captions = Captioner.load(install / "captioner").caption([s.image for s in samples], seed=0)
    assert len(captions) == 2 and all(len(c) == 1 and isinstance(c[0], str) for c in captions)
    scores = Filter.load(install / "filter").score([s.image for s in samples], [[s.text] for s in samples])
    assert all(0.0 <= score.itm <= 1.0 for (score,) in scores)


def stage_settings(work, section: str, name: str) -> dict:
    """One training setting of each stage's run, as its newest checkpoint recorded it."""
    runs = [stage for stage in ("pretrain", "captioner", "filter") if (work / stage).is_dir()]
    return {stage: read_checkpoint(latest_checkpoint(work / stage))["config"]["train"][section][name]
            for stage in runs}


@pytest.mark.slow
def test_continue_from_fine_tunes_the_installed_models_without_pre_training(miniature, tmp_path):
    _, start = miniature
    work, install = tmp_path / "work", tmp_path / "install"
    # Learning rate 0: one step each, so the continued models must come out exactly as they went in.
    demo.main(["--work", str(work), "--install", str(install), "--continue-from", str(start), "--human", "48",
               "--web", "48", "--shard-size", "24", "--batch-size", "8", "--queue-size", "16", "--patch-size", "4",
               "--captioner-steps", "1", "--filter-steps", "1", "--finetune-lr", "0",
               "--negatives", "replaced_caption", "--freeze-vision", "no", "--train-seconds", "60"])
    assert not (work / "pretrain").exists() and not (work / "data" / "web").exists()  # fine-tuning only
    for role in ("captioner", "filter"):
        before, after = (load_file(folder / role / "model.safetensors") for folder in (start, install))
        assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before), role
        recipe = json.loads((install / role / "capfilt_recipe.json").read_text())
        assert recipe["continue_from"] == str(start) and recipe["steps_trained"] == {"captioner": 1, "filter": 1}
        assert recipe["continued"] == json.loads((start / role / "capfilt_recipe.json").read_text())
        assert (recipe["pretrain_seconds"], recipe["finetune_seconds"]) == (0.0, 60.0)  # no pre-training: all to it
    # --negatives replaced_caption: the filter's fine-tuning, only it, reads them; --freeze-vision no: BLIP's.
    assert stage_settings(work, "data", "negatives") == {"captioner": "", "filter": "replaced_caption"}
    assert stage_settings(work, "med", "freeze_vision") == {"captioner": False, "filter": False}
    with pytest.raises(SystemExit):
        demo.main(["--freeze-vision", "maybe"])
    with pytest.raises(SystemExit):
        demo.main(["--negatives", "caption"])  # a column, but not one of negatives
    with pytest.raises(ValueError, match="negatives must be one of"):
        demo.DemoRecipe(negatives="negative")


@pytest.mark.slow
def test_shared_vision_puts_the_captioners_vit_under_the_filters_text_side(miniature, tmp_path):
    import shutil

    from safetensors.torch import save_file

    _, installed = miniature
    start, work, install = tmp_path / "start", tmp_path / "work", tmp_path / "install"
    shutil.copytree(installed, start)
    captioner = load_file(start / "captioner" / "model.safetensors")  # a captioner whose ViT differs from the filter's
    captioner = {k: v + 0.5 if k.startswith("vision_model.") else v for k, v in captioner.items()}
    save_file(captioner, start / "captioner" / "model.safetensors", metadata={"format": "pt"})
    demo.main(["--work", str(work), "--install", str(install), "--continue-from", str(start), "--human", "48",
               "--shard-size", "24", "--batch-size", "8", "--queue-size", "16", "--patch-size", "4",
               "--captioner-steps", "1", "--filter-steps", "1", "--finetune-lr", "0", "--shared-vision", "yes"])
    before, after = (load_file(folder / "filter" / "model.safetensors") for folder in (start, install))
    assert before.keys() == after.keys()
    vision = [k for k in before if k.startswith("vision_model.")]
    assert vision and all(after[k].equal(captioner[k]) and not after[k].equal(before[k]) for k in vision)
    assert all(after[k].equal(before[k]) for k in before if k not in vision)  # the filter's own text side and heads
    assert json.loads((install / "filter" / "capfilt_recipe.json").read_text())["shared_vision"] is True


def test_an_old_human_split_is_rendered_again_only_when_the_recipe_reads_negatives(tmp_path):
    from capfilt.shapes.writer import write_split

    human = demo.split_folders(tmp_path)["human"]
    write_split("human", 8, 11, human, shard_size=8)  # rendered before the negatives column existed
    (human / "_done").touch()
    recipe = demo.DemoRecipe(human=8, shard_size=8, continue_from=str(tmp_path / "models"))
    demo.write_splits(recipe, tmp_path)
    assert "negative_caption" not in pq.read_schema(human / "00000.parquet").names  # kept as it was
    demo.write_splits(replace(recipe, negatives="replaced_caption"), tmp_path)
    assert "replaced_caption" in pq.read_schema(human / "00000.parquet").names
