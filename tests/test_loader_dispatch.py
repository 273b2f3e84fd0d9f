"""``Captioner.load`` and ``Filter.load``, the one interface per role, load every family from its config.json and
return that family's object, which is a ``Captioner`` / ``Filter``; a model in the wrong role is a one-line error."""

from __future__ import annotations

import pytest
from transformers import Blip2ForConditionalGeneration, CLIPModel, InstructBlipForConditionalGeneration, SiglipModel

from capfilt.blip2 import Blip2Captioner, Blip2Filter
from capfilt.captioner import Captioner
from capfilt.checkpoints import CheckpointError
from capfilt.clip_ranker import ClipRanker
from capfilt.filter import Filter
from capfilt.instructblip import InstructBlipCaptioner
from test_family_blip2 import bert, blip2_folder, instructblip_folder, itm_folder  # noqa: F401 - fixtures
from test_family_clip import ranker_folder  # noqa: F401 - fixture: a CLIP and a SigLIP folder


def test_captioner_load_gives_each_familys_captioner(blip2_folder, instructblip_folder, captioner_folder):
    blip2 = Captioner.load(blip2_folder, precision="fp32")
    assert type(blip2) is Blip2Captioner and isinstance(blip2, Captioner)
    assert isinstance(blip2.model, Blip2ForConditionalGeneration) and blip2.family == "blip-2"
    instruct = Captioner.load(instructblip_folder, precision="fp32")
    assert type(instruct) is InstructBlipCaptioner and isinstance(instruct, Captioner)
    assert isinstance(instruct.model, InstructBlipForConditionalGeneration)
    blip = Captioner.load(captioner_folder)
    assert type(blip) is Captioner and blip.family == "blip"


def test_filter_load_gives_each_familys_filter(itm_folder, ranker_folder, filter_folder):
    blip2 = Filter.load(itm_folder, precision="fp32")
    assert type(blip2) is Blip2Filter and isinstance(blip2, Filter) and blip2.judged_by == "itm"
    ranker = Filter.load(ranker_folder, precision="fp32")
    assert type(ranker) is ClipRanker and isinstance(ranker, Filter) and ranker.judged_by == "itc"
    assert isinstance(ranker.model, SiglipModel if ranker.family == "siglip" else CLIPModel)
    blip = Filter.load(filter_folder)
    assert type(blip) is Filter and blip.judged_by == "itm"


def test_the_wrong_role_is_a_one_line_error(blip2_folder, instructblip_folder, itm_folder, ranker_folder):
    for folder in (ranker_folder, itm_folder):
        with pytest.raises(CheckpointError, match="the captioner accepts") as error:
            Captioner.load(folder)
        assert "\n" not in str(error.value)
    for folder in (blip2_folder, instructblip_folder):
        with pytest.raises(CheckpointError, match="the filter accepts") as error:
            Filter.load(folder)
        assert "\n" not in str(error.value)


def test_blips_own_handling_stays_on_the_blip_path(blip2_folder, itm_folder):
    """``[DEC]`` and the prompt cut (the captioner), ``[ENC]`` (the filter) are BLIP's: the other families'
    objects inherit none of it."""
    captioner, filter_ = Captioner.load(blip2_folder, precision="fp32"), Filter.load(itm_folder, precision="fp32")
    assert not hasattr(captioner, "prompt_ids") and not hasattr(filter_, "itm_logits")
    assert Captioner.decode is not type(captioner).decode and Filter.tokenize is not type(filter_).tokenize
