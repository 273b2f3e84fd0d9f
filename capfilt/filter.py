"""The filter: BLIP's image-grounded text encoder judging image–text pairs (paper §3.3).

For every candidate text of an image it gives two scores:

- ``itm``: the ITM head's match probability (softmax over its 2 classes,
  class 1 = match). The input starts with ``[ENC]``, as in BLIP's retrieval
  and pre-training code; transformers' ``BlipForImageTextRetrieval`` leaves
  ``[CLS]`` there instead, which is not what the filters were trained with.
  A text whose ``itm`` is below the threshold (0.5 in the paper) is noise.
- ``itc``: the cosine similarity of the ``[CLS]`` unimodal text feature and
  the image feature, both projected to 256-d and L2-normalised (paper §3.2).

``Filter`` is also the one filter interface (``family``, ``judged_by``, ``source``, ``ref``, ``device``,
``precision``, ``preprocess``, ``score(images, texts)``, ``score_pixels(pixels, texts)``): ``Filter.load`` reads the
model's config.json (``capfilt.model_kind``) and returns BLIP's filter or another family's, each in its own module
and registered as a ``Filter`` (an ABC's virtual subclass): BLIP-2's Q-Former (``capfilt.blip2.Blip2Filter``, ITM
and ITC) and CLIP / SigLIP (``capfilt.clip_ranker.ClipRanker``, ITC only: ``TextScore.itm`` is None and
``judged_by`` is ``itc``). BLIP's ``[ENC]`` and ``pre_caption`` rules are on this class only.

The image is encoded once for all its texts. Texts are normalised as BLIP's
data loaders do (``pre_caption``) and cut at 35 tokens, as in BLIP's
retrieval code.
"""

from __future__ import annotations

from collections.abc import Sequence
from abc import ABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import BlipConfig, BlipForImageTextRetrieval

from capfilt.blip2 import Blip2Filter
from capfilt.checkpoints import FILTER, ModelSource, load_model
from capfilt.clip_ranker import ClipRanker
from capfilt.device import autocast, compute_in_fp32, pick_device
from capfilt.images import ImagePreprocessor
from capfilt.model_kind import BLIP, BLIP2, CLIP, SIGLIP, family_for
from capfilt.per_image import ScoresPerImage, flat_texts, regroup
from capfilt.scores import TextScore
from capfilt.tokenizer import pre_caption, special_ids

MAX_TEXT_TOKENS = 35  # BLIP's retrieval code: max_length=35
MAX_WORDS = 30  # BLIP's pre_caption in pre-training: at most 30 words


