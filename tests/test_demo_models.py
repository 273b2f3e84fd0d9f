"""The shipped demo models on `make bootstrap`'s path, scored against the shapes world's ground truth.

The split is fresh (a seed no training split used); the pipeline's own
output (kept/ and rejected/, which carry each pair's ``kind`` and ``scene``)
is scored with the world's caption parser. Each floor below is issue 5's
target less a margin for the sample size (where shipped models do not reach a
target, the level they reach less that margin; none at present). The same
floors hold on the changed rendering (``capfilt evaluate --rendering changed``,
issue 20). docs/demo.md, "How good they are", gives the full numbers.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from capfilt import cli
from capfilt.captioner import Captioner
from capfilt.filter import Filter
from capfilt.shapes.captions import caption_errors, is_correct
from capfilt.recipes.evaluate import (
    EVALUATION_SEED, evaluate_captioner, evaluate_filter, evaluate_relation, scene_type, table,
)
from capfilt.shapes.rerender import rerender
from capfilt.shapes.scene import scene_from_json
from capfilt.shapes.splits import iter_split

PAIRS = 240
MARGIN = 0.07  # about two standard errors at the sample sizes below
TWO_OBJECT_MARGIN = 0.10  # about 2.7 standard errors of a rate near 80% on the split's 116 two-object scenes

# What the tests hold the shipped models to. Issue 5's targets: filter removes 95% of mismatch and alt
# texts, 80% of partial ones and keeps 95% of clean ones; captions correct 90% / 70% (one / two objects)
# with nucleus sampling, 95% / 80% with greedy or beam search. The shipped models meet every target on
# 1,000 fresh pairs (docs/demo.md, "How good they are": the filter removes 85.1% of partial texts and keeps
# 97.5% of clean ones; captions two objects 83.5% greedy, 84.6% beam, 80.2% nucleus), so each floor is the
# target less the margin. On this test's 240 pairs the captioner reaches 81.0% greedy, 81.9% beam and 80.2%
# nucleus on the 116 two-object scenes, hence the wider margin there.
FLOORS = {
    "filter": {"mismatch": 0.95 - MARGIN, "alt": 0.95 - MARGIN, "partial": 0.80 - MARGIN,
               "clean_kept": 0.95 - MARGIN},
    "nucleus": {"one object": 0.90 - MARGIN, "two objects": 0.70 - TWO_OBJECT_MARGIN},
    "search": {"one object": 0.95 - MARGIN, "two objects": 0.80 - TWO_OBJECT_MARGIN},
}
# Issue 20 holds the models to the same targets on the changed rendering (the same scenes drawn by
# capfilt.shapes.rerender). On 1,000 fresh pairs they meet them all: the filter keeps 97.3% of clean texts and
# removes 85.1% of partial ones; captions two objects 80.8% greedy, 82.5% beam, 77.7% nucleus. On this test's
# 240 pairs: clean kept 95.6%, partial removed 87.9%, two objects 86.2% greedy and beam, 79.3% nucleus.
CHANGED_FLOORS = FLOORS
# The floors would also pass the models shipped before issue 20's training (2026-11-27). What that training
# changed shows in the filter's loss of clean texts between renderings, on the same 445 clean texts of 1,000 fresh
# pairs: the filter of 2026-11-27 kept 97.5% plain and 91.7% changed (5.8 points lost), the next one (shipped in
# the morning of 2026-12-04) 96.6% and 94.4% (2.2), the shipped one 97.5% and 97.3% (0.2). 240 pairs cannot tell
# them apart (the first two lose 4.4 and 3.5 points there, the shipped one 3.5), hence a split of its own. The
# limit, 2 points, allows 8 of the 445 texts: the shipped filter loses 1 net, the morning's 10, the first 26. It
# was set after those were measured, on this split.
DROP_PAIRS = 1000
MAX_CLEAN_KEPT_DROP = 0.02


def assert_floors(rates: dict[str, float], floors: dict[str, float], what: str) -> None:
    """Every rate at or above its floor; a failure names all the rates below theirs."""
    below = {name: (rates[name], floor) for name, floor in floors.items() if rates[name] < floor}
    assert not below, f"{what}: below the floor (rate, floor): {below}; all rates: {rates}"


@pytest.fixture(scope="module")
def bootstrap_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    code = cli.main(["bootstrap", "--out", str(out), "--demo-size", str(PAIRS), "--demo-seed", str(EVALUATION_SEED),
                     "--demo-shard-size", "120", "--torch-threads", "2"])
    assert code == 0
    kept = [dict(row, kept=True) for row in pq.read_table(out / "kept").to_pylist()]
    rejected = [dict(row, kept=False) for row in pq.read_table(out / "rejected").to_pylist()]
    return kept + rejected


def test_every_pair_is_judged_once(bootstrap_rows):
    web = [row for row in bootstrap_rows if row["source"] == "web"]
    synthetic = [row for row in bootstrap_rows if row["source"] == "synthetic"]
    assert len(web) == len(synthetic) == PAIRS  # K = 1: one web text and one caption per image
    assert len({row["key"] for row in web}) == PAIRS


def test_filter_removes_noise_and_keeps_clean_texts(bootstrap_rows):
    web = [row for row in bootstrap_rows if row["source"] == "web"]
    rates = {}
    for kind in ("mismatch", "alt", "partial"):
        rows = [row for row in web if row["kind"] == kind]
        rates[kind] = sum(not row["kept"] for row in rows) / len(rows)
    clean = [row for row in web if row["kind"] == "clean"]
    rates["clean_kept"] = sum(row["kept"] for row in clean) / len(clean)
    assert_floors(rates, FLOORS["filter"], "filter")


def test_nucleus_captions_are_correct(bootstrap_rows):
    tally: dict[str, list[bool]] = {}
    for row in bootstrap_rows:
        if row["source"] == "synthetic":
            scene = scene_from_json(row["scene"])
            tally.setdefault(scene_type(scene), []).append(is_correct(row["text"], scene))
    assert_floors({kind: sum(flags) / len(flags) for kind, flags in tally.items()}, FLOORS["nucleus"], "nucleus")


def test_greedy_and_beam_captions_are_correct():
    samples = list(iter_split("web", PAIRS, EVALUATION_SEED))  # the images the pipeline judged above
    results = evaluate_captioner(Captioner.load("demo"), samples, methods=("greedy", "beam"))
    for method, by_kind in results.items():
        assert_floors({kind: by_kind[kind]["correct"] for kind in by_kind}, FLOORS["search"], method)


@pytest.fixture(scope="module")
def changed_samples():
    """The same scenes and texts as above, their images drawn by the second renderer (``--rendering changed``)."""
    return [rerender(sample, EVALUATION_SEED) for sample in iter_split("web", PAIRS, EVALUATION_SEED)]


def test_filter_holds_up_when_the_rendering_changes(changed_samples):
    """Issue 20: a filter that learned the world, not capfilt's renderer, holds up on other pixels."""
    results = evaluate_filter(Filter.load("demo"), changed_samples)
    rates = {kind: results[kind]["removed"] for kind in ("mismatch", "alt", "partial")}
    rates["clean_kept"] = 1 - results["clean"]["removed"]
    assert_floors(rates, CHANGED_FLOORS["filter"], "filter, changed rendering")


