"""Compositional hard negatives: a two-object caption with its words bound to the wrong objects.

A departure from BLIP for the demo filter (docs/demo.md, "Compositional
negatives"). ITM's hard negative text for an image is drawn from the batch by
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

Half of the draws swap the objects, half swap an attribute. Every negative is
checked wrong for its scene with the caption parser. One-object scenes have
none (their attributes have nothing to be swapped with).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from capfilt.shapes.captions import Parse, describe, is_correct
from capfilt.shapes.scene import Scene

ATTRIBUTE_SWAPS = ("size", "colour", "shape")
OBJECT_SWAP_PROBABILITY = 0.5  # the rest swap one attribute that differs between the objects


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


def negative_caption(scene: Scene, rng: np.random.Generator) -> str | None:
    """A compositional negative of ``scene``'s caption, wrong for the scene; ``None`` when there is none."""
    truth = describe(scene)
    swaps = possible_swaps(truth)
    if not swaps:
        return None
    differing = swaps[1:]
    what = "objects" if rng.random() < OBJECT_SWAP_PROBABILITY else differing[int(rng.integers(len(differing)))]
    text = str(swapped(truth, what))
    if is_correct(text, scene):  # cannot happen while the objects differ; the parser is the judge
        raise AssertionError(f"the {what} swap of {truth} is correct for its scene")
    return text
