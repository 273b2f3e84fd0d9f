"""The bootstrapping experiment's measures and its whole loop, in miniature.

Retrieval recall@1 is checked against a brute-force ranking built from the
filter's public per-pair scores (``Filter.score``) and the caption parser; the
loop runs every step (splits, raw pre-training, CapFilt with the shipped demo
models, bootstrapped pre-training, evaluation) on a few dozen pairs, and its
tables are checked against the pipeline's Parquet output read back.
"""

from __future__ import annotations

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.recipes.demo import DemoRecipe
from capfilt.recipes.experiment import RUNS, ExperimentConfig, capfilt_table, markdown, run_experiment, web_texts_only
from capfilt.filter import Filter
from capfilt.models.checkpointing import latest_checkpoint, read_checkpoint
from capfilt.shapes.captions import is_correct
from capfilt.recipes.evaluate import evaluate_retrieval
from capfilt.shapes.scene import scene_from_json
from capfilt.shapes.splits import iter_split


@pytest.mark.parametrize("model", ["demo", "random"])
def test_retrieval_recall_matches_a_brute_force_ranking(model, filter_folder):
    samples = list(iter_split("test", 12, 5))
    # fp32: the measure batches texts otherwise than Filter.score, and bf16 rounding would reorder near ties.
    filter_ = Filter.load("demo" if model == "demo" else filter_folder, precision="fp32")
    k = 4
    # Every (image, text) pair scored one image at a time through the public API.
    scores = [row for row in filter_.score([s.image for s in samples], [[t.text for t in samples]] * len(samples))]
    itc = [[score.itc for score in row] for row in scores]
    itm = [[score.itm for score in row] for row in scores]
    n = len(samples)

    def best(candidates, key):
        return max(candidates, key=key)

    expected = {"image_to_text_itc": 0, "image_to_text_itm": 0, "text_to_image_itc": 0, "text_to_image_itm": 0}
    for i in range(n):
        top = sorted(range(n), key=lambda j: -itc[i][j])[:k]
        expected["image_to_text_itc"] += is_correct(samples[top[0]].text, samples[i].scene)
        expected["image_to_text_itm"] += is_correct(samples[best(top, lambda j: itm[i][j])].text, samples[i].scene)
    for j in range(n):
        top = sorted(range(n), key=lambda i: -itc[i][j])[:k]
        expected["text_to_image_itc"] += is_correct(samples[j].text, samples[top[0]].scene)
        expected["text_to_image_itm"] += is_correct(samples[j].text, samples[best(top, lambda i: itm[i][j])].scene)

    measured = evaluate_retrieval(filter_, samples, rerank_k=k, batch_size=5)
    assert measured["n"] == n and measured["rerank_k"] == k
    for name, hits in expected.items():
        assert measured[name] == pytest.approx(hits / n), name
    if model == "random":  # random weights rank at chance: the measure is not stuck at 1
        assert min(measured[name] for name in expected) < 1


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    work = tmp_path_factory.mktemp("experiment")
    recipe = DemoRecipe(human=48, web=48, batch_size=8, pretrain_steps=3, queue_size=16, shard_size=24)
    config = ExperimentConfig(test=16, rerank_k=4, beam_shards="0", streams=2)
    return work, recipe, run_experiment(recipe, work, config)


@pytest.mark.slow
def test_experiment_runs_every_step_and_writes_its_tables(experiment):
    work, recipe, results = experiment
    here = work / "experiment"
    assert json.loads((here / "results.json").read_text()) == results
    assert (here / "results.md").read_text().strip() == markdown(results)
    pair = results["runs"]["42"]
    assert list(pair) == ["raw", "itm web", "itc web", "bootstrapped"]
    for name in pair:
        assert pair[name]["retrieval"]["n"] == 16
        assert sum(pair[name]["captions"][kind]["n"] for kind in ("one object", "two objects")) == 16
    table = markdown(results).splitlines()
    assert [line.split(" | ")[0].lstrip("| ") for line in table[2:6]] == [label for _, _, label in RUNS]


