"""Per-image results around a model's flat calls: the part of the captioner and filter interfaces that every family
shares (BLIP's ``Captioner`` and ``Filter``, ``capfilt.blip2``, ``capfilt.instructblip``, ``capfilt.clip_ranker``).

A family implements its own model calls on preprocessed pixels (``generate_ids`` and ``decode``; ``score_pixels``)
and a ``preprocess``; these mixins give it the rest of the interface. Without torch, so that every family's module
can import it (the families cannot import ``capfilt.captioner`` or ``capfilt.filter``, which dispatch to them).
"""

from __future__ import annotations

from collections.abc import Sequence

from capfilt.scores import TextScore


class CaptionsPerImage:
    """``caption`` and ``caption_pixels``: K captions per image from the family's ``generate_ids`` and ``decode``."""

    def caption(self, images, num_captions: int = 1, seed: int | None = None, *,
                seeds: Sequence[int] | None = None) -> list[list[str]]:
        """K captions for each image (nucleus sampling with p = 0.9 by default); seeded runs repeat exactly.

        ``seed`` seeds the call, ``seeds`` each image (its captions then do not depend on the other images).
        """
        if not images:
            return []
        return self.caption_pixels(self.preprocess(images), num_captions, seed, seeds=seeds)

    def caption_pixels(self, pixel_values, num_captions: int = 1, seed: int | None = None, *,
                       seeds: Sequence[int] | None = None) -> list[list[str]]:
        """``caption`` of images already preprocessed to ``[B, 3, S, S]`` (``self.preprocess``)."""
        captions = self.decode(self.generate_ids(pixel_values, num_captions, seed, seeds=seeds))
        return [captions[i * num_captions : (i + 1) * num_captions] for i in range(len(pixel_values))]


class ScoresPerImage:
    """``score``: a ``TextScore`` per text of each image, from the family's ``score_pixels``."""

    def score(self, images, texts: Sequence[Sequence[str]]) -> list[list[TextScore]]:
        """Scores of ``texts[i]`` (any number of texts) against ``images[i]``."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} lists of texts")
        if not any(texts):
            return [[] for _ in images]
        return self.score_pixels(self.preprocess(images), texts)


def flat_texts(images: int, texts: Sequence[Sequence[str]]) -> list[str]:
    """``score_pixels``' texts in one list, image after image; an error unless there is a list per image."""
    if images != len(texts):
        raise ValueError(f"{images} images but {len(texts)} lists of texts")
    return [text for group in texts for text in group]


def regroup(texts: Sequence[Sequence[str]], itm: list | None, itc: list) -> list[list[TextScore]]:
    """Flat scores back into one list per image; ``itm`` None for a filter without an ITM head."""
    scores, position = [], 0
    for group in texts:
        scores.append([TextScore(None if itm is None else itm[j], itc[j])
                       for j in range(position, position + len(group))])
        position += len(group)
    return scores
