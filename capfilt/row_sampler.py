"""Per-image seeded sampling: each caption drawn from its own generator (``RowSampler``), so an image's captions
depend on its seed only, whatever else is in the batch; and ``seeded``, the global RNG seeded for one call."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper


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


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device):
    """Run with the global RNG seeded, restoring its state afterwards (transformers samples from it)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
