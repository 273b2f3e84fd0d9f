"""BLIP-2 (Li et al. 2023): a frozen ViT, a Q-Former, and a frozen language model (OPT or Flan-T5).

As a captioner (``Blip2ForConditionalGeneration``): the ViT encodes the image, the Q-Former's learned queries
read it, and their outputs, projected to the language model's width, stand in for the ``<image>`` tokens before
the prompt. Each image is encoded once for its K captions; the language model then writes, with the sampling
contract of BLIP's captioner (nucleus p = 0.9, ``RowSampler`` seeds per image). Lengths count new tokens only,
and captions are the new tokens decoded (the prompt is not part of them). Every row of a batch carries the same
prompt, so a decoder-only LM needs no padding (its tokenizer pads on the left, were it asked to).

As a filter (``Blip2ForImageTextRetrieval``, e.g. ``Salesforce/blip2-itm-vit-g``), BLIP-2's stage-one Q-Former
gives both scores, as transformers computes them:

- ``itm``: the ITM head on the query outputs of the Q-Former run over the queries and the text together,
  cross-attending to the image, averaged over the queries, softmax, class 1 (match);
- ``itc``: the largest cosine similarity between the text's ``[CLS]`` feature and any of the image's query
  features (BLIP-2 paper §3.2: "select the highest one as the image-text similarity").

Texts are normalised as LAVIS's ``blip_caption`` processor does (``pre_caption``, 50 words) and cut at 32
tokens (LAVIS's ``max_txt_len``).

Weights: a model whose fp32 weights take more than ``FP32_SHARE`` of the GPU's memory is held in bf16 (fp16
where the card has no bf16); the Q-Former and its queries stay fp32, as transformers keeps them
(``_keep_in_fp32_modules``). On CPU weights stay fp32 (4 bytes per parameter of RAM; docs/models.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from capfilt.row_sampler import row_sampling, seeded
from capfilt.sampling_settings import METHODS, SETTINGS_FILE
from capfilt.checkpoints import CAPTIONER, FILTER, CheckpointError, ModelSource, load_hf_folder, resolve
from capfilt.device import autocast, compute_in_fp32, pick_device
from capfilt.scores import TextScore
from capfilt.images import ImagePreprocessor
from capfilt.model_kind import BLIP2, model_kind
from capfilt.per_image import CaptionsPerImage, ScoresPerImage, flat_texts, regroup
from capfilt.tokenizer import pre_caption

FP32_SHARE = 0.5  # fp32 weights only up to half the GPU's memory: the rest for activations and the LM's cache
MAX_WORDS = 50  # LAVIS's blip_caption text processor for BLIP-2: at most 50 words
MAX_TEXT_TOKENS = 32  # LAVIS's Blip2Qformer max_txt_len


@dataclass(frozen=True)
class LmSamplingSettings:
    """How a captioner with a language model behind a Q-Former (BLIP-2, InstructBLIP) writes captions.

    The defaults are LAVIS's ``generate`` for BLIP-2 (``blip2_opt.py``, ``blip2_t5.py``), with BLIP's sampling:

    - ``method`` ``nucleus`` (``beam`` or ``greedy``), ``top_p`` 0.9, ``top_k`` 50 (transformers' default
      whenever it sampled, which LAVIS relied on), as BLIP's captioner.
    - ``repetition_penalty`` 1.0 (LAVIS's BLIP-2 default; InstructBLIP's is 1.5, set by ``for_model``).
    - ``num_beams`` 5: LAVIS's default. Beam search ranks finished captions as transformers 5 does.
    - ``max_length`` 30 / ``min_length`` 1: LAVIS's, counted in new tokens (BLIP's count the prompt).
    - ``prompt`` ``""``: BLIP-2's zero-shot captioning needs none; its COCO-finetuned models used ``a photo of``.
    - ``instruction``: InstructBLIP's instruction, given to the Q-Former and the LM (None for BLIP-2;
      InstructBLIP's default is ``instructblip.CAPTION_INSTRUCTION``).
    """

    method: str = "nucleus"
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    num_beams: int = 5
    max_length: int = 30
    min_length: int = 1
    prompt: str = ""
    instruction: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if not 1 <= self.max_length:
            raise ValueError(f"max_length (new tokens) must be at least 1, not {self.max_length}")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"min_length {self.min_length} must be in [0, max_length {self.max_length}]")

    @classmethod
    def for_model(cls, source: ModelSource | None, defaults: dict | None = None, **overrides) -> LmSamplingSettings:
        """``defaults`` (the family's), then the folder's ``capfilt_sampling.json`` if any, then ``overrides``.

        An override of BLIP's own (``beam_length_rule``) is refused; ``None`` values are left out.
        """
        values = dict(defaults or {})
        names = {f.name for f in fields(cls)}
        if source is not None and source.kind == "hf" and (source.path / SETTINGS_FILE).is_file():
            own = json.loads((source.path / SETTINGS_FILE).read_text())
            unknown = set(own) - names
            if unknown:
                raise ValueError(f"{source.path / SETTINGS_FILE}: unknown settings {sorted(unknown)}")
            values.update(own)
        overrides = {name: value for name, value in overrides.items() if value is not None}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"settings {sorted(unknown)} are BLIP's captioner's only; this captioner takes "
                             f"{sorted(names)}")
        return cls(**{**values, **overrides})

    def generate_kwargs(self, num_captions: int) -> dict:
        """Arguments for transformers' ``generate``, K captions per input (``row_sampling`` reads them too)."""
        lengths = dict(max_new_tokens=self.max_length, min_new_tokens=self.min_length,
                       repetition_penalty=self.repetition_penalty)
        if self.method == "nucleus":
            return dict(do_sample=True, top_p=self.top_p, top_k=self.top_k, num_beams=1, **lengths)
        if self.method == "greedy":
            if num_captions != 1:
                raise ValueError("greedy decoding writes one caption per image; use nucleus or beam for K > 1")
            return dict(do_sample=False, num_beams=1, **lengths)
        beams = max(self.num_beams, num_captions)
        return dict(do_sample=False, num_beams=beams, num_return_sequences=num_captions, **lengths)


def weights_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """fp32, unless on a GPU the fp32 weights would take more than ``FP32_SHARE`` of its memory: bf16 (or fp16)."""
    if device.type != "cuda":
        return torch.float32
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    if fp32_bytes <= FP32_SHARE * torch.cuda.get_device_properties(device).total_memory:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``model`` on ``device`` in ``dtype``, the modules transformers keeps in fp32 (the Q-Former) in fp32; eval."""
    model.to(device, dtype=dtype).eval()
    for name in getattr(model, "_keep_in_fp32_modules", None) or []:
        part = getattr(model, name, None)
        if isinstance(part, torch.nn.Parameter):
            part.data = part.data.float()
        elif isinstance(part, torch.nn.Module):
            part.float()


def load_tokenizer(folder: Path, source: ModelSource, flag: str):
    """The tokenizer in ``folder`` (any kind transformers reads), offline; a one-line error naming ``flag``."""
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # transformers raises OSError, ValueError, ... for a folder without one
        raise CheckpointError(f"no usable tokenizer at {folder} for the model at {source.path} "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                              f"pass {flag} PATH") from None


def hf_source(ref: str | Path, role: str, family: str, config) -> ModelSource:
    """The HF folder of a ``family`` model for ``role``; BLIP's ``.pth`` files and ``config=`` are BLIP's only."""
    source = resolve(ref, role)
    if source.kind != "hf" or model_kind(source).family != family:
        raise CheckpointError(f"{ref!r} is not an HF folder of a {family} model")
    if config is not None:
        raise CheckpointError(f"{source.path} carries its own config.json; config= is for BLIP's .pth files")
    return source


@dataclass
class Blip2Captioner(CaptionsPerImage):
    """A BLIP-2 captioner: images in, K captions per image out (the interface of ``capfilt.captioner.Captioner``)."""

    family: ClassVar[str] = BLIP2
    model_class: ClassVar[type] = Blip2ForConditionalGeneration
    defaults: ClassVar[dict] = {}  # the family's settings where they differ from LmSamplingSettings'

    model: Blip2ForConditionalGeneration
    tokenizer: object
    settings: LmSamplingSettings = field(default_factory=LmSamplingSettings)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    source: ModelSource | None = None
    precision: str = "auto"  # autocast: bf16 on CUDA and on CPUs with native bf16, else fp32 (capfilt.device)
    ref: str | None = None  # the reference it was loaded from (provenance)

    def __post_init__(self):
        config = self.model.config
        if config.image_token_index is None:
            raise CheckpointError(
                f"the {self.family} config has no image_token_index (transformers < 4.47 saved it without one): "
                "re-save it with a recent transformers, or set image_token_index in its config.json")
        self.weights = weights_dtype(self.model, self.device)
        place(self.model, self.device, self.weights)
        if self.weights == torch.float32:  # logits in fp32: top-p on bf16-rounded logits would draw otherwise
            compute_in_fp32(self.model.language_model.get_output_embeddings())
        self.decoder_only = bool(config.use_decoder_only_language_model)
        self.tokenizer.padding_side = "left"  # decoder-only LMs continue from the last position
        self.preprocess = ImagePreprocessor(config.vision_config.image_size)  # BlipImageProcessor: squash, CLIP norm
        text = config.text_config
        self.eos_id = text.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else text.pad_token_id
        prompt = self.tokenizer(self.lm_prompt(), add_special_tokens=True).input_ids
        images = [config.image_token_index] * config.num_query_tokens
        self.input_ids = torch.tensor(images + prompt)  # as Blip2Processor lays them out: <image> x Q, then the text

    def lm_prompt(self) -> str:
        """The text the language model reads after the image."""
        return self.settings.prompt

    @classmethod
    def load(cls, ref: str | Path, *, device: str | torch.device | None = None, tokenizer: str | Path | None = None,
             config=None, settings: LmSamplingSettings | None = None, precision: str = "auto"):
        """Load from an HF folder or a cached hub id (see ``checkpoints``); ``settings``: the family's defaults,
        then the folder's ``capfilt_sampling.json``."""
        source = hf_source(ref, CAPTIONER, cls.family, config)
        model = load_hf_folder(cls.model_class, source.path)
        tokenizer = load_tokenizer(Path(tokenizer or source.path), source, "--captioner-tokenizer")
        return cls(model=model, tokenizer=tokenizer,
                   settings=settings or LmSamplingSettings.for_model(source, cls.defaults), device=pick_device(device),
                   source=source, precision=precision, ref=str(ref))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The projected query outputs ``[B, Q, LM width]`` that stand in for the ``<image>`` tokens."""
        return self.model.get_image_features(pixel_values, return_dict=True).pooler_output

    @torch.no_grad()
    def generate_ids(self, pixel_values: torch.Tensor, num_captions: int = 1, seed: int | None = None, *,
                     seeds: Sequence[int] | None = None) -> torch.Tensor:
        """New-token ids ``[B * K, T]`` (no prompt), the K captions of an image adjacent.

        ``seed``: the global RNG's seed for the call; ``seeds``: one per image (``RowSampler``), as BLIP's captioner.
        """
        if seed is not None and seeds is not None:
            raise ValueError("give seed (the batch's) or seeds (one per image), not both")
        if seeds is not None and len(seeds) != len(pixel_values):
            raise ValueError(f"{len(seeds)} seeds for {len(pixel_values)} images")
        kwargs = self.settings.generate_kwargs(num_captions)
        with autocast(self.device, self.precision):
            features = self.image_features(pixel_values.to(self.device))  # once per image
            input_ids = self.input_ids.to(self.device).expand(len(pixel_values), -1)
            embeds = self.model.get_input_embeddings()(input_ids)
            embeds = torch.cat([features.to(embeds.dtype), embeds[:, features.shape[1]:]], dim=1)
            if kwargs["do_sample"] and num_captions > 1:  # beams expand inside generate
                embeds = embeds.repeat_interleave(num_captions, dim=0)
                input_ids = input_ids.repeat_interleave(num_captions, dim=0)
            if kwargs["do_sample"] and seeds is not None:
                kwargs = row_sampling(kwargs, seeds, num_captions, self.device)
            inputs = {"inputs_embeds": embeds, "attention_mask": torch.ones_like(input_ids)}
            if self.decoder_only:
                inputs["input_ids"] = input_ids  # as transformers' BLIP-2: the repetition penalty sees them
            with seeded(seed, self.device):
                out = self.model.language_model.generate(**inputs, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                                                         **kwargs)
        # decoder-only: the output repeats the input ids; encoder-decoder: it starts with the decoder start token
        return out[:, input_ids.shape[1]:] if self.decoder_only else out[:, 1:]

    def decode(self, ids: torch.Tensor) -> list[str]:
        """The new tokens as text, special tokens skipped, outer spaces stripped."""
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


@dataclass
class Blip2Filter(ScoresPerImage):
    """BLIP-2's Q-Former judging image–text pairs: ITM and ITC (the interface of ``capfilt.filter.Filter``)."""

    family: ClassVar[str] = BLIP2
    judged_by: ClassVar[str] = "itm"  # the score a threshold applies to by default

    model: Blip2ForImageTextRetrieval
    tokenizer: object
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    source: ModelSource | None = None
    text_batch_size: int = 256  # texts per Q-Former call
    precision: str = "auto"
    ref: str | None = None

    def __post_init__(self):
        self.weights = weights_dtype(self.model, self.device)
        place(self.model, self.device, self.weights)
        if self.weights == torch.float32:
            for head in (self.model.itm_head, self.model.text_projection, self.model.vision_projection):
                compute_in_fp32(head)  # scores in fp32
        self.preprocess = ImagePreprocessor(self.model.config.vision_config.image_size)

    @classmethod
    def load(cls, ref: str | Path, *, device: str | torch.device | None = None, tokenizer: str | Path | None = None,
             config=None, precision: str = "auto") -> Blip2Filter:
        source = hf_source(ref, FILTER, cls.family, config)
        model = load_hf_folder(Blip2ForImageTextRetrieval, source.path)
        return cls(model=model, tokenizer=load_tokenizer(Path(tokenizer or source.path), source, "--filter-tokenizer"),
                   device=pick_device(device), source=source, precision=precision, ref=str(ref))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        cleaned = [pre_caption(text, MAX_WORDS) for text in texts]
        tokens = self.tokenizer(cleaned, padding="longest", truncation=True, max_length=MAX_TEXT_TOKENS,
                                return_tensors="pt")
        return {"input_ids": tokens.input_ids.to(self.device), "attention_mask": tokens.attention_mask.to(self.device)}

    @torch.no_grad()
    def score_embedded(self, image_embeds: torch.Tensor, image_feat: torch.Tensor, image_index: torch.Tensor,
                       input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM probabilities and ITC similarities of texts against encoded images (``image_index``: each text's)."""
        model = self.model
        queries = model.query_tokens.expand(len(input_ids), -1, -1)
        count = queries.shape[1]
        images = image_embeds[image_index]
        grounded = model.qformer(
            query_embeds=model.embeddings(input_ids=input_ids, query_embeds=queries), query_length=count,
            attention_mask=torch.cat([torch.ones(queries.shape[:-1], dtype=attention_mask.dtype,
                                                 device=self.device), attention_mask], dim=1),
            encoder_hidden_states=images,
            encoder_attention_mask=torch.ones(images.shape[:-1], dtype=torch.long, device=self.device),
        ).last_hidden_state
        logits = model.itm_head(grounded[:, :count].to(model.itm_head.weight.dtype)).mean(dim=1)
        itm = F.softmax(logits.float(), dim=-1)[:, 1]
        text = model.qformer(query_embeds=model.embeddings(input_ids=input_ids), query_length=0,
                             attention_mask=attention_mask).last_hidden_state[:, 0]
        text_feat = F.normalize(model.text_projection(text.to(model.text_projection.weight.dtype)).float(), dim=-1)
        itc = torch.einsum("tqd,td->tq", image_feat[image_index], text_feat).max(dim=1).values
        return itm, itc

    @torch.no_grad()
    def score_pixels(self, pixel_values: torch.Tensor, texts: Sequence[Sequence[str]]) -> list[list[TextScore]]:
        """``score`` of images already preprocessed to ``[B, 3, S, S]`` (``self.preprocess``)."""
        flat = flat_texts(len(pixel_values), texts)
        if not flat:
            return [[] for _ in texts]
        image_index = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=self.device)
        model, itm, itc = self.model, [], []
        with autocast(self.device, self.precision):
            image_embeds = model.vision_model(pixel_values=pixel_values.to(self.device)).last_hidden_state  # once
            queries = model.query_tokens.expand(len(pixel_values), -1, -1)
            image_queries = model.qformer(
                query_embeds=queries, encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
            ).last_hidden_state
            projection = model.vision_projection
            image_feat = F.normalize(projection(image_queries.to(projection.weight.dtype)).float(), dim=-1)
            for start in range(0, len(flat), self.text_batch_size):
                stop = start + self.text_batch_size
                batch_itm, batch_itc = self.score_embedded(image_embeds, image_feat, image_index[start:stop],
                                                           **self.tokenize(flat[start:stop]))
                itm += batch_itm.tolist()
                itc += batch_itc.tolist()
        return regroup(texts, itm, itc)

