"""`make experiment`: the bootstrapping experiment, CapFilt's whole loop in miniature (paper §3.3, Tables 1 and 7).

1. **raw**: a MED pre-trained with ITC + ITM + LM on ``human`` + the raw
   ``web`` split (``make demo-models``' pre-training, reused when done);
2. its captioner and filter fine-tuned on ``human`` (by default the shipped
   demo models, which ``make demo-models`` fine-tuned from that run);
3. CapFilt over the whole ``web`` split with capfilt's own Beam pipeline (the
   ``capfilt bootstrap`` command): nucleus sampling (p = 0.9), K = 1,
   threshold 0.5; and once more with beam search on the first web shard(s),
   for the noise ratio of the paper's Table 1;
4. **bootstrapped**: a fresh MED pre-trained on ``human`` + the pipeline's
   kept pairs (filtered web texts + filtered synthetic captions), with the
   same recipe, steps and seed; and two baselines that isolate the filter,
   with web texts only (no synthetic captions), the same steps and seed:
   **ITM web**, ``human`` + the web texts the ITM filter kept in step 3, and
   **ITC web**, ``human`` + the web texts DataComp's CLIP-score filter keeps
   at the same share of the web texts, on the filter's own ITC head
   (``capfilt refilter --by itc --keep-fraction F`` over step 3's output, F
   read from its stats.json: no model runs again);
5. each evaluated on ``test``: image→text and text→image recall@1 (ITC, and
   ITC's top k re-ranked by ITM) and the correctness of greedy captions from
   the pre-trained decoder (without a prompt: pre-training has none).

Every pre-training deals its 20 Parquet files (10 human shards, and the 10 raw
web shards or the 10 files written for them: CapFilt's ``kept/``, or its web
texts only) to the loader's streams in one seeded order, so with the same seed
each run reads the same human files and the same web shards, raw or filtered:
a paired comparison. ``streams`` 16 mixes 16 files in every batch;
with the demo recipe's single stream a short run reads a few whole files one
after another, and which file came last decides much of the result. Every
stage resumes.
Results go to ``WORK/experiment/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from capfilt.help_format import HelpWithDefaults
from capfilt.recipes.demo import PRETRAIN_SEED, WORK, DemoRecipe, pretrain, write_splits

TEST_SEED = 13  # the test split's seed: the demo recipe renders human with 11 and web with 12


@dataclass(frozen=True)
class ExperimentConfig:
    """What the experiment compares and how it measures; the defaults made docs/experiment.md's results."""

    captioner: str = "demo"  # fine-tuned from the raw run (step 2); any model reference
    filter: str = "demo"  # likewise
    # Pre-training seeds; each pair (raw, bootstrapped) shares one. For the recipe's seed the raw run is
    # make demo-models' own pre-training (WORK/pretrain); other seeds get their own raw run.
    seeds: tuple[int, ...] = (PRETRAIN_SEED,)
    # The loader's file streams in both pre-trainings. 0: the demo recipe's one stream, which reads the
    # 20 files one after another, so a 750-step run sees about five whole files and ends on whichever came
    # last. 16: every batch draws 4 pairs from each of 16 files (the same 16 in both runs of a seed).
    streams: int = 16
    test: int = 1000  # test pairs for recall@1 and caption correctness
    rerank_k: int = 16  # ITC candidates re-ranked by ITM (BLIP: 256 on COCO's 5,000 images)
    beam_shards: str = "0"  # web shards also captioned with beam search (paper Table 1: nucleus vs beam)
    runner: str = "FnApiRunner"  # Beam runner of the CapFilt step


def _say(text: str, start: float) -> None:
    print(f"[experiment] {text} ({(time.time() - start) / 60:.1f} min)", file=sys.stderr, flush=True)


