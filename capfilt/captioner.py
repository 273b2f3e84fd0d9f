"""The captioner: BLIP's image-grounded text decoder writing synthetic captions (paper §3.3).

Generation follows the original BLIP code (``BLIP_Decoder.generate``): the
prompt ``a picture of `` is tokenised, its ``[CLS]`` replaced by ``[DEC]``,
its ``[SEP]`` dropped; the decoder continues from there and the first
``len(prompt)`` characters are cut from the decoded text. Each image is
encoded once by the ViT and its embedding reused for all its K captions.
Beam search ranks finished captions as BLIP's pinned transformers 4.15 did
(``beam_search_blip``), not as transformers 5 does.

``Captioner`` is also the one captioner interface: ``Captioner.load`` reads the model's config.json
(``capfilt.model_kind``) and returns BLIP's captioner, or another family's (BLIP-2, InstructBLIP:
``capfilt.blip2``, ``capfilt.instructblip``), which implements the interface in its own module and is registered
as a ``Captioner`` (``isinstance`` holds; an ABC's virtual subclass, as those modules cannot import this one).
Everything BLIP's own (``[DEC]`` and the prompt cut, BLIP's beam rule) is on this class only. Every captioner has
``family``, ``source``, ``ref``, ``device``, ``precision``, ``settings``, ``preprocess``,
``caption(images, K, seed, seeds=)``, ``caption_pixels(pixels, K, seed, seeds=)``, ``generate_ids`` and ``decode``.

Seeds. ``seed`` seeds torch's global RNG for the whole call, as transformers'
own sampling draws from it: a caption then depends on the batch it is in.
``seeds`` (one per image) give each caption its own generator instead
(``capfilt.row_sampler.RowSampler``), so an image's captions depend only on its seed, whatever
else is in the batch and wherever it sits in it (up to float rounding), on
one kind of device (CPU and CUDA generators draw different numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from abc import ABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from transformers import BlipConfig, BlipForConditionalGeneration

from capfilt.blip2 import Blip2Captioner, LmSamplingSettings
from capfilt.checkpoints import CAPTIONER, ModelSource, load_model
from capfilt.device import autocast, compute_in_fp32, pick_device
from capfilt.images import ImagePreprocessor
from capfilt.instructblip import InstructBlipCaptioner
from capfilt.model_kind import BLIP, BLIP2, INSTRUCTBLIP, family_for
from capfilt.per_image import CaptionsPerImage
from capfilt.row_sampler import row_sampling, seeded
from capfilt.sampling_settings import SamplingSettings
from capfilt.tokenizer import special_ids

@dataclass
class Captioner(CaptionsPerImage, ABC):
    """A BLIP captioner: images in, K captions per image out; and the interface of every family's captioner."""

    family: ClassVar[str] = "blip"  # capfilt.model_kind's family name

    model: BlipForConditionalGeneration
    tokenizer: object
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    source: ModelSource | None = None
    precision: str = "auto"  # autocast: bf16 on CUDA and on CPUs with native bf16, else fp32 (capfilt.device)
    ref: str | None = None  # the reference it was loaded from (provenance)

    def __post_init__(self):
        self.model.to(self.device, dtype=torch.float32).eval()  # fp32 weights; products under autocast_dtype
        self.weights = torch.float32
        # Logits in fp32: top-p keeps the fewest tokens whose probabilities reach p, so logits rounded to bf16
        # shift the distribution it draws from (docs/throughput.md, "bf16 and the output").
        compute_in_fp32(self.model.text_decoder.cls)
        self.preprocess = ImagePreprocessor(self.model.config.vision_config.image_size)
        self.ids = special_ids(self.tokenizer)
        prompt = self.tokenizer(self.settings.prompt, add_special_tokens=True).input_ids[:-1]  # drop [SEP]
        self.prompt_ids = torch.tensor([self.ids.dec] + prompt[1:])  # [CLS] -> [DEC]

    @classmethod
    def load(
        cls,
        ref: str | Path,
        *,
        device: str | torch.device | None = None,
        tokenizer: str | Path | None = None,
        config: str | Path | BlipConfig | None = None,
        settings: SamplingSettings | LmSamplingSettings | None = None,
        precision: str = "auto",
    ) -> Captioner:
        """Load from an HF folder, a cached hub id, an original ``.pth`` or ``demo`` (see ``checkpoints``).

        Any family: the model's config.json decides (``FAMILIES``); a model that cannot caption is a one-line
        error naming what the captioner accepts. ``settings`` (``SamplingSettings`` for BLIP, ``LmSamplingSettings``
        for the others) default to the family's, unless the model's folder carries a ``capfilt_sampling.json``;
        ``config`` is for BLIP's ``.pth`` files only.
        """
        family = family_for(ref, CAPTIONER, tokenizer)
        if family != BLIP:
            return FAMILIES[family].load(ref, device=device, tokenizer=tokenizer, config=config, settings=settings,
                                         precision=precision)
        model, tokenizer, source = load_model(BlipForConditionalGeneration, ref, CAPTIONER, config, tokenizer)
        return cls(
            model=model,
            tokenizer=tokenizer,
            settings=settings or SamplingSettings.for_model(source),
            device=pick_device(device),
            source=source,
            precision=precision,
            ref=str(ref),
        )

    @torch.no_grad()
    def generate_ids(self, pixel_values: torch.Tensor, num_captions: int = 1, seed: int | None = None, *,
                     seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Token ids ``[B * K, T]`` (prompt included), the K captions of an image adjacent.

        ``seed``: the global RNG's seed for the call (transformers' sampling); ``seeds``: one per image, each
        caption drawn from its own generator (``RowSampler``). Beam search and greedy decoding use neither.
        """
        if seed is not None and seeds is not None:
            raise ValueError("give seed (the batch's) or seeds (one per image), not both")
        if seeds is not None and len(seeds) != len(pixel_values):
            raise ValueError(f"{len(seeds)} seeds for {len(pixel_values)} images")
        pixel_values = pixel_values.to(self.device)
        kwargs = self.settings.generate_kwargs(num_captions)
        with autocast(self.device, self.precision):
            image_embeds = self.model.vision_model(pixel_values=pixel_values).last_hidden_state  # encoded once
            if self.settings.method == "beam" and self.settings.beam_length_rule == "blip":
                return beam_search_blip(self.model.text_decoder, image_embeds, self.prompt_ids.to(self.device),
                                        self.ids, self.settings, num_captions)
            if kwargs["do_sample"] and num_captions > 1:
                image_embeds = image_embeds.repeat_interleave(num_captions, dim=0)
            if kwargs["do_sample"] and seeds is not None:
                kwargs = row_sampling(kwargs, seeds, num_captions, self.device)
            rows = image_embeds.shape[0]
            input_ids = self.prompt_ids.to(self.device).expand(rows, -1)
            with seeded(seed, self.device):
                return self.model.text_decoder.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    encoder_hidden_states=image_embeds,
                    encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
                    eos_token_id=self.ids.sep,
                    pad_token_id=self.ids.pad,
                    max_length=self.settings.max_length,
                    min_length=self.settings.min_length,
                    **kwargs,
                )

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Captions as BLIP returns them: special tokens skipped, then the first ``len(prompt)`` characters cut.

        BLIP's rule (``BLIP_Decoder.generate``: ``caption[len(self.prompt):]``) counts characters, not words: a
        caption whose first token is a word piece or punctuation loses that many characters of its own text
        (``a picture ofing red`` -> ``ng red``; ``a picture of, red`` -> `` red``), and nothing is stripped.
        """
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [text[len(self.settings.prompt):] for text in texts]