def test_filter_keeps_clean_texts_nearly_as_often_when_the_rendering_changes():
    clean = [sample for sample in iter_split("web", DROP_PAIRS, EVALUATION_SEED) if sample.kind == "clean"]
    filter_ = Filter.load("demo")
    plain = 1 - evaluate_filter(filter_, clean)["clean"]["removed"]
    changed = 1 - evaluate_filter(filter_, [rerender(sample, EVALUATION_SEED) for sample in clean])["clean"]["removed"]
    assert plain - changed <= MAX_CLEAN_KEPT_DROP, (plain, changed)


def test_captions_hold_up_when_the_rendering_changes(changed_samples):
    results = evaluate_captioner(Captioner.load("demo"), changed_samples)
    for method, by_kind in results.items():
        floors = CHANGED_FLOORS["nucleus" if method == "nucleus" else "search"]
        assert_floors({kind: by_kind[kind]["correct"] for kind in by_kind}, floors, f"{method}, changed rendering")


def test_evaluation_splits_every_judgement_by_scene_and_attribute(bootstrap_rows):
    """evaluate_filter's breakdowns add up to the pipeline's own judgements of the same pairs."""
    samples = list(iter_split("web", PAIRS, EVALUATION_SEED))
    results = evaluate_filter(Filter.load("demo"), samples)
    web = {row["key"]: row for row in bootstrap_rows if row["source"] == "web"}
    assert len(web) == len(samples)
    for kind, r in results.items():
        rows = [row for row in web.values() if row["kind"] == kind]
        assert r["n"] == len(rows) == sum(part["n"] for part in r["by_scene"].values())
        for name, part in r["by_scene"].items():
            judged = [not row["kept"] for row in rows if scene_type(scene_from_json(row["scene"])) == name]
            assert part["n"] == len(judged)
            assert abs(part["removed"] - sum(judged) / len(judged)) <= 1 / len(judged)  # batch composition aside
    changed = {}
    for row in web.values():
        if row["kind"] == "partial":
            (attribute,) = caption_errors(row["text"], scene_from_json(row["scene"]))
            changed[attribute] = changed.get(attribute, 0) + 1
    assert {name: part["n"] for name, part in results["partial"]["by_attribute"].items()} == changed
    rendered = table(results, None)
    assert "| partial text, attribute changed |" in rendered and "two objects: removed (n)" in rendered


