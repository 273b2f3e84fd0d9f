"""Any family's captioner or filter, chosen by the model's config.json (``capfilt.model_kind``).

One interface per role, ``capfilt.captioner.Captioner`` and ``capfilt.filter.Filter``, whose ``load`` returns
the family's object (``load_captioner`` and ``load_filter`` here are the same). A captioner has ``family``,
``ref``, ``source``, ``device``, ``precision``, ``settings``, ``preprocess``,
``caption``/``caption_pixels(pixels, K, seed, seeds=)``; a filter ``family``,
``judged_by`` (``itm``, or ``itc`` for a filter without an ITM head), ``ref``, ``source``, ``device``,
``precision``, ``preprocess``, ``score``/``score_pixels(pixels, texts)`` giving a ``TextScore`` per text.

======================  ==========================================  =====================================
family                  captioner                                   filter
======================  ==========================================  =====================================
BLIP                    ``capfilt.captioner.Captioner``             ``capfilt.filter.Filter``
BLIP-2                  ``capfilt.blip2.Blip2Captioner``            ``capfilt.blip2.Blip2Filter``
InstructBLIP            ``capfilt.instructblip.InstructBlipCaptioner``  -
CLIP, SigLIP            -                                           ``capfilt.clip_ranker.ClipRanker``
======================  ==========================================  =====================================
"""

from __future__ import annotations

from pathlib import Path

from capfilt import captioner, filter as filters
from capfilt.blip2 import LmSamplingSettings
from capfilt.captioner import Captioner, SamplingSettings
from capfilt.checkpoints import CAPTIONER, resolve
from capfilt.filter import Filter
from capfilt.model_kind import BLIP, family_for

CAPTIONERS = {BLIP: Captioner, **captioner.FAMILIES}  # family -> its captioner class
FILTERS = {BLIP: Filter, **filters.FAMILIES}  # family -> its filter class


def family(ref: str | Path, role: str, tokenizer: str | Path | None = None) -> str:
    """The family of the model at ``ref``, checked to take ``role`` (``capfilt.model_kind.family_for``)."""
    return family_for(ref, role, tokenizer)


def sampling_settings(ref: str | Path, tokenizer: str | Path | None = None, **overrides):
    """The captioner's sampling settings: its family's defaults, its folder's ``capfilt_sampling.json``,
    ``overrides`` (a run's); ``SamplingSettings`` for BLIP, ``LmSamplingSettings`` for the others."""
    source = resolve(ref, CAPTIONER)
    kind = family(ref, CAPTIONER, tokenizer)
    if kind == BLIP:
        return SamplingSettings.for_model(source, **overrides)
    return LmSamplingSettings.for_model(source, CAPTIONERS[kind].defaults, **overrides)


def load_captioner(ref: str | Path, **kwargs) -> Captioner:
    """``Captioner.load``: any family (the same keyword arguments)."""
    return Captioner.load(ref, **kwargs)


def load_filter(ref: str | Path, **kwargs) -> Filter:
    """``Filter.load``: any family (the same keyword arguments)."""
    return Filter.load(ref, **kwargs)