# The other families' captioners, by capfilt.model_kind's family name; they implement this interface
FAMILIES = {BLIP2: Blip2Captioner, INSTRUCTBLIP: InstructBlipCaptioner}
Captioner.register(Blip2Captioner)  # InstructBlipCaptioner subclasses it


@torch.no_grad()
def beam_search_blip(decoder, image_embeds: torch.Tensor, prompt_ids: torch.Tensor, ids, settings: SamplingSettings,
                     num_captions: int = 1) -> torch.Tensor:
    """Beam search as transformers 4.15 ran it for BLIP; ids ``[B * K, T]`` laid out like ``generate``'s.

    Facts from transformers 4.15 (``generation_utils.py`` ``GenerationMixin.beam_search``,
    ``generation_beam_search.py`` ``BeamSearchScorer.process`` / ``finalize`` and ``BeamHypotheses``):
    log-softmax, then the logits processors (repetition penalty on the log-probs, ``[SEP]`` at -inf while the
    sequence, prompt included, is shorter than ``min_length``), plus the beam's running sum; the best
    ``2 * num_beams`` of all beams' continuations in order: a ``[SEP]`` among the first ``num_beams`` finishes its
    beam (``BeamHypotheses.add``: score = sum / ``hyp.shape[-1] ** length_penalty``, ``hyp`` the sequence so far,
    prompt included, ``[SEP]`` not yet appended; length_penalty 1.0, BLIP's config default), the other tokens
    fill the ``num_beams`` running beams. An image is done when it holds ``num_beams`` finished captions and
    (early_stopping False, the config default) the best continuation's sum / current length is no better than the
    worst kept (``BeamHypotheses.is_done``). At ``max_length`` the running beams join the finished ones, scored by
    ``max_length``; each image returns its best ``K``, ``[SEP]`` appended where it fits, ``[PAD]`` after.
    transformers 5 instead divides by the generated length with ``[SEP]`` (``_update_finished_beams``).

    One function on purpose: its steps follow 4.15's loop in that loop's order, so that it reads against the
    original line by line; split, the state each step shares (sums, beams, finished hypotheses) would travel
    through every call.
    """
    beams = max(settings.num_beams, num_captions)
    batch = image_embeds.shape[0]
    penalty = 1.0 if settings.repetition_penalty is None else settings.repetition_penalty
    embeds = image_embeds.repeat_interleave(beams, dim=0)
    embeds_mask = torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device)
    seqs = prompt_ids.expand(batch * beams, -1)
    sums = torch.zeros(batch, beams, device=embeds.device)
    sums[:, 1:] = -1e9  # the beams start equal: only the first one's continuations count at step one
    finished = [[] for _ in range(batch)]  # per image: (score, ids) of at most `beams` captions
    done = [False] * batch
    step, cache = seqs, None

    def add(kept, hyp, total):
        score = total / hyp.shape[-1]
        if len(kept) < beams or score > min(k[0] for k in kept):
            kept.append((score, hyp))
            if len(kept) > beams:
                kept.remove(min(kept, key=lambda k: k[0]))

    while True:
        out = decoder(input_ids=step, encoder_hidden_states=embeds, encoder_attention_mask=embeds_mask,
                      cache=cache, use_cache=True, is_decoder=True)
        cache = out.cache
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        if penalty != 1.0:
            seen = logp.gather(1, seqs)
            logp.scatter_(1, seqs, torch.where(seen < 0, seen * penalty, seen / penalty))
        if seqs.shape[1] < settings.min_length:
            logp[:, ids.sep] = -float("inf")
        vocab = logp.shape[-1]
        top, where = (logp + sums.view(-1, 1)).view(batch, -1).topk(2 * beams, dim=1)
        new_sums = torch.zeros(batch, beams, device=embeds.device)
        new_tokens = torch.full((batch, beams), ids.pad, dtype=torch.long, device=embeds.device)
        rows = torch.arange(batch, device=embeds.device).repeat_interleave(beams).view(batch, beams) * beams
        for b in range(batch):
            if done[b]:
                continue  # padded along: score 0, [PAD], its first beam
            slot = 0
            for rank, (total, flat) in enumerate(zip(top[b].tolist(), where[b].tolist())):
                row, token = b * beams + flat // vocab, flat % vocab
                if token == ids.sep:
                    if rank < beams:
                        add(finished[b], seqs[row], total)
                else:
                    new_sums[b, slot], new_tokens[b, slot], rows[b, slot] = total, token, row
                    slot += 1
                    if slot == beams:
                        break
            worst = min((k[0] for k in finished[b]), default=None)
            done[b] = len(finished[b]) >= beams and worst >= top[b].max().item() / seqs.shape[1]
        rows, sums = rows.view(-1), new_sums
        seqs = torch.cat([seqs[rows], new_tokens.view(-1, 1)], dim=1)
        cache.reorder_cache(rows)
        step = new_tokens.view(-1, 1)
        if all(done) or seqs.shape[1] >= settings.max_length:
            break
    best = []
    for b in range(batch):
        if not done[b]:
            for row in range(b * beams, (b + 1) * beams):
                add(finished[b], seqs[row], sums.view(-1)[row].item())
        best += [hyp for _, hyp in sorted(finished[b], key=lambda k: k[0])[::-1][:num_captions]]  # ties: the latest
    width = min(max(len(hyp) for hyp in best) + 1, settings.max_length)
    result = torch.full((len(best), width), ids.pad, dtype=torch.long, device=embeds.device)
    for i, hyp in enumerate(best):
        result[i, : len(hyp)] = hyp
        if len(hyp) < settings.max_length:
            result[i, len(hyp)] = ids.sep
    return result