def test_relation_probe_ranks_as_greedy_decoding_continues():
    """evaluate_relation's top relation is the word transformers' greedy generate writes after the same prefix."""
    import torch

    from capfilt.shapes.captions import describe
    from capfilt.shapes.world import RELATIONS

    captioner = Captioner.load("demo")
    samples = [s for s in iter_split("web", 60, EVALUATION_SEED) if s.scene.relation is not None]
    results = evaluate_relation(captioner, samples, batch_size=7)  # batches of different sizes
    assert results["n"] == len(samples) and abs(sum(results["predicted"].values()) - 1) < 1e-9
    firsts = {captioner.tokenizer(r.split(" ")[0], add_special_tokens=False).input_ids[0]: r for r in RELATIONS}
    tally = dict.fromkeys(RELATIONS, 0)
    correct = 0
    for sample in samples:
        ids = captioner.tokenizer(f"{captioner.settings.prompt}{describe(sample.scene).phrases[0]}").input_ids[:-1]
        ids = torch.tensor([[captioner.ids.dec, *ids[1:]]])
        image_embeds = captioner.model.vision_model(pixel_values=captioner.preprocess([sample.image])).last_hidden_state
        allowed = list(firsts)  # the probe compares the relations' first words only
        out = captioner.model.text_decoder.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=image_embeds,
            max_new_tokens=1, do_sample=False, eos_token_id=captioner.ids.sep, pad_token_id=captioner.ids.pad,
            prefix_allowed_tokens_fn=lambda batch, sent: allowed)
        relation = firsts[int(out[0, -1])]
        tally[relation] += 1
        correct += relation == sample.scene.relation
    assert results["predicted"] == {r: count / len(samples) for r, count in tally.items()}
    assert results["correct"] == correct / len(samples)
    # The shipped captioner knows a relation's direction, not just its axis: 92.7% true relation first on 1,000
    # fresh pairs (chance 25%); the floor allows about three standard errors on these few scenes.
    assert len(samples) >= 25 and results["correct"] >= 0.70


def test_swap_probe_scores_each_swap_as_the_filter_scores_it_alone():
    """evaluate_swaps counts the swaps the scenes allow, and its comparisons are the filter's own, pair by pair."""
    from capfilt.shapes.captions import describe
    from capfilt.recipes.evaluate import evaluate_swaps
    from capfilt.shapes.negatives import swapped

    filter_ = Filter.load("demo")
    samples = list(iter_split("web", 40, EVALUATION_SEED))
    results = evaluate_swaps(filter_, samples, batch_size=5)
    want: dict[str, list[tuple[bool, bool]]] = {}
    for sample in samples:
        truth = describe(sample.scene)
        if truth.relation is None or truth.phrases[0] == truth.phrases[1]:
            continue
        first, second = truth.phrases
        for kind in ["objects"] + [a for a in ("size", "colour", "shape") if getattr(first, a) != getattr(second, a)]:
            (true, swap), = filter_.score([sample.image], [[str(truth), str(swapped(truth, kind))]])
            want.setdefault(kind, []).append((true.itm > swap.itm, swap.itm < 0.5))
    assert set(results) == set(want) and "objects" in results
    for kind, pairs in want.items():
        assert results[kind]["n"] == len(pairs)
        assert abs(results[kind]["true_higher"] - sum(h for h, _ in pairs) / len(pairs)) <= 1 / len(pairs)
        assert abs(results[kind]["removed"] - sum(r for _, r in pairs) / len(pairs)) <= 1 / len(pairs)