def run_capfilt(web: Path, out: Path, config: ExperimentConfig, method: str | None = None,
                shards: str | None = None) -> Path:
    """Step 3: the CapFilt pipeline over the web shards (``shards``: indices such as ``0-3``; default all),
    with the captioner's own sampling or ``method``; resumes finished shards."""
    from capfilt.pipelines import bootstrap
    from capfilt.pipelines.layout import OutputLayout
    from capfilt.pipelines.report import read_stats
    from capfilt.recipes.bootstrap import select_shards
    from capfilt.pipelines.settings import BootstrapSettings

    settings = BootstrapSettings(captioner=config.captioner, filter=config.filter,
                                 sampling_overrides={"method": method} if method else {})
    bootstrap.run(select_shards(str(web), shards), settings, str(out), runner=config.runner)
    stats = read_stats(OutputLayout(str(out)))
    unfinished = stats["shards"]["errors"] + stats["shards"].get("damaged", [])
    if unfinished:
        raise RuntimeError(f"CapFilt into {out} left {len(unfinished)} shard(s) unfinished or damaged: "
                           f"{unfinished[:3]}; rerun to resume")
    return out


# Greedy captions from a pre-trained decoder: pre-training's LM loss reads "[DEC] text [SEP]", so no prompt;
# 20 tokens fit every shapes caption.
PRETRAINED_SAMPLING = dict(method="greedy", prompt="", min_length=2, max_length=20)


def pretrained_models(checkpoint: Path):
    """The filter and a greedy, prompt-less captioner of a pre-training checkpoint, exported once beside it."""
    from capfilt.captioner import Captioner, SamplingSettings
    from capfilt.filter import Filter
    from capfilt.models.export import export_run

    folders = {role: checkpoint.parent.parent / "export" / checkpoint.name / role for role in ("captioner", "filter")}
    for role, folder in folders.items():
        if not (folder / "config.json").is_file():
            export_run(checkpoint, role, folder)
    return Filter.load(folders["filter"]), Captioner.load(folders["captioner"],
                                                         settings=SamplingSettings(**PRETRAINED_SAMPLING))


def evaluate_run(run: Path, config: ExperimentConfig) -> dict:
    """Step 5 for one pre-trained MED: recall@1 both ways and greedy caption correctness on ``test``."""
    from capfilt.models.checkpointing import latest_checkpoint
    from capfilt.recipes.evaluate import evaluate_captioner, evaluate_retrieval
    from capfilt.shapes.splits import iter_split

    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise FileNotFoundError(f"no training checkpoint in {run}")
    cached = run / "evaluation.json"
    key = {"checkpoint": checkpoint.name, "test": config.test, "test_seed": TEST_SEED,
           "rerank_k": config.rerank_k, "sampling": PRETRAINED_SAMPLING}
    if cached.is_file() and json.loads(cached.read_text()).get("key") == key:
        return json.loads(cached.read_text())["results"]
    samples = list(iter_split("test", config.test, TEST_SEED))
    filter_, captioner = pretrained_models(checkpoint)
    captions = evaluate_captioner(captioner, samples, methods=("greedy",))["greedy"]
    results = {"retrieval": evaluate_retrieval(filter_, samples, config.rerank_k),
               "captions": {kind: {"n": r["n"], "correct": r["correct"], "wrong": r["wrong"]}
                            for kind, r in captions.items()}}
    results["checkpoint"] = checkpoint.name
    results["captions"]["all"] = {
        "n": len(samples), "correct": sum(r["n"] * r["correct"] for r in captions.values()) / len(samples)}
    cached.write_text(json.dumps({"key": key, "results": results}, indent=2) + "\n")
    return results


def _rows(folder: Path, names: set[str] | None = None) -> list[dict]:
    """``text``, ``source``, ``kind``, ``scene`` and (rejected/) ``reason`` of the pairs of a CapFilt output."""
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.parquet"))
    files = [f for f in files if names is None or f.name in names]
    rows = []
    for f in files:
        columns = ["text", "source", "kind", "scene"] + (["reason"] if "reason" in pq.read_schema(f).names else [])
        rows += pq.read_table(f, columns=columns).to_pylist()
    return rows