@pytest.mark.slow
def test_bootstrapped_run_trains_on_human_and_the_kept_pairs_with_the_raw_runs_steps_and_seed(experiment):
    work, recipe, _ = experiment
    raw = read_checkpoint(latest_checkpoint(work / "experiment" / "raw-streams2-seed42"))
    boot = read_checkpoint(latest_checkpoint(work / "experiment" / "bootstrapped-streams2-seed42"))
    assert raw["state"]["step"] == boot["state"]["step"] == recipe.pretrain_steps
    assert raw["config"]["streams"] == boot["config"]["streams"] == 2
    assert raw["config"]["train"]["seed"] == boot["config"]["train"]["seed"] == 42
    assert [p.rstrip("/").split("/")[-1] for p in raw["config"]["train"]["data"]["data"]] == ["human", "web"]
    assert [p.rstrip("/").split("/")[-2:] for p in boot["config"]["train"]["data"]["data"]] == [
        ["data", "human"], ["capfilt-nucleus", "kept"]]


@pytest.mark.slow
def test_capfilt_table_counts_every_text_of_the_pipeline_output(experiment):
    work, recipe, results = experiment
    nucleus, beam = work / "experiment" / "capfilt-nucleus", work / "experiment" / "capfilt-beam"
    # Removed: by the filter (below the threshold); a duplicate text passed it, but is not kept either.
    rows = {name: [dict(row, removed=row.get("reason") == "below threshold", kept=name == "kept")
                   for row in pq.read_table(nucleus / name).to_pylist()] for name in ("kept", "rejected")}
    rows = rows["kept"] + rows["rejected"]
    web = [row for row in rows if row["source"] == "web"]
    assert len(web) == recipe.web  # every web text judged once
    kept = [row for row in rows if row["kept"]]
    kept_correct = sum(is_correct(row["text"], scene_from_json(row["scene"])) for row in kept)
    assert results["data"]["bootstrapped"] == {"texts": len(kept), "correct": pytest.approx(kept_correct / len(kept))}
    whole = results["capfilt"]["whole web, nucleus"]
    assert sum(whole[kind]["n"] for kind in ("clean", "mismatch", "partial", "alt") if kind in whole) == recipe.web
    for kind in {row["kind"] for row in web}:
        of_kind = [row for row in web if row["kind"] == kind]
        assert whole[kind]["removed"] == pytest.approx(sum(row["removed"] for row in of_kind) / len(of_kind))
    synthetic = [row for row in rows if row["source"] == "synthetic"]
    correct = sum(is_correct(row["text"], scene_from_json(row["scene"])) for row in synthetic)
    assert whole["synthetic"]["correct"] == pytest.approx(correct / len(synthetic))
    # Beam search ran on web shard 0 only (24 of the 48 images); both methods are measured on those.
    assert results["capfilt"]["compared shards"] == ["00000.parquet"]
    assert sorted(p.name for p in (beam / "kept").glob("*.parquet")) == ["00000.parquet"]
    shard0 = [row for row in synthetic if row["key"] < "000000024"]
    assert len(shard0) == 24
    assert results["capfilt"]["nucleus"]["n"] == results["capfilt"]["beam"]["n"] == len(shard0)
    assert results["capfilt"]["nucleus"]["removed"] == pytest.approx(sum(r["removed"] for r in shard0) / 24)
    assert capfilt_table(nucleus, beam) == results["capfilt"]
    beam_methods = {json.loads(row["capfilt_config"])["sampling"]["method"]
                    for row in pq.read_table(beam / "kept").to_pylist()}
    assert beam_methods == {"beam"}


