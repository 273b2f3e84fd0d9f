"""The captioner: BLIP's image-grounded text decoder writing synthetic captions (paper §3.3).

Generation follows the original BLIP code (``BLIP_Decoder.generate``): the
prompt ``a picture of `` is tokenised, its ``[CLS]`` replaced by ``[DEC]``,
its ``[SEP]`` dropped; the decoder continues from there and the first
``len(prompt)`` characters are cut from the decoded text. Each image is
encoded once by the ViT and its embedding reused for all its K captions.
Beam search ranks finished captions as BLIP's pinned transformers 4.15 did
(``beam_search_blip``), not as transformers 5 does.

Other families (BLIP-2, InstructBLIP: ``capfilt.blip2``, ``capfilt.instructblip``) implement the same
captioner interface; ``capfilt.families.load_captioner`` returns the one the model's config.json names.
Every captioner has ``family``, ``source``, ``ref``, ``device``, ``precision``, ``settings``, ``preprocess``,
``caption(images, K, seed, seeds=)``, ``caption_pixels(pixels, K, seed, seeds=)``, ``generate_ids`` and ``decode``.

Seeds. ``seed`` seeds torch's global RNG for the whole call, as transformers'
own sampling draws from it: a caption then depends on the batch it is in.
``seeds`` (one per image) give each caption its own generator instead
(``RowSampler``), so an image's captions depend only on its seed, whatever
else is in the batch and wherever it sits in it (up to float rounding), on
one kind of device (CPU and CUDA generators draw different numbers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from transformers import BlipConfig, BlipForConditionalGeneration, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from capfilt.checkpoints import CAPTIONER, ModelSource, load_model
from capfilt.device import autocast, compute_in_fp32, pick_device
from capfilt.images import ImagePreprocessor
from capfilt.model_kind import require_blip
from capfilt.tokenizer import special_ids

METHODS = ("nucleus", "beam", "greedy")
BEAM_LENGTH_RULES = ("blip", "transformers")
# A model folder may carry its own caption lengths etc. (the demo models do: their captions are short).
SETTINGS_FILE = "capfilt_sampling.json"


@dataclass(frozen=True)
class SamplingSettings:
    """How captions are generated; defaults are CapFilt's (paper §3.3, §4.3) and the original code's.

    - ``method``: ``nucleus`` (paper: one synthetic caption per image by nucleus
      sampling; beam search gave a lower noise ratio and a worse model),
      ``beam`` or ``greedy``.
    - ``top_p`` 0.9: the paper's p (0.85 and 0.95 gave similar results).
    - ``top_k`` 50: not set by BLIP, but transformers 4.15 (which BLIP pins)
      applied its default top_k = 50 whenever it sampled; kept to reproduce it.
    - ``repetition_penalty``: ``None`` means the original's per method: 1.1,
      hard-coded in its sampling branch; 1.0, its beam-search default.
    - ``num_beams`` 3: the original ``generate`` default and COCO evaluation.
    - ``max_length`` 30 / ``min_length`` 10: the original ``generate``
      defaults; both count the prompt's tokens (``[DEC] a picture of``), as
      transformers' generate does. COCO evaluation used 20 / 5 with beams.
    - ``prompt`` ``a picture of ``: BLIP's captioning prompt.
    - ``beam_length_rule`` ``blip``: how beam search ranks finished captions.
      ``blip``: as transformers 4.15, which BLIP pins, did: summed log-prob
      divided by the whole sequence's length, prompt included, final
      ``[SEP]`` not (``beam_search_blip``). ``transformers``: transformers 5's
      ``generate``, which divides by the generated length, ``[SEP]`` included.
      They rank captions that end before ``max_length`` differently.
    """

    method: str = "nucleus"
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float | None = None
    num_beams: int = 3
    max_length: int = 30
    min_length: int = 10
    prompt: str = "a picture of "
    beam_length_rule: str = "blip"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.beam_length_rule not in BEAM_LENGTH_RULES:
            raise ValueError(f"beam_length_rule must be one of {BEAM_LENGTH_RULES}, not {self.beam_length_rule!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} > max_length {self.max_length}")

    @classmethod
    def for_model(cls, source: ModelSource | None, **overrides) -> SamplingSettings:
        """The defaults, then the model folder's ``capfilt_sampling.json`` if any, then ``overrides``."""
        values = {}
        if source is not None and source.kind == "hf" and (source.path / SETTINGS_FILE).is_file():
            values = json.loads((source.path / SETTINGS_FILE).read_text())
            unknown = set(values) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"{source.path / SETTINGS_FILE}: unknown settings {sorted(unknown)}")
        return cls(**{**values, **overrides})

    def generate_kwargs(self, num_captions: int) -> dict:
        """Arguments for transformers' ``generate``, K captions per input."""
        if self.method == "nucleus":
            penalty = 1.1 if self.repetition_penalty is None else self.repetition_penalty
            return dict(do_sample=True, top_p=self.top_p, top_k=self.top_k, num_beams=1, repetition_penalty=penalty)
        penalty = 1.0 if self.repetition_penalty is None else self.repetition_penalty
        if self.method == "greedy":
            if num_captions != 1:
                raise ValueError("greedy decoding writes one caption per image; use nucleus or beam for K > 1")
            return dict(do_sample=False, num_beams=1, repetition_penalty=penalty)
        beams = max(self.num_beams, num_captions)
        return dict(do_sample=False, num_beams=beams, num_return_sequences=num_captions, repetition_penalty=penalty)


