"""Captions of the shapes world: the grammar, its parser and correctness (docs/shapes.md).

    caption  := phrase | phrase relation phrase
    phrase   := "a" size colour shape
    relation := "left of" | "right of" | "above" | "below"

Lower case, single spaces, no punctuation, nothing before or after. A
caption is correct for a scene when it parses, names the scene's objects
with their attributes and names the relation that holds; for two objects
the converse sentence (B first, converse relation) is correct too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from capfilt.shapes.scene import Scene, ShapeObject
from capfilt.shapes.world import COLOURS, CONVERSE, RELATIONS, SHAPES, SIZES

ARTICLE = "a"
# Every word a correct caption can contain, in a fixed order (for capfilt.vocab).
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys([ARTICLE, *SIZES, *COLOURS, *SHAPES, *(w for r in RELATIONS for w in r.split())])
)


@dataclass(frozen=True)
class Phrase:
    """``a {size} {colour} {shape}``."""

    size: str
    colour: str
    shape: str

    def __str__(self) -> str:
        return f"{ARTICLE} {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Parse:
    """A parsed caption: one or two phrases and, for two, the relation of the first to the second."""

    phrases: tuple[Phrase, ...]
    relation: str | None = None

    def __str__(self) -> str:
        if self.relation is None:
            return str(self.phrases[0])
        return f"{self.phrases[0]} {self.relation} {self.phrases[1]}"


ATTRIBUTE_VALUES = {"size": SIZES, "colour": COLOURS, "shape": SHAPES}  # a phrase's attributes and their words


def replaced(parse: Parse, what: str, value: str, phrase: int = 0) -> Parse:
    """``parse`` with one word replaced: attribute ``what`` of phrase ``phrase``, or the relation, by ``value``."""
    if what == "relation":
        return replace(parse, relation=value)
    if what not in ATTRIBUTE_VALUES:
        raise ValueError(f"cannot replace {what!r}; choose 'relation' or one of {tuple(ATTRIBUTE_VALUES)}")
    phrases = list(parse.phrases)
    phrases[phrase] = replace(phrases[phrase], **{what: value})
    return replace(parse, phrases=tuple(phrases))


def phrase_of(obj: ShapeObject) -> Phrase:
    """The phrase naming an object."""
    return Phrase(obj.size, obj.colour, obj.shape)


def describe(scene: Scene) -> Parse:
    """The canonical parse of a scene: object A first."""
    return Parse(tuple(phrase_of(o) for o in scene.objects), scene.relation)


def caption(scene: Scene) -> str:
    """The canonical caption of a scene (object A first)."""
    return str(describe(scene))


def correct_captions(scene: Scene) -> tuple[str, ...]:
    """Every correct caption of a scene: the canonical one and, for two objects, its converse."""
    canonical = describe(scene)
    if canonical.relation is None:
        return (str(canonical),)
    a, b = canonical.phrases
    converse = str(Parse((b, a), CONVERSE[canonical.relation]))
    return tuple(dict.fromkeys([str(canonical), converse]))


def _phrase(words: list[str], i: int) -> Phrase | None:
    if len(words) < i + 4 or words[i] != ARTICLE:
        return None
    size, colour, shape = words[i + 1 : i + 4]
    if size in SIZES and colour in COLOURS and shape in SHAPES:
        return Phrase(size, colour, shape)
    return None


def parse(text: str) -> Parse | None:
    """The caption's parse under the grammar, or None when it does not parse exactly."""
    words = text.split(" ")  # an empty word is a doubled, leading or trailing space
    first = _phrase(words, 0)
    if first is None:
        return None
    if len(words) == 4:
        return Parse((first,))
    for relation in RELATIONS:
        n = len(relation.split(" "))
        if " ".join(words[4 : 4 + n]) == relation:
            second = _phrase(words, 4 + n)
            if second is not None and len(words) == 8 + n:
                return Parse((first, second), relation)
            return None
    return None


def is_correct(text: str, scene: Scene) -> bool:
    """Whether ``text`` is a correct caption of ``scene`` (the canonical sentence or its converse)."""
    parsed = parse(text)
    if parsed is None:
        return False
    truth = describe(scene)
    if len(parsed.phrases) != len(truth.phrases):
        return False
    if truth.relation is None:
        return parsed == truth
    a, b = truth.phrases
    return parsed == truth or parsed == Parse((b, a), CONVERSE[truth.relation])


# What ``caption_errors`` names: an attribute of either phrase, the relation, or the caption as a whole.
ERRORS = ("size", "colour", "shape", "relation", "object count", "unparsed")


def caption_errors(text: str, scene: Scene) -> tuple[str, ...]:
    """What ``text`` gets wrong about ``scene``: ``()`` when it is correct.

    ``("unparsed",)`` when it does not parse; ``("object count",)`` when it
    names one object for two or two for one; otherwise each attribute that
    differs (a phrase's ``size``, ``colour`` or ``shape``, once per phrase,
    and the ``relation``), read against whichever correct sentence (the
    canonical one or its converse) it differs from least. The evaluation's
    error tables count these, e.g. a partial web text has exactly one.
    """
    parsed = parse(text)
    if parsed is None:
        return ("unparsed",)
    truth = describe(scene)
    if len(parsed.phrases) != len(truth.phrases):
        return ("object count",)
    readings = [truth]
    if truth.relation is not None:
        readings.append(Parse(truth.phrases[::-1], CONVERSE[truth.relation]))

    def differences(reading: Parse) -> tuple[str, ...]:
        wrong = [name for said, meant in zip(parsed.phrases, reading.phrases)
                 for name in ("size", "colour", "shape") if getattr(said, name) != getattr(meant, name)]
        return (*wrong, "relation") if parsed.relation != reading.relation else tuple(wrong)

    return min((differences(reading) for reading in readings), key=len)
