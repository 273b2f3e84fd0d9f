"""Which of an image's judged texts are kept, and why the others are not.

An image has its candidate texts in a fixed order: its web text (when it has
one), then its K synthetic captions by index. Each text is removed by the
first of these rules that applies (its ``reason`` in rejected/):

1. ``below threshold``: its ITM match probability is below the threshold
   (the paper's filter; the only rule that judges a text as noise);
2. ``duplicate text``: its normalised text (``normalise``: lower case,
   whitespace collapsed and stripped) equals that of an earlier candidate of
   the same image that passed rule 1. So of identical texts the first in
   candidate order is kept: the web text before the captions, caption 0
   before caption 1. The filter scores such texts alike (it normalises more,
   with BLIP's ``pre_caption``), so scores would not tell them apart anyway;
3. ``not in top n`` (``--select top-N``): the image has N better texts
   left after rules 1-2, ranked by ITM match probability (web and synthetic
   together; equal scores in candidate order). BLIP-2 kept the top two of its
   captions. ``--select all`` (the default, the paper's) keeps every text left.

Exact duplicate images (``--dedup-images``) are a fourth rule, applied per
shard in ``capfilt.pipelines.process`` and across shards in
``capfilt.pipelines.image_dedup``. Each image costs O(K log K): linear per shard.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from capfilt.pipelines.schema import BELOW_THRESHOLD, DUPLICATE_TEXT, NOT_IN_TOP_N

SELECT_ALL = "all"  # the default: every text that passes the threshold (the paper's)
_TOP = re.compile(r"top-([0-9]+)")


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


def reasons(texts: Sequence[str], itm: Sequence[float], threshold: float, top_n: int | None) -> list[str | None]:
    """Per candidate text (in candidate order), None when it is kept, else why it is removed (rules 1-3 above)."""
    if len(texts) != len(itm):
        raise ValueError(f"{len(texts)} texts but {len(itm)} scores")
    why: list[str | None] = [None if score >= threshold else BELOW_THRESHOLD for score in itm]
    seen: set[str] = set()
    for i, text in enumerate(texts):
        if why[i] is None:
            key = normalise(text)
            if key in seen:
                why[i] = DUPLICATE_TEXT
            else:
                seen.add(key)
    if top_n is not None:
        ranked = sorted((i for i, reason in enumerate(why) if reason is None), key=lambda i: (-itm[i], i))
        for i in ranked[top_n:]:
            why[i] = NOT_IN_TOP_N
    return why