@dataclass
class Captioner:
    """A BLIP captioner: images in, K captions per image out."""

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
        settings: SamplingSettings | None = None,
        precision: str = "auto",
    ) -> Captioner:
        """Load from an HF folder, a cached hub id, an original ``.pth`` or ``demo`` (see ``checkpoints``).

        BLIP only: ``capfilt.families.load_captioner`` loads any family. A model that cannot caption, or of
        another family, is a one-line error. ``settings`` default to ``SamplingSettings.for_model``: the paper's,
        unless the model's folder carries a ``capfilt_sampling.json``.
        """
        require_blip(ref, CAPTIONER, tokenizer)
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
            with _seeded(seed, self.device):
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

    def caption(self, images: Sequence[Image.Image], num_captions: int = 1, seed: int | None = None, *,
                seeds: Sequence[int] | None = None) -> list[list[str]]:
        """K captions for each image (nucleus sampling with p = 0.9 by default); seeded runs repeat exactly.

        ``seed`` seeds the call, ``seeds`` each image (its captions then do not depend on the other images).
        """
        if not images:
            return []
        return self.caption_pixels(self.preprocess(images), num_captions, seed, seeds=seeds)

    def caption_pixels(self, pixel_values: torch.Tensor, num_captions: int = 1, seed: int | None = None, *,
                       seeds: Sequence[int] | None = None) -> list[list[str]]:
        """``caption`` of images already preprocessed to ``[B, 3, S, S]`` (``self.preprocess``)."""
        captions = self.decode(self.generate_ids(pixel_values, num_captions, seed, seeds=seeds))
        return [captions[i * num_captions : (i + 1) * num_captions] for i in range(len(pixel_values))]


def caption_seed(image_seed: int, caption: int) -> int:
    """The generator seed of an image's ``caption``-th caption: stable across runs, machines and processes."""
    digest = hashlib.blake2b(f"{image_seed}/{caption}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")  # torch.Generator takes any seed below 2**64


class RowSampler(LogitsProcessor):
    """Draws each row's next token from the softmax of its scores, with the row's own generator.

    The Gumbel-max trick: argmax(scores + G), G standard Gumbel noise drawn independently per token, is an exact
    draw from softmax(scores); tokens the warpers removed (-inf) are never drawn. Each row draws one vocabulary-
    sized vector per step from its generator, whatever the other rows do (finished or not), so its tokens depend
    on its seed and its own scores only. The drawn token is returned as the only finite score (0), which greedy
    decoding then takes.

    The generators live on the scores' device (the model's): noise drawn on the CPU and moved over would put a
    vocabulary-sized draw per caption and step on the CPU, slower than a GPU's whole decoding step. CPU and CUDA
    generators draw different numbers from one seed, so a seed's captions are the same on one kind of device.
    The noise is float64 (Gumbel's tails without float32's cut-offs).
    """

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows of scores for {len(self.generators)} generators")
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64, device=scores.device)
                               for g in self.generators])
        gumbel = uniform.clamp_min_(torch.finfo(torch.float64).tiny).log_().neg_().log_().neg_()  # -log(-log(u))
        drawn = gumbel.add_(scores.detach()).argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, -float("inf")).scatter_(1, drawn, 0.0)


def row_sampling(sampling: dict, seeds: Sequence[int], num_captions: int, device: torch.device) -> dict:
    """``sampling``'s ``generate`` arguments (``generate_kwargs``) with a generator per caption, image-major as the
    rows are.

    transformers 5 (``GenerationMixin._get_logits_processor``) applies, when sampling, its processors
    (repetition penalty, then min length), then the user's ``logits_processor``, then the warpers (temperature,
    top-k, top-p), then draws with ``torch.multinomial`` (``_sample``). Greedy decoding builds the same processors
    and no warpers, so top-k, top-p (the same classes and order, ``min_tokens_to_keep`` 1 as without beams) and the
    draw go in as the user's processors, after the penalty and the length rule, as sampling has them.
    """
    warpers = []
    if sampling["top_k"]:  # transformers skips top_k 0 (and None)
        warpers.append(TopKLogitsWarper(top_k=sampling["top_k"], min_tokens_to_keep=1))
    if sampling["top_p"] < 1.0:
        warpers.append(TopPLogitsWarper(top_p=sampling["top_p"], min_tokens_to_keep=1))
    generators = [torch.Generator(device).manual_seed(caption_seed(seed, k)) for seed in seeds
                  for k in range(num_captions)]
    greedy = {name: value for name, value in sampling.items() if name not in ("do_sample", "top_k", "top_p")}
    return {**greedy, "do_sample": False, "logits_processor": LogitsProcessorList([*warpers, RowSampler(generators)])}


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


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Run with the global RNG seeded, restoring its state afterwards (transformers samples from it)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
