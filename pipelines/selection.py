"""Which of an image's judged texts are kept, and why the others are not: the one keep/reject engine.

An image has its candidate texts in a fixed order: its web text (when it has
one), then its K synthetic captions by index. Each text is removed by the
first of these rules that applies (its ``reason`` in rejected/):

1. ``below threshold`` (``passes``): its score is below the threshold. The
   paper's filter (BLIP §3.3, CapFilt): a text is noise when the ITM head
   judges it unmatched to its image, i.e. its match probability is below 0.5
   (``capfilt.scores.ITM_THRESHOLD``). The only rule that judges a text as
   noise. A run ``by`` ``itc`` (a filter without an ITM head: CLIP, SigLIP;
   or ``capfilt refilter --by itc``) judges by the ITC cosine instead. No
   threshold (None, with ``--select top-N`` only) passes every text;
2. ``duplicate text`` (``later_rules``): its normalised text (``normalise``:
   lower case, whitespace collapsed and stripped) equals that of an earlier
   candidate of the same image that passed rule 1. So of identical texts the
   first in candidate order is kept: the web text before the captions,
   caption 0 before caption 1. Not the paper's: the filter scores such texts
   alike (it normalises more, with BLIP's ``pre_caption``, ``data/utils.py``),
   so scores would not tell them apart anyway;
3. ``not in top n`` (``later_rules``, ``--select top-N``): the image has N
   better texts left after rules 1-2, ranked by the same score (web and synthetic
   together; equal scores in candidate order). BLIP-2 (§3.4, pre-training
   data) kept the top two of its captions and web text. ``--select all`` (the
   default, BLIP's) keeps every text left;
4. ``duplicate image`` (``duplicate_images``, ``--dedup-images``): the image
   has a kept text after rules 1-3, and its bytes (SHA-256, by its 64-bit
   hash, ``capfilt.pipelines.stats.ImageTally``) are those of an earlier
   image of the shard with a kept text: its kept texts are removed, so each
   image is kept at its first row with a kept text. Not the paper's. Such
   images are counted whether or not they are dropped. Across shards the
   rule is applied at a run's end (``capfilt.pipelines.image_dedup``).

``select`` applies the four rules to any number of consecutive images of a
shard at once, as an outcome code per text (``KEPT_CODE``, or ``CODES[reason]``):
the pipeline calls it per batch of images (``capfilt.pipelines.process``),
``capfilt refilter`` per shard (``capfilt.pipelines.refilter``), so both
decide with the same code. Rule 1 is vectorised; rules 2-3 run per image
only where two or more texts pass rule 1 (with one or none there is nothing
to be a duplicate of, and N >= 1 keeps it); rule 4 per image with a kept text.
Each image costs O(K log K): linear per shard.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from capfilt.pipelines.schema import BELOW_THRESHOLD, DUPLICATE_IMAGE, DUPLICATE_TEXT, NOT_IN_TOP_N, REASONS

SELECT_ALL = "all"  # the default: every text that passes the threshold (the paper's)
BY_ITM, BY_ITC = "itm", "itc"  # the score a run judges by: the ITM match probability, the ITC cosine similarity
SCORE_RANGES = {BY_ITM: (0.0, 1.0), BY_ITC: (-1.0, 1.0)}  # a probability; a cosine similarity
SCORE_NAMES = {BY_ITM: "ITM match probability", BY_ITC: "ITC cosine similarity"}
_TOP = re.compile(r"top-([0-9]+)")

# A text's outcome as a small integer (int8): KEPT_CODE, or the code of its reason (in schema.REASONS' order).
KEPT_CODE = 0
CODES = {reason: code for code, reason in enumerate(REASONS, start=1)}
REASON_OF_CODE = np.array([None, *REASONS], dtype=object)  # code -> reason (None: kept)


class Rules(Protocol):
    """What the selection reads of a run's settings: ``BootstrapSettings`` and a refilter's ``Plan`` have it."""

    @property
    def threshold(self) -> float | None: ...

    @property
    def top_n(self) -> int | None: ...

    @property
    def dedup_images(self) -> bool: ...


class KeptImages(Protocol):
    """A shard's images with a kept text so far (``capfilt.pipelines.stats.ImageTally``)."""

    def add(self, sha256_hex: str) -> bool:
        """Count an image with a kept text; True when the shard kept its bytes before."""
        ...


def parse_select(select: str) -> int | None:
    """``--select``'s value as the number of texts kept per image: ``all`` -> None, ``top-2`` -> 2."""
    if select == SELECT_ALL:
        return None
    match = _TOP.fullmatch(select)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"select must be 'all' or 'top-N' with N >= 1 (e.g. top-2), not {select!r}")
    return int(match.group(1))


