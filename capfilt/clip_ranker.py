"""CLIP and SigLIP as rankers: image–text similarity only (ITC), no ITM head.

The score is the cosine similarity of the L2-normalised image and text embeddings, as ``CLIPModel`` and
``SiglipModel`` compute them before their scale (CLIP: ``logit_scale``; SigLIP: ``logit_scale`` and
``logit_bias``, then a sigmoid for a match probability). ``TextScore.itc`` stores that cosine for both, so
that ``itc_score`` means one thing whatever the filter; SigLIP's probability is
``sigmoid(exp(logit_scale) * itc + logit_bias)``, a monotone function of it (same ranking). ``TextScore.itm``
is None: a job with such a filter judges by ``itc`` (its threshold is then a cosine, and ``--select top-N``
ranks by it). DataComp's "CLIP score" is this cosine for ViT-L/14 (x100 in some papers).

Images: CLIP's processor resizes the shorter side to S (bicubic), crops the centre S x S and normalises with
CLIP's mean and std (``CenterCropPreprocessor``). SigLIP's squashes to S x S (bicubic) and normalises with mean
and std 0.5: capfilt feeds it BLIP's own preprocessing (``ImagePreprocessor``, the same resize, CLIP's mean and
std) and converts the normalisation inside the model (``SIGLIP_FROM_CLIP``), exactly (it is linear), so that
a SigLIP filter shares one decoded input with a BLIP captioner of the same size.

Texts: CLIP's tokenizer, cut at its 77 positions; SigLIP's padded to its full length (64) with no attention
mask, as it was trained (transformers' SigLIP documentation: ``padding="max_length"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, SiglipModel

from capfilt.blip2 import hf_source, load_tokenizer, place
from capfilt.checkpoints import FILTER, CheckpointError, ModelSource, load_hf_folder, resolve
from capfilt.device import autocast, pick_device
from capfilt.scores import TextScore
from capfilt.images import CLIP_MEAN, CLIP_STD, ImagePreprocessor, to_rgb
from capfilt.model_kind import CLIP, SIGLIP, model_kind
from capfilt.per_image import ScoresPerImage, flat_texts, regroup

SIGLIP_MEAN = SIGLIP_STD = 0.5  # SiglipImageProcessor's image_mean / image_std


class CenterCropPreprocessor(ImagePreprocessor):
    """CLIP's preprocessing: shorter side to S (bicubic), centre S x S crop, [0, 1], CLIP mean and std."""

    def one(self, image: Image.Image) -> torch.Tensor:
        rgb = to_rgb(image)
        width, height = rgb.size
        # The longer side as CLIPImageProcessor sizes it (transformers' get_resize_output_image_size): truncated,
        # not rounded; a pixel more or less shifts the resize and the crop.
        longer = int(self.image_size * max(width, height) / min(width, height))
        size = (self.image_size, longer) if width <= height else (longer, self.image_size)
        rgb = rgb.resize(size, Image.BICUBIC)
        left, top = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        rgb = rgb.crop((left, top, left + self.image_size, top + self.image_size))
        pixels = (np.asarray(rgb, dtype=np.float32) * np.float32(1 / 255) - CLIP_MEAN) / CLIP_STD
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def siglip_from_clip(pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixels normalised with CLIP's mean and std -> with SigLIP's 0.5 and 0.5."""
    mean = torch.as_tensor(CLIP_MEAN, device=pixel_values.device).view(1, 3, 1, 1)
    std = torch.as_tensor(CLIP_STD, device=pixel_values.device).view(1, 3, 1, 1)
    return (pixel_values * std + mean - SIGLIP_MEAN) / SIGLIP_STD


@dataclass
class ClipRanker(ScoresPerImage):
    """A CLIP or SigLIP model scoring image–text pairs by cosine similarity (the interface of ``Filter``)."""

    judged_by: ClassVar[str] = "itc"  # no ITM head: a threshold applies to the similarity

    model: CLIPModel | SiglipModel
    tokenizer: object
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    source: ModelSource | None = None
    text_batch_size: int = 256  # texts per text-encoder call
    precision: str = "auto"
    ref: str | None = None

    def __post_init__(self):
        self.family = SIGLIP if isinstance(self.model, SiglipModel) else CLIP
        self.weights = torch.float32  # ViT-L/14 and SigLIP so400m fit any GPU in fp32
        place(self.model, self.device, self.weights)
        size = self.model.config.vision_config.image_size
        self.preprocess = ImagePreprocessor(size) if self.family == SIGLIP else CenterCropPreprocessor(size)
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    @classmethod
    def load(cls, ref: str | Path, *, device: str | torch.device | None = None, tokenizer: str | Path | None = None,
             config=None, precision: str = "auto") -> ClipRanker:
        family = model_kind(resolve(ref, FILTER)).family
        if family not in (CLIP, SIGLIP):
            raise CheckpointError(f"{ref!r} is a {family} model, not CLIP or SigLIP")
        source = hf_source(ref, FILTER, family, config)
        model = load_hf_folder(SiglipModel if family == SIGLIP else CLIPModel, source.path)
        return cls(model=model, tokenizer=load_tokenizer(Path(tokenizer or source.path), source, "--filter-tokenizer"),
                   device=pick_device(device), source=source, precision=precision, ref=str(ref))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.family == SIGLIP:
            tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_tokens,
                                    return_tensors="pt")
            return {"input_ids": tokens.input_ids.to(self.device)}
        tokens = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_tokens,
                                return_tensors="pt")
        return {"input_ids": tokens.input_ids.to(self.device), "attention_mask": tokens.attention_mask.to(self.device)}

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]`` (fp32) of pixels from ``self.preprocess``."""
        if self.family == SIGLIP:
            pixel_values = siglip_from_clip(pixel_values)
        features = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return F.normalize(features.float(), dim=-1)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.model.get_text_features(**tokens).pooler_output.float(), dim=-1)

    @torch.no_grad()
    def score_pixels(self, pixel_values: torch.Tensor, texts: Sequence[Sequence[str]]) -> list[list[TextScore]]:
        """``score`` of images already preprocessed to ``[B, 3, S, S]`` (``self.preprocess``)."""
        flat = flat_texts(len(pixel_values), texts)
        if not flat:
            return [[] for _ in texts]
        image_index = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=self.device)
        itc = []
        with autocast(self.device, self.precision):
            image_feat = self.image_features(pixel_values.to(self.device))  # once per image
            for start in range(0, len(flat), self.text_batch_size):
                stop = start + self.text_batch_size
                text_feat = self.text_features(self.tokenize(flat[start:stop]))
                itc += (text_feat * image_feat[image_index[start:stop]]).sum(dim=-1).tolist()
        return regroup(texts, None, itc)
