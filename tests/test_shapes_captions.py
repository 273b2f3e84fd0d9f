"""Captions, the parser and the web texts (docs/shapes.md)."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from capfilt.shapes import (
    VOCABULARY,
    Parse,
    Phrase,
    caption,
    caption_errors,
    correct_captions,
    draw_kind,
    is_correct,
    parse,
    sample_scene,
    web_text,
)
from capfilt.shapes.web import ALT_TEMPLATES, alt_text
from capfilt.vocab import compact_tokenizer

SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PHRASE = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
ONE = re.compile(rf"^{PHRASE}$")
TWO = re.compile(rf"^{PHRASE} ({'|'.join(RELATIONS)}) {PHRASE}$")


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(7)
    return [sample_scene(rng) for _ in range(300)]


def slots(text):
    """The caption's words as (size, colour, shape, …, relation) slots, read with the spec's regexes."""
    m = ONE.match(text) or TWO.match(text)
    return m.groups() if m else None


def truth_slots(scene):
    words = [w for o in scene.objects for w in (o.size, o.colour, o.shape)]
    if scene.relation is None:
        return tuple(words)
    return (*words[:3], scene.relation, *words[3:])


def test_canonical_caption_follows_the_grammar(scenes):
    for scene in scenes:
        text = caption(scene)
        assert slots(text) == truth_slots(scene)  # object A first, every attribute named
        assert is_correct(text, scene)


def test_parse_accepts_every_sentence_of_the_grammar():
    phrases = [Phrase(*p) for p in itertools.product(SIZES, COLOURS, SHAPES)]
    for p in phrases:
        text = f"a {p.size} {p.colour} {p.shape}"
        assert parse(text) == Parse((p,))
    for p, relation, q in itertools.product(phrases[::5], RELATIONS, phrases[::3]):
        text = f"a {p.size} {p.colour} {p.shape} {relation} a {q.size} {q.colour} {q.shape}"
        assert parse(text) == Parse((p, q), relation)
        assert str(parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a",
        "a small red",
        "A small red circle",
        "a small red circle.",
        "a Small red circle",
        "a small red circle ",
        " a small red circle",
        "a  small red circle",
        "a small red circle\n",
        "a small\tred circle",
        "an small red circle",
        "the small red circle",
        "small red circle",
        "a red small circle",
        "a small red circles",
        "a medium red circle",
        "a small pink circle",
        "a small red oval",
        "a small red circle please",
        "a small red circle left a large blue square",
        "a small red circle left of large blue square",
        "a small red circle to the left of a large blue square",
        "a small red circle left of a large blue square and",
        "a small red circle above a large blue square above a small red circle",
        "a small red circle, left of a large blue square",
        "a small red circle next to a large blue square",
        "a small red circle above",
    ],
)
def test_parse_rejects_text_outside_the_grammar(text):
    assert parse(text) is None


def test_correct_captions_are_exactly_the_canonical_and_converse(scenes):
    for scene in scenes:
        truth = truth_slots(scene)
        if scene.relation is None:
            expected = {"a {} {} {}".format(*truth)}
        else:
            a, b = truth[:3], truth[4:]
            expected = {
                "a {} {} {} {} a {} {} {}".format(*a, scene.relation, *b),
                "a {} {} {} {} a {} {} {}".format(*b, CONVERSE[scene.relation], *a),
            }
        assert set(correct_captions(scene)) == expected
        for text in expected:
            assert is_correct(text, scene)


def test_every_single_change_is_wrong_unless_it_names_the_same_scene(scenes):
    """Every caption one word away from a correct one is rejected, except where it is itself correct."""
    for scene in scenes[:120]:
        truth = list(truth_slots(scene))
        accepted = set(correct_captions(scene))
        options = [SIZES, COLOURS, SHAPES] * 2
        if scene.relation is not None:
            options.insert(3, RELATIONS)
        for i, values in enumerate(options[: len(truth)]):
            for value in values:
                if value == truth[i]:
                    continue
                changed = truth[:i] + [value] + truth[i + 1 :]
                text = ("a {} {} {}" if len(changed) == 3 else "a {} {} {} {} a {} {} {}").format(*changed)
                # correct only as the converse of two identical objects
                assert is_correct(text, scene) == (text in accepted)
                if text in accepted:
                    assert changed[:3] == changed[4:] and value == CONVERSE[scene.relation]


def test_wrong_object_count_and_swapped_order_are_wrong(scenes):
    for scene in scenes:
        text = caption(scene)
        if scene.relation is None:
            assert not is_correct(f"{text} left of {text}", scene)
            assert not is_correct(f"{text} above a small red circle", scene)
        else:
            first = text.split(f" {scene.relation} ")[0]
            assert not is_correct(first, scene)
            a, b = scene.objects
            swapped = f"a {b.size} {b.colour} {b.shape} {scene.relation} a {a.size} {a.colour} {a.shape}"
            identical = (a.size, a.colour, a.shape) == (b.size, b.colour, b.shape)
            assert is_correct(swapped, scene) == identical
        assert not is_correct(text.upper(), scene)
        assert not is_correct(text + ".", scene)
        assert not is_correct(text + " here", scene)


def test_caption_errors_name_each_wrong_slot(scenes):
    """caption_errors reads the slots the spec's regexes see: none for a correct caption, one per changed slot."""
    for scene in scenes[:120]:
        truth = list(truth_slots(scene))
        names = ["size", "colour", "shape", "relation", "size", "colour", "shape"] if scene.relation else \
            ["size", "colour", "shape"]
        options = [SIZES, COLOURS, SHAPES, RELATIONS, SIZES, COLOURS, SHAPES] if scene.relation else \
            [SIZES, COLOURS, SHAPES]
        readings = [truth]
        if scene.relation:  # the converse names B first; a change to it is as wrong as one to the canonical
            readings.append(truth[4:] + [CONVERSE[truth[3]]] + truth[:3])
        template = "a {} {} {}" if len(truth) == 3 else "a {} {} {} {} a {} {} {}"
        for reading in readings:
            assert caption_errors(template.format(*reading), scene) == ()
            for i, values in enumerate(options):
                for value in values:
                    changed = reading[:i] + [value] + reading[i + 1:]
                    text = template.format(*changed)
                    if value != reading[i] and not is_correct(text, scene):
                        assert caption_errors(text, scene) == (names[i],), (text, scene)
        if scene.relation:
            a_changed = [COLOURS[(COLOURS.index(truth[1]) + 1) % 8]] + [SHAPES[(SHAPES.index(truth[2]) + 1) % 3]]
            text = template.format(truth[0], *a_changed, *truth[3:])
            if not is_correct(text, scene):
                assert sorted(caption_errors(text, scene)) in (["colour", "shape"], ["colour", "relation", "shape"])
            assert caption_errors("a {} {} {}".format(*truth[:3]), scene) == ("object count",)
        else:
            assert caption_errors(f"{caption(scene)} left of {caption(scene)}", scene) == ("object count",)
        assert caption_errors(caption(scene) + ".", scene) == ("unparsed",)
        assert caption_errors("click here for more", scene) == ("unparsed",)