def capfilt_table(nucleus: Path, beam: Path) -> dict:
    """Step 3's measures: removal per web-text kind; noise ratio and correctness of synthetic captions."""
    from capfilt.pipelines.schema import BELOW_THRESHOLD
    from capfilt.shapes import is_correct, scene_from_json
    from capfilt.recipes.evaluate import scene_type

    def tally(out: Path, names: set[str] | None) -> dict:
        counts: Counter = Counter()
        for kept, folder in ((True, out / "kept"), (False, out / "rejected")):
            for row in _rows(folder, names):
                scene = scene_from_json(row["scene"])
                kind = row["kind"] if row["source"] == "web" else "synthetic"
                correct = is_correct(row["text"], scene)
                # Removed by the filter: a duplicate text (or one outside --select's top n) passed it.
                removed = not kept and row.get("reason", BELOW_THRESHOLD) == BELOW_THRESHOLD
                for group in (kind, f"{kind}/{scene_type(scene)}"):
                    counts[(group, "n")] += 1
                    counts[(group, "removed")] += removed
                    counts[(group, "correct")] += correct
                    counts[(group, "kept correct")] += correct and kept
                    counts[(group, "kept")] += kept
        groups = sorted({group for group, _ in counts})
        return {group: {"n": counts[(group, "n")],
                        "removed": counts[(group, "removed")] / counts[(group, "n")],
                        "correct": counts[(group, "correct")] / counts[(group, "n")],
                        "kept": counts[(group, "kept")],
                        "kept correct": counts[(group, "kept correct")],
                        "correct among kept": (counts[(group, "kept correct")] / counts[(group, "kept")]
                                               if counts[(group, "kept")] else None)}
                for group in groups}

    compared = {f.name for f in (beam / "kept").glob("*.parquet")}
    return {"whole web, nucleus": tally(nucleus, None),
            "compared shards": sorted(compared),
            "nucleus": tally(nucleus, compared)["synthetic"],
            "beam": tally(beam, compared)["synthetic"]}


def text_quality(web: Path, column: str = "caption") -> dict:
    """How many texts the web shards hold and the fraction the parser calls correct: the raw ``web`` split's
    (``caption``), or a folder of CapFilt's kept rows (``text``)."""
    import pyarrow.parquet as pq

    from capfilt.shapes import is_correct, scene_from_json

    texts = correct = 0
    for path in sorted(web.glob("*.parquet")):
        table = pq.read_table(path, columns=["scene", column])
        for scene, text in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
            texts += 1
            correct += is_correct(text, scene_from_json(scene))
    return {"texts": texts, "correct": correct / texts if texts else None}


def kept_quality(whole: dict) -> dict:
    """The same for CapFilt's kept texts, from ``capfilt_table``'s tally of the whole web (already parsed)."""
    groups = [group for group in whole if "/" not in group]  # each text once: the kinds and "synthetic"
    texts = sum(whole[group]["kept"] for group in groups)
    correct = sum(whole[group]["kept correct"] for group in groups)
    return {"texts": texts, "correct": correct / texts if texts else None}


def web_keep_share(out: Path) -> float:
    """The share of its web texts a CapFilt run kept (web texts in kept/ over web texts judged), from stats.json."""
    from capfilt.pipelines.layout import OutputLayout
    from capfilt.pipelines.report import read_stats

    stats = read_stats(OutputLayout(str(out)))
    return stats["kept"]["web"] / stats["texts"]["web"]


def itc_filter(capfilt_out: Path, out: Path, share: float) -> dict:
    """DataComp's CLIP-score filter on the filter's own ITC head, from a CapFilt output's stored scores: the web
    texts' top ``share`` by ITC (``capfilt refilter --by itc --keep-fraction``; no model runs). Resumes; returns
    its stats."""
    from capfilt.pipelines.refilter import RefilterSettings, refilter

    return refilter(RefilterSettings(keep_fraction=share, by="itc"), str(capfilt_out), str(out))


