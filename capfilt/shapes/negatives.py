"""Hard negative texts for ITM: a caption with its words bound wrongly, its relation wrong, or one word replaced.

A departure from BLIP for the demo filter (docs/demo.md, "How they are
trained"). ITM's hard negative text for an image is drawn from the batch by
ITC similarity (paper §3.2). In a batch of 64 scenes out of 100,000, a
caption naming the same two objects with the other relation almost never
occurs, so nothing tells the filter which object is where. NegCLIP
(Yuksekgonul et al., ICLR 2023) adds negatives made by swapping parts of the
true caption; in this world's grammar, the swaps are:

- ``objects``: the two phrases swapped (``A left of B`` -> ``B left of A``),
  which says the relation the wrong way round;
- ``size`` / ``colour`` / ``shape``: that attribute swapped between the two
  objects, where they differ (``a red circle … a blue square`` -> ``a blue
  circle … a red square``).

NegCLIP also replaces words; here the one word that carries geometry:

- ``relation``: the relation replaced by another one that is wrong for the
  scene (``A left of B`` -> ``A right of B``, ``A above B`` or ``A below B``).

The swaps hold the true caption's words, so they test binding alone
(``capfilt.recipes.evaluate``, ``evaluate_swaps``). As training negatives
they did not help the demo filter: ITM learned a relation's direction from
the objects swap only after a long stretch at chance, and a filter trained
on swaps grew stricter on clean texts. A third of the draws swap the
objects, a third change the relation, a third swap an attribute. Every
negative is checked wrong for its scene with the caption
parser. One-object scenes have none (nothing to swap, no relation); two
alike objects get only a relation on the other axis (their converse is
correct).

``replaced_caption`` is NegCLIP's other kind: one word of the true caption
replaced (a size, colour or shape of one object, or the relation by one on
the other axis), for half the rows of any scene. These are the same kind of
edit as the world's ``partial`` web texts, except a relation's converse; the
shipped demo filter trained on them (docs/demo.md, "How they are trained").
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from capfilt.shapes.captions import ATTRIBUTE_VALUES, Parse, describe, is_correct, replaced
from capfilt.shapes.scene import Scene
from capfilt.shapes.world import RELATIONS

ATTRIBUTE_SWAPS = ("size", "colour", "shape")
OBJECT_SWAP_PROBABILITY = 1 / 3
RELATION_CHANGE_PROBABILITY = 1 / 3  # the rest swap one attribute that differs between the objects


def swapped(parse: Parse, what: str) -> Parse:
    """``parse`` with its two phrases (``what="objects"``) or one attribute of theirs exchanged."""
    first, second = parse.phrases
    if what == "objects":
        return replace(parse, phrases=(second, first))
    if what not in ATTRIBUTE_SWAPS:
        raise ValueError(f"cannot swap {what!r}; choose 'objects' or one of {ATTRIBUTE_SWAPS}")
    return replace(parse, phrases=(replace(first, **{what: getattr(second, what)}),
                                   replace(second, **{what: getattr(first, what)})))


def possible_swaps(parse: Parse) -> list[str]:
    """The swaps that make ``parse`` wrong: ``objects`` then each attribute where the two objects differ.

    None for one object, and none for two objects that are the same in every
    attribute (then every swap gives back a correct caption).
    """
    if parse.relation is None:
        return []
    first, second = parse.phrases
    differing = [a for a in ATTRIBUTE_SWAPS if getattr(first, a) != getattr(second, a)]
    return ["objects", *differing] if differing else []


def wrong_relations(parse: Parse, scene: Scene) -> list[str]:
    """The relations that make ``parse`` (a correct two-object caption of ``scene``) wrong when put in its place."""
    return [relation for relation in RELATIONS if relation != parse.relation
            and not is_correct(str(replace(parse, relation=relation)), scene)]


def negative_caption(scene: Scene, rng: np.random.Generator) -> str | None:
    """A compositional negative of ``scene``'s caption, wrong for the scene; ``None`` when there is none."""
    truth = describe(scene)
    if truth.relation is None:
        return None
    swaps, relations = possible_swaps(truth), wrong_relations(truth, scene)
    draw = rng.random()
    if draw < RELATION_CHANGE_PROBABILITY or not swaps:
        negative, what = replace(truth, relation=relations[int(rng.integers(len(relations)))]), "relation"
    elif draw < RELATION_CHANGE_PROBABILITY + OBJECT_SWAP_PROBABILITY:
        negative, what = swapped(truth, "objects"), "objects"
    else:
        what = swaps[1:][int(rng.integers(len(swaps) - 1))]
        negative = swapped(truth, what)
    text = str(negative)
    if is_correct(text, scene):  # cannot happen: the swaps need objects that differ; the parser is the judge
        raise AssertionError(f"the {what} negative of {truth} is correct for its scene")
    return text


# --- replaced words (NegCLIP's "replace") ------------------------------------------------------
REPLACED_FRACTION = 0.5  # rows that get a replaced-word negative; the rest keep ITM's drawn one (BLIP)
REPLACEABLE = (*ATTRIBUTE_SWAPS, "relation")
AXES = ({"left of", "right of"}, {"above", "below"})
MAX_DRAWS = 20


def replaced_caption(scene: Scene, rng: np.random.Generator, fraction: float = REPLACED_FRACTION) -> str | None:
    """The scene's caption with one word replaced so that it is wrong; ``None`` for the other rows.

    A ``fraction`` of the rows get one. The word's kind (size, colour, shape,
    or for two objects the relation) is drawn uniformly, then the object and
    a new value. A relation is replaced by one on the other axis only
    (``left of`` -> ``above`` or ``below``): the converse on the same axis
    says the scene the wrong way round, which is the objects swap that ITM
    sits at chance on (module docstring); where both objects' positions fit
    the other axis too, the draw is redrawn. Unlike the swaps these reach
    one-object scenes, and a new word need not occur in the scene.
    """
    if rng.random() >= fraction:
        return None
    truth = describe(scene)
    kinds = REPLACEABLE if truth.relation is not None else ATTRIBUTE_SWAPS
    for _ in range(MAX_DRAWS):
        what = kinds[int(rng.integers(len(kinds)))]
        phrase = int(rng.integers(len(truth.phrases)))
        if what == "relation":
            same_axis = next(axis for axis in AXES if truth.relation in axis)
            choices = [r for r in RELATIONS if r not in same_axis]
        else:
            choices = [v for v in ATTRIBUTE_VALUES[what] if v != getattr(truth.phrases[phrase], what)]
        text = str(replaced(truth, what, choices[int(rng.integers(len(choices)))], phrase))
        if not is_correct(text, scene):
            return text
    raise RuntimeError(f"no wrong caption in {MAX_DRAWS} draws for {truth}")