@pytest.mark.slow
def test_the_baselines_train_on_human_and_the_filtered_web_texts_only_paired_with_the_raw_run(experiment):
    work, recipe, results = experiment
    here = work / "experiment"
    raw = read_checkpoint(latest_checkpoint(here / "raw-streams2-seed42"))
    web_shards = sorted(p.name for p in (work / "data" / "web").glob("*.parquet"))
    for run, folder, capfilt_out in (("itm-web", "web-itm", "capfilt-nucleus"), ("itc-web", "web-itc", "capfilt-itc")):
        baseline = read_checkpoint(latest_checkpoint(here / f"{run}-streams2-seed42"))
        assert baseline["state"]["step"] == raw["state"]["step"] == recipe.pretrain_steps
        assert baseline["config"]["streams"] == 2 and baseline["config"]["train"]["seed"] == 42
        assert [p.rstrip("/").split("/")[-2:] for p in baseline["config"]["train"]["data"]["data"]] == [
            ["data", "human"], ["experiment", folder]]
        # One file per web shard under its name (the paired order), holding that shard's kept web texts only.
        assert sorted(p.name for p in (here / folder).glob("*.parquet")) == web_shards
        for name in web_shards:
            kept = pq.read_table(here / capfilt_out / "kept" / name).to_pylist()
            assert pq.read_table(here / folder / name).to_pylist() == [row for row in kept if row["source"] == "web"]
        assert results["data"][run.replace("-", " ")]["texts"] == sum(
            pq.read_metadata(here / folder / name).num_rows for name in web_shards)


@pytest.mark.slow
def test_the_itc_filter_keeps_itms_share_of_the_web_texts_by_the_itc_cosine(experiment):
    work, recipe, results = experiment
    nucleus, itc = work / "experiment" / "capfilt-nucleus", work / "experiment" / "capfilt-itc"
    stats = json.loads((nucleus / "stats.json").read_text())
    share = stats["kept"]["web"] / stats["texts"]["web"]
    settings = json.loads((itc / "stats.json").read_text())["settings"]
    assert (settings["by"], settings["keep_fraction"], settings["refiltered_from"]) == ("itc", share, str(nucleus))
    assert results["itc filter"] == {"keep fraction": share, "threshold": settings["threshold"]}
    scores = sorted((row["itc_score"] for kind in ("kept", "rejected") for row in pq.read_table(nucleus / kind)
                     .to_pylist() if row["source"] == "web"), reverse=True)
    assert len(scores) == recipe.web
    assert settings["threshold"] == scores[math.ceil(share * len(scores)) - 1]
    kept_web = [row for row in pq.read_table(itc / "kept").to_pylist() if row["source"] == "web"]
    assert len(kept_web) == sum(score >= settings["threshold"] for score in scores) >= round(share * len(scores))
    assert all(row["itc_score"] >= settings["threshold"] for row in kept_web)


def test_web_texts_only_writes_each_kept_files_web_rows_under_its_name(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    for shard in range(2):
        pq.write_table(pa.Table.from_pylist([{"text": f"text {shard} {i}", "source": source, "jpg": b"x"}
                                             for i, source in enumerate(["web", "synthetic", "web", "synthetic"])]),
                       kept / f"{shard:05d}.parquet")
    out = web_texts_only(kept, tmp_path / "web")
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00001.parquet"]
    assert pq.read_table(out / "00001.parquet").column("text").to_pylist() == ["text 1 0", "text 1 2"]
    # Written again only when its source is newer.
    written = (out / "00000.parquet").stat().st_mtime_ns
    web_texts_only(kept, out)
    assert (out / "00000.parquet").stat().st_mtime_ns == written
    pq.write_table(pa.Table.from_pylist([{"text": "new", "source": "web", "jpg": b"x"}]), kept / "00000.parquet")
    os.utime(kept / "00000.parquet", ns=(written + 10**9, written + 10**9))
    web_texts_only(kept, out)
    assert pq.read_table(out / "00000.parquet").column("text").to_pylist() == ["new"]