def web_texts_only(kept: Path, out: Path) -> Path:
    """The web texts of a CapFilt ``kept/`` folder, without its synthetic captions: one file per shard under the
    same name (the paired file order). A file is written (through a temporary name) when missing or older than its
    source."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    for source in sorted(kept.glob("*.parquet")):
        target = out / source.name
        if target.is_file() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns:
            continue
        table = pq.read_table(source)
        temp = out / f".{source.name}.tmp"  # not *.parquet: the trainer never reads a half-written file
        pq.write_table(table.filter(pc.equal(table.column("source"), "web")), temp, row_group_size=256)
        os.replace(temp, target)
    return out


# The pre-trainings compared, in the table's order: (results key, run folder prefix, label).
RUNS = (("raw", "raw", "human + raw web"),
        ("itm web", "itm-web", "human + ITM-filtered web texts"),
        ("itc web", "itc-web", "human + ITC-filtered web texts (same share)"),
        ("bootstrapped", "bootstrapped", "human + CapFilt web"))


def run_experiment(recipe: DemoRecipe = DemoRecipe(), work: Path = WORK,
                   config: ExperimentConfig = ExperimentConfig()) -> dict:
    """Steps 1 to 5; every stage resumes. Returns the results (also in ``work/experiment``)."""
    start, here = time.time(), work / "experiment"
    folders = write_splits(recipe, work)
    nucleus = run_capfilt(folders["web"], here / "capfilt-nucleus", config)
    _say("CapFilt over web (nucleus) done", start)
    _check_paired(folders["web"], nucleus / "kept")
    beam = run_capfilt(folders["web"], here / "capfilt-beam", config, method="beam", shards=config.beam_shards)
    _say("CapFilt over the compared shards (beam) done", start)
    table = capfilt_table(nucleus, beam)
    # The baselines: the web texts ITM kept, and the same share of them by ITC (DataComp's CLIP-score filter).
    share = web_keep_share(nucleus)
    itc = itc_filter(nucleus, here / "capfilt-itc", share)
    _say(f"ITC filter at ITM's share of the web texts ({share:.1%}) done", start)
    web_data = {"itm web": web_texts_only(nucleus / "kept", here / "web-itm"),
                "itc web": web_texts_only(here / "capfilt-itc" / "kept", here / "web-itc")}
    for folder in web_data.values():
        _check_paired(folders["web"], folder)
    results = {"recipe": asdict(recipe), "config": asdict(config), "test_seed": TEST_SEED, "capfilt": table,
               "data": {"raw": text_quality(folders["web"]), "bootstrapped": kept_quality(table["whole web, nucleus"]),
                        **{name: text_quality(folder, "text") for name, folder in web_data.items()}},
               "itc filter": {"keep fraction": share, "threshold": itc["settings"]["threshold"]},
               "runs": {}}
    suffix = f"-streams{config.streams}" if config.streams else ""
    for seed in config.seeds:
        # With the recipe's own seed and stream the raw run is make demo-models' pre-training.
        reuse = seed == PRETRAIN_SEED and not config.streams
        data = {"raw": folders["web"], "bootstrapped": nucleus / "kept", **web_data}
        prefixes = {name: prefix for name, prefix, _ in RUNS}
        runs = {}
        for name in ("raw", "bootstrapped", "itm web", "itc web"):  # the baselines last: they came later
            out = work / "pretrain" if name == "raw" and reuse else here / f"{prefixes[name]}{suffix}-seed{seed}"
            runs[name] = pretrain(recipe, work, [folders["human"], data[name]], out, seed, config.streams)
            _say(f"{name} pre-training (seed {seed}) done", start)
        results["runs"][str(seed)] = {name: evaluate_run(runs[name], config) for name, _, _ in RUNS}
        _say(f"evaluated seed {seed}", start)
    results = json.loads(json.dumps(results))  # as results.json reads back (tuples become lists)
    (here / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (here / "results.md").write_text(markdown(results) + "\n")
    return results


def _check_paired(raw: Path, kept: Path) -> None:
    """Raw and bootstrapped runs read the same files in the same order only if each web shard has its kept file."""
    raw_files = sorted(p.name for p in raw.glob("*.parquet"))
    kept_files = sorted(p.name for p in kept.glob("*.parquet"))
    if raw_files != kept_files:
        raise RuntimeError(f"{kept} holds {len(kept_files)} file(s) for {len(raw_files)} web shard(s): "
                           "rerun to finish CapFilt before the bootstrapped pre-training")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def markdown(results: dict) -> str:
    """The results as Markdown tables (docs/experiment.md's)."""
    streams = results["config"]["streams"] or 1
    lines = ["| pre-training data | seed, streams | image→text R@1 (ITC / +ITM) | text→image R@1 (ITC / +ITM) "
             "| captions correct: one object | two objects | all |", "| --- |" + " --- |" * 6]
    for seed, pair in results["runs"].items():
        for name, _, label in RUNS:
            r, c = pair[name]["retrieval"], pair[name]["captions"]
            lines.append(f"| {label} | {seed}, {streams} | {r['image_to_text_itc']:.1%} / {r['image_to_text_itm']:.1%} "
                         f"| {r['text_to_image_itc']:.1%} / {r['text_to_image_itm']:.1%} "
                         f"| {c['one object']['correct']:.1%} | {c['two objects']['correct']:.1%} "
                         f"| {c['all']['correct']:.1%} |")
    data, itc = results["data"], results["itc filter"]
    lines += ["", "| web part of the pre-training data | texts | correct (parser) |", "| --- | --- | --- |",
              f"| raw web | {data['raw']['texts']} | {data['raw']['correct']:.1%} |",
              f"| ITM-filtered web texts (the web texts CapFilt kept: {itc['keep fraction']:.1%}) "
              f"| {data['itm web']['texts']} | {_percent(data['itm web']['correct'])} |",
              f"| ITC-filtered web texts (the same share by ITC: cosine ≥ {itc['threshold']:.4f}) "
              f"| {data['itc web']['texts']} | {_percent(data['itc web']['correct'])} |",
              f"| CapFilt web (kept web texts + kept synthetic captions) | {data['bootstrapped']['texts']} "
              f"| {data['bootstrapped']['correct']:.1%} |"]
    whole = results["capfilt"]["whole web, nucleus"]
    lines += ["", "| text | n | removed by the filter | correct (parser) | correct among kept |",
              "| --- | --- | --- | --- | --- |"]
    for group in ("clean", "mismatch", "partial", "alt", "synthetic", "synthetic/one object",
                  "synthetic/two objects"):
        if group in whole:
            g = whole[group]
            lines.append(f"| {group} | {g['n']} | {g['removed']:.1%} | {g['correct']:.1%} "
                         f"| {_percent(g['correct among kept'])} |")
    compared = ", ".join(name.removesuffix(".parquet") for name in results["capfilt"]["compared shards"])
    lines += ["", f"| synthetic captions, web shard(s) {compared} | n | noise ratio (removed) "
              "| correct (parser) | correct among kept |", "| --- | --- | --- | --- | --- |"]
    for method in ("nucleus", "beam"):
        g = results["capfilt"][method]
        lines.append(f"| {method} | {g['n']} | {g['removed']:.1%} | {g['correct']:.1%} "
                     f"| {_percent(g['correct among kept'])} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capfilt experiment", description=__doc__.split("\n")[0],
                                     formatter_class=HelpWithDefaults)
    parser.add_argument("--work", default=str(WORK), help="make demo-models' work folder (splits, runs; resumable)")
    for name, value in asdict(ExperimentConfig()).items():
        flag = "--" + name.replace("_", "-")
        help_text = f"default: {' '.join(map(str, value)) if isinstance(value, tuple) else value} (ExperimentConfig)"
        if isinstance(value, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=list(value), help=help_text)
        else:
            parser.add_argument(flag, type=type(value), default=value, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    work = Path(args.pop("work"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = ExperimentConfig(**{**args, "seeds": tuple(args["seeds"])})
    from capfilt.models.loop import TrainingStopped

    try:
        print(markdown(run_experiment(DemoRecipe(), work, config)))
    except TrainingStopped as stopped:  # a pre-training's checkpoint is saved: one line, not a traceback
        print(f"[experiment] pre-training {stopped}", file=sys.stderr, flush=True)
        sys.exit(stopped.status)


if __name__ == "__main__":
    main()
