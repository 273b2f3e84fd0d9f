"""Any family's captioner or filter, chosen by the model's config.json (``capfilt.model_kind``).

One interface per role. A captioner has ``family``, ``ref``, ``source``, ``device``, ``precision``,
``settings``, ``preprocess``, ``caption``/``caption_pixels(pixels, K, seed, seeds=)``; a filter ``family``,
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

from capfilt.blip2 import Blip2Captioner, Blip2Filter, LmSamplingSettings
from capfilt.captioner import Captioner, SamplingSettings
from capfilt.checkpoints import CAPTIONER, FILTER, resolve
from capfilt.clip_ranker import ClipRanker
from capfilt.filter import Filter
from capfilt.instructblip import InstructBlipCaptioner
from capfilt.model_kind import BLIP, BLIP2, INSTRUCTBLIP, check_role, model_kind

CAPTIONERS = {BLIP: Captioner, BLIP2: Blip2Captioner, INSTRUCTBLIP: InstructBlipCaptioner}


def family(ref: str | Path, role: str, tokenizer: str | Path | None = None) -> str:
    """The family of the model at ``ref``, checked to take ``role`` (``check_role``'s one-line errors).

    A BLIP model is left to BLIP's loader, whose errors (a tokenizer beside a ``.pth``, ...) are as they were.
    """
    kind = model_kind(resolve(ref, role), ref, role)
    if kind.family != BLIP or role not in kind.roles():
        check_role(ref, role, tokenizer)
    return kind.family


def sampling_settings(ref: str | Path, tokenizer: str | Path | None = None, **overrides):
    """The captioner's sampling settings: its family's defaults, its folder's ``capfilt_sampling.json``,
    ``overrides`` (a run's); ``SamplingSettings`` for BLIP, ``LmSamplingSettings`` for the others."""
    source = resolve(ref, CAPTIONER)
    kind = family(ref, CAPTIONER, tokenizer)
    if kind == BLIP:
        return SamplingSettings.for_model(source, **overrides)
    return LmSamplingSettings.for_model(source, CAPTIONERS[kind].defaults, **overrides)


def load_captioner(ref: str | Path, **kwargs):
    """``Captioner.load`` for any family (the same keyword arguments)."""
    return CAPTIONERS[family(ref, CAPTIONER, kwargs.get("tokenizer"))].load(ref, **kwargs)


def load_filter(ref: str | Path, **kwargs):
    """``Filter.load`` for any family (the same keyword arguments)."""
    kind = family(ref, FILTER, kwargs.get("tokenizer"))
    loader = {BLIP: Filter, BLIP2: Blip2Filter}.get(kind, ClipRanker)
    return loader.load(ref, **kwargs)
