"""Compositional negatives (capfilt.shapes.negatives) against the caption parser, and their column in a split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from capfilt.shapes import describe, is_correct, iter_split, parse, read_split, write_split
from capfilt.shapes.captions import replaced
from capfilt.shapes.negatives import AXES, negative_caption, replaced_caption, swapped, wrong_relations


def test_negatives_are_wrong_swaps_or_relations_of_the_true_caption():
    kinds = Counter()
    rng = np.random.default_rng(0)
    for sample in iter_split("human", 600, seed=5):
        negative = negative_caption(sample.scene, rng)
        truth = describe(sample.scene)
        if truth.relation is None:
            assert negative is None  # one object: nothing to swap, no relation
            kinds["none"] += 1
            continue
        wrong = parse(negative)
        assert wrong is not None and not is_correct(negative, sample.scene)
        if wrong.relation != truth.relation:  # the relation replaced, nothing else
            assert wrong.phrases == truth.phrases
            kinds["relation"] += 1
            if truth.phrases[0] == truth.phrases[1]:  # two alike objects: only the other axis is wrong
                kinds["alike"] += 1
                assert {wrong.relation, truth.relation} not in ({"left of", "right of"}, {"above", "below"})
            continue
        # A swap: the same words, rebound, and every attribute value used as often.
        assert truth.phrases[0] != truth.phrases[1]
        assert sorted(negative.split()) == sorted(sample.text.split())
        kinds["objects" if wrong.phrases == truth.phrases[::-1] else "attribute"] += 1
    assert kinds["none"] > 50 and kinds["objects"] > 50 and kinds["attribute"] > 50 and kinds["relation"] > 50
    assert 0 < kinds["alike"] < 20


def test_a_relation_change_reaches_every_wrong_relation():
    scene = next(s.scene for s in iter_split("human", 50, seed=6)
                 if s.scene.relation is not None and len(set(describe(s.scene).phrases)) == 2)
    truth = describe(scene)
    rng = np.random.default_rng(1)
    relations = {parse(negative_caption(scene, rng)).relation for _ in range(300)} - {truth.relation}
    assert relations == set(wrong_relations(truth, scene)) and len(relations) == 3


def test_an_attribute_swap_exchanges_that_attribute_only():
    truth = parse("a small red circle left of a large blue square")
    assert str(swapped(truth, "colour")) == "a small blue circle left of a large red square"
    assert str(swapped(truth, "objects")) == "a large blue square left of a small red circle"
    with pytest.raises(ValueError, match="cannot swap"):
        swapped(truth, "relation")


def test_replaced_negatives_change_one_word_and_are_wrong():
    """A fraction of rows get a negative; it is the true caption with one word replaced, wrong for the scene, a
    relation only on the other axis; every kind is reached, one-object scenes included."""
    kinds, rows, given = Counter(), 0, 0
    rng = np.random.default_rng(0)
    for sample in iter_split("human", 800, seed=5):
        negative = replaced_caption(sample.scene, rng)
        rows += 1
        if negative is None:
            continue
        given += 1
        truth, wrong = describe(sample.scene), parse(negative)
        assert wrong is not None and not is_correct(negative, sample.scene)
        changed = [(i, a) for i, (p, q) in enumerate(zip(truth.phrases, wrong.phrases))
                   for a in ("size", "colour", "shape") if getattr(p, a) != getattr(q, a)]
        if wrong.relation != truth.relation:
            assert not changed and not any({wrong.relation, truth.relation} <= axis for axis in AXES)
            kinds["relation"] += 1
        else:
            assert len(changed) == 1 and len(negative.split()) == len(sample.text.split()), (sample.text, negative)
            kinds[(len(truth.phrases), changed[0][1])] += 1
    assert abs(given / rows - 0.5) < 0.06
    assert kinds["relation"] > 20 and all(kinds[(n, a)] > 10 for n in (1, 2) for a in ("size", "colour", "shape"))
    assert all(replaced_caption(sample.scene, np.random.default_rng(i), fraction=1.0) is not None
               for i, sample in enumerate(iter_split("human", 40, seed=6)))


def test_a_replaced_word_is_that_word_only():
    truth = parse("a small red circle left of a large blue square")
    assert str(replaced(truth, "colour", "green", phrase=1)) == "a small red circle left of a large green square"
    assert str(replaced(truth, "relation", "above")) == "a small red circle above a large blue square"
    with pytest.raises(ValueError, match="cannot replace"):
        replaced(truth, "objects", "x")


def test_a_split_written_with_negatives_carries_them_read_back(tmp_path):
    paths = write_split("human", 30, seed=4, out=tmp_path / "a", shard_size=10, negatives=True)
    again = write_split("human", 30, seed=4, out=tmp_path / "b", shard_size=15, negatives=True)
    rows = list(read_split(tmp_path / "a"))
    for column in ("negative_caption", "replaced_caption"):  # the same whatever the shard size
        assert [r[column] for r in rows] == [r[column] for r in read_split(tmp_path / "b")]
    assert len(paths) == 3 and len(again) == 2
    for row in rows:
        phrases = describe(row["scene"]).phrases
        assert (row["negative_caption"] is not None) == (len(phrases) == 2)
        if row["negative_caption"]:
            assert not is_correct(row["negative_caption"], row["scene"])
        if row["replaced_caption"]:
            assert not is_correct(row["replaced_caption"], row["scene"])
    assert 0 < sum(row["replaced_caption"] is not None for row in rows) < len(rows)
    assert [r["negative_caption"] for r in rows] != [r["replaced_caption"] for r in rows]
    plain = write_split("human", 10, seed=4, out=tmp_path / "c")
    assert not {"negative_caption", "replaced_caption"} & set(pq.read_schema(plain[0]).names)