@dataclass
class Filter(ScoresPerImage, ABC):
    """A BLIP filter: for each image, any number of texts in, a ``TextScore`` per text out; and the interface of
    every family's filter."""

    family: ClassVar[str] = "blip"  # capfilt.model_kind's family name
    judged_by: ClassVar[str] = "itm"  # the score a threshold applies to by default

    model: BlipForImageTextRetrieval
    tokenizer: object
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    source: ModelSource | None = None
    text_batch_size: int = 256  # texts per text-encoder call
    precision: str = "auto"  # autocast: bf16 on CUDA and on CPUs with native bf16, else fp32 (capfilt.device)
    ref: str | None = None  # the reference it was loaded from (provenance)

    def __post_init__(self):
        self.model.to(self.device, dtype=torch.float32).eval()  # fp32 weights; products under autocast_dtype
        self.weights = torch.float32
        for head in (self.model.itm_head, self.model.text_proj, self.model.vision_proj):  # scores in fp32
            compute_in_fp32(head)
        self.preprocess = ImagePreprocessor(self.model.config.vision_config.image_size)
        self.ids = special_ids(self.tokenizer)

    @classmethod
    def load(
        cls,
        ref: str | Path,
        *,
        device: str | torch.device | None = None,
        tokenizer: str | Path | None = None,
        config: str | Path | BlipConfig | None = None,
        precision: str = "auto",
    ) -> Filter:
        """Load from an HF folder, a cached hub id, an original ``.pth`` or ``demo`` (see ``checkpoints``).

        Any family: the model's config.json decides (``FAMILIES``); a model that cannot filter is a one-line error
        naming what the filter accepts. ``config`` is for BLIP's ``.pth`` files only.
        """
        family = family_for(ref, FILTER, tokenizer)
        if family != BLIP:
            return FAMILIES[family].load(ref, device=device, tokenizer=tokenizer, config=config, precision=precision)
        model, tokenizer, source = load_model(BlipForImageTextRetrieval, ref, FILTER, config, tokenizer)
        return cls(model=model, tokenizer=tokenizer, device=pick_device(device), source=source, precision=precision,
                   ref=str(ref))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``[CLS] text [SEP]`` ids and mask, after BLIP's caption normalisation."""
        cleaned = [pre_caption(text, MAX_WORDS) for text in texts]
        tokens = self.tokenizer(cleaned, padding="longest", truncation=True, max_length=MAX_TEXT_TOKENS,
                                return_tensors="pt")
        return {"input_ids": tokens.input_ids.to(self.device), "attention_mask": tokens.attention_mask.to(self.device)}

    def itm_logits(self, image_embeds: torch.Tensor, image_index: torch.Tensor,
                   input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM head logits ``[texts, 2]`` (class 1 = match), with gradients: ``match_probability``'s forward."""
        # ITM (paper §3.2, eq. ITM): [ENC] text, cross-attending to the image; head on position 0.
        enc_ids = input_ids.clone()
        enc_ids[:, 0] = self.ids.enc
        images = image_embeds[image_index]
        image_mask = torch.ones(images.shape[:-1], dtype=torch.long, device=images.device)
        grounded = self.model.text_encoder(input_ids=enc_ids, attention_mask=attention_mask,
                                           encoder_hidden_states=images,
                                           encoder_attention_mask=image_mask).last_hidden_state[:, 0]
        return self.model.itm_head(grounded)

    @torch.no_grad()
    def match_probability(self, image_embeds: torch.Tensor, image_index: torch.Tensor,
                          input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM match probabilities of texts against already-encoded images (``image_index``: see ``score_embedded``)."""
        return F.softmax(self.itm_logits(image_embeds, image_index, input_ids, attention_mask).float(), dim=-1)[:, 1]

    @torch.no_grad()
    def score_embedded(self, image_embeds: torch.Tensor, image_index: torch.Tensor,
                       input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM probabilities and ITC similarities of texts against already-encoded images.

        ``image_index[j]`` names the image (row of ``image_embeds``) of text ``j``.
        """
        itm = self.match_probability(image_embeds, image_index, input_ids, attention_mask)
        # ITC (paper §3.2): unimodal [CLS] text feature vs the image's [CLS] feature, cosine similarity.
        text = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        text_feat = F.normalize(self.model.text_proj(text).float(), dim=-1)
        image_feat = F.normalize(self.model.vision_proj(image_embeds[:, 0]).float(), dim=-1)
        itc = (text_feat * image_feat[image_index]).sum(dim=-1)
        return itm, itc

    @torch.no_grad()
    def score_pixels(self, pixel_values: torch.Tensor, texts: Sequence[Sequence[str]]) -> list[list[TextScore]]:
        """``score`` of images already preprocessed to ``[B, 3, S, S]`` (``self.preprocess``)."""
        flat = flat_texts(len(pixel_values), texts)
        if not flat:
            return [[] for _ in texts]
        image_index = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=self.device)
        itm, itc = [], []
        with autocast(self.device, self.precision):
            pixel_values = pixel_values.to(self.device)
            image_embeds = self.model.vision_model(pixel_values=pixel_values).last_hidden_state  # once per image
            for start in range(0, len(flat), self.text_batch_size):
                stop = start + self.text_batch_size
                tokens = self.tokenize(flat[start:stop])
                batch_itm, batch_itc = self.score_embedded(image_embeds, image_index[start:stop], **tokens)
                itm += batch_itm.tolist()
                itc += batch_itc.tolist()
        return regroup(texts, itm, itc)


# The other families' filters, by capfilt.model_kind's family name; they implement this interface
FAMILIES = {BLIP2: Blip2Filter, CLIP: ClipRanker, SIGLIP: ClipRanker}
Filter.register(Blip2Filter)
Filter.register(ClipRanker)