def normalise(text: str) -> str:
    """The text duplicates are compared by: lower case, runs of whitespace as one space, no outer whitespace."""
    return " ".join(text.lower().split())


def passes(scores, threshold: float | None) -> np.ndarray:
    """Rule 1, per text: its score is at least ``threshold`` (compared as float64, as Python compares floats);
    every text when ``threshold`` is None. A missing score (None: a filter without that head) is an error, never a
    silent pass or removal."""
    if not isinstance(scores, np.ndarray) and any(score is None for score in scores):
        raise ValueError("a text has no score (None) to judge it by: the filter has no such head")
    scores = np.asarray(scores, dtype=np.float64)
    if threshold is None:
        return np.ones(scores.shape, dtype=bool)
    return scores >= threshold


def later_rules(texts: Sequence[str], scores: Sequence[float], passed: Sequence[bool],
                top_n: int | None) -> list[str | None]:
    """Rules 2-3 on one image's texts (candidate order) given rule 1's outcome ``passed``: per text, None when it
    is kept, else why it is removed."""
    why: list[str | None] = [None if ok else BELOW_THRESHOLD for ok in passed]
    seen: set[str] = set()
    for i, text in enumerate(texts):
        if why[i] is None:
            key = normalise(text)
            if key in seen:
                why[i] = DUPLICATE_TEXT
            else:
                seen.add(key)
    if top_n is not None:
        ranked = sorted((i for i, reason in enumerate(why) if reason is None), key=lambda i: (-scores[i], i))
        for i in ranked[top_n:]:
            why[i] = NOT_IN_TOP_N
    return why


def reasons(texts: Sequence[str], scores: Sequence[float], threshold: float | None,
            top_n: int | None) -> list[str | None]:
    """Rules 1-3 on one image's texts (in candidate order): per text, None when it is kept, else why it is removed."""
    if len(texts) != len(scores):
        raise ValueError(f"{len(texts)} texts but {len(scores)} scores")
    return later_rules(texts, scores, passes(scores, threshold).tolist(), top_n)


def duplicate_images(codes: np.ndarray, starts: np.ndarray, stops: np.ndarray, shas: Sequence[str],
                     kept_images: KeptImages, drop: bool) -> None:
    """Rule 4 on images in shard order (``codes[starts[i]:stops[i]]``: image i's texts after rules 1-3): each image
    with a kept text is counted in ``kept_images``; one whose bytes it held already loses its kept texts when
    ``drop`` (``--dedup-images``). Changes ``codes`` in place."""
    image_of = np.repeat(np.arange(starts.size), stops - starts)
    for image in np.flatnonzero(np.bincount(image_of[codes == KEPT_CODE], minlength=starts.size)).tolist():
        if kept_images.add(shas[image]) and drop:
            own = codes[starts[image]:stops[image]]
            own[own == KEPT_CODE] = CODES[DUPLICATE_IMAGE]


def select(rules: Rules, counts, scores, texts_of: Callable[[int, int], Sequence[str]], shas: Sequence[str],
           kept_images: KeptImages) -> np.ndarray:
    """Each text's outcome (int8: ``KEPT_CODE`` or ``CODES[reason]``) under rules 1-4, for consecutive images of a
    shard.

    ``counts``: each image's number of texts, images in shard order, their texts in candidate order;
    ``scores``: each text's score by which the run judges (float32 values, or Python floats); ``texts_of(start, stop)``: the texts of a
    range, read only for images that need rules 2-3; ``shas``: each image's SHA-256 (hex); ``kept_images``: the
    shard's images with a kept text so far (rule 4), updated.
    """
    counts = np.asarray(counts, dtype=np.int64)
    stops = np.cumsum(counts)
    starts = stops - counts
    if len(scores) != int(stops[-1] if stops.size else 0) or len(shas) != counts.size:
        raise ValueError(f"{counts.size} images with {int(counts.sum())} texts, but {len(scores)} scores and "
                         f"{len(shas)} SHA-256s")
    passed = passes(scores, rules.threshold)
    codes = np.where(passed, KEPT_CODE, CODES[BELOW_THRESHOLD]).astype(np.int8)
    image_of = np.repeat(np.arange(counts.size), counts)
    crowded = np.flatnonzero(np.bincount(image_of[passed], minlength=counts.size) >= 2)
    if crowded.size:
        score_list = np.asarray(scores).tolist()  # Python floats, ranked exactly as one image's list of scores
        passed_list = passed.tolist()
        for start, stop in zip(starts[crowded].tolist(), stops[crowded].tolist()):
            why = later_rules(texts_of(start, stop), score_list[start:stop], passed_list[start:stop], rules.top_n)
            codes[start:stop] = [KEPT_CODE if reason is None else CODES[reason] for reason in why]
    duplicate_images(codes, starts, stops, shas, kept_images, rules.dedup_images)
    return codes
