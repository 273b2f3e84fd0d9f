"""How captions are sampled: ``SamplingSettings`` and the names it takes, without torch (the command line's help
reads the defaults from here)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capfilt.checkpoints import ModelSource

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