def test_vocabulary_is_the_words_of_correct_captions():
    spec_words = {"a", "of", *SIZES, *COLOURS, *SHAPES, "left", "right", "above", "below"}
    assert set(VOCABULARY) == spec_words and len(VOCABULARY) == len(spec_words)


def test_vocabulary_builds_a_tokenizer_with_one_id_per_caption_word(tmp_path, scenes):
    tokenizer = compact_tokenizer(list(VOCABULARY), tmp_path)
    for scene in scenes[:50]:
        text = caption(scene)
        tokens = tokenizer.tokenize(text)
        assert tokens == text.split(" ")


def test_web_mixture_and_kinds():
    """Over a few thousand web texts: the default mixture, and each kind behaves as the spec says."""
    rng = np.random.default_rng(99)
    n = 4000
    counts = Counter()
    changed_attributes = Counter()
    for _ in range(n):
        scene = sample_scene(rng)
        kind = draw_kind(rng)
        text = web_text(scene, kind, rng)
        counts[kind] += 1
        if kind == "clean":
            assert is_correct(text, scene)
        elif kind == "mismatch":
            assert parse(text) is not None and not is_correct(text, scene)
        elif kind == "partial":
            assert parse(text) is not None and not is_correct(text, scene)
            got, want = slots(text), truth_slots(scene)
            assert len(got) == len(want)
            diffs = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
            assert len(diffs) == 1
            changed_attributes[("size", "colour", "shape", "relation", "size", "colour", "shape")[diffs[0]]] += 1
        else:
            assert kind == "alt" and parse(text) is None
    expected = {"clean": 0.45, "mismatch": 0.25, "partial": 0.15, "alt": 0.15}
    for kind, share in expected.items():
        assert abs(counts[kind] / n - share) < 0.03, (kind, counts)
    assert set(changed_attributes) == {"size", "colour", "shape", "relation"}


def test_custom_mixture():
    rng = np.random.default_rng(1)
    kinds = Counter(draw_kind(rng, {"clean": 0.5, "alt": 0.5}) for _ in range(1000))
    assert set(kinds) == {"clean", "alt"} and abs(kinds["clean"] - 500) < 60
    with pytest.raises(ValueError):
        draw_kind(rng, {"noisy": 1.0})


def test_partial_of_identical_objects_is_never_the_converse():
    """Two identical objects: swapping the relation to its converse would still be correct, so it is never drawn."""
    rng = np.random.default_rng(4)
    scene = next(s for s in iter(lambda: sample_scene(rng), None) if s.relation is not None)
    a, b = scene.objects
    twin = replace(scene, objects=(a, replace(b, size=a.size, colour=a.colour, shape=a.shape)))
    for _ in range(300):
        assert not is_correct(web_text(twin, "partial", rng), twin)


def test_alt_texts_are_varied_and_outside_the_vocabulary():
    rng = np.random.default_rng(0)
    texts = [alt_text(rng) for _ in range(3000)]
    assert len(set(texts)) > 300
    assert {"untitled", "click here for more", "free shipping on all orders"} <= set(texts)
    assert any(re.fullmatch(r"img_\d{4}\.jpg", t) for t in texts)
    assert any(re.fullmatch(r"photo by [a-z]+", t) for t in texts)
    vocabulary = set(VOCABULARY)
    for text in texts + list(ALT_TEMPLATES):
        words = set(re.findall(r"[a-z]+", text.lower()))
        assert not words & vocabulary, text
        assert parse(text) is None
