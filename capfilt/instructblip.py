"""InstructBLIP (Dai et al. 2023): BLIP-2 whose Q-Former also reads the instruction, here a captioning one.

The instruction goes to both the Q-Former (with its own BERT tokenizer, the folder's ``qformer_tokenizer/``) and
the language model, as ``InstructBlipForConditionalGeneration.generate`` takes it. Everything else is BLIP-2's
captioner (``capfilt.blip2.Blip2Captioner``): one image encoding for its K captions (the instruction is the same
for every image), the sampling contract, lengths in new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from transformers import InstructBlipForConditionalGeneration

from capfilt.blip2 import Blip2Captioner, LmSamplingSettings, hf_source, load_tokenizer
from capfilt.checkpoints import CAPTIONER, load_hf_folder
from capfilt.device import pick_device
from capfilt.model_kind import INSTRUCTBLIP, QFORMER_TOKENIZER

# The first of the InstructBLIP paper's image-captioning instruction templates (Dai et al. 2023, "InstructBLIP",
# arXiv 2305.06500, appendix table of instruction templates, "Image Captioning": "<Image>A short image caption:"); a
# short caption is what CapFilt's captioner writes. Not checked against the paper's PDF here (no network): the list
# beginning "A short image caption:", "A short image description:", "A photo of", "An image that shows" is the one
# that public instruction-tuning code reproduces as those templates.
CAPTION_INSTRUCTION = "A short image caption:"
# LAVIS's InstructBLIP generate() defaults where they differ from BLIP-2's (repetition_penalty 1.5)
DEFAULTS = {"instruction": CAPTION_INSTRUCTION, "repetition_penalty": 1.5}


@dataclass
class InstructBlipCaptioner(Blip2Captioner):
    """An InstructBLIP captioner; ``settings.instruction`` (default ``CAPTION_INSTRUCTION``) is what it is asked."""

    family: ClassVar[str] = INSTRUCTBLIP
    model_class: ClassVar[type] = InstructBlipForConditionalGeneration
    defaults: ClassVar[dict] = DEFAULTS

    qformer_tokenizer: object = None

    def __post_init__(self):
        if self.qformer_tokenizer is None:
            raise ValueError("InstructBLIP needs its Q-Former's tokenizer (qformer_tokenizer=)")
        if not self.settings.instruction:
            raise ValueError("InstructBLIP needs an instruction (settings.instruction)")
        super().__post_init__()
        instruction = self.qformer_tokenizer(self.settings.instruction, add_special_tokens=True)
        self.qformer_ids = torch.tensor(instruction.input_ids)

    def lm_prompt(self) -> str:
        """The instruction, then the prompt (empty by default), as the language model's text."""
        return " ".join(part for part in (self.settings.instruction, self.settings.prompt) if part)

    @classmethod
    def load(cls, ref: str | Path, *, device: str | torch.device | None = None, tokenizer: str | Path | None = None,
             config=None, settings: LmSamplingSettings | None = None, precision: str = "auto"):
        source = hf_source(ref, CAPTIONER, cls.family, config)
        model = load_hf_folder(cls.model_class, source.path)
        folder = Path(tokenizer or source.path)
        return cls(model=model, tokenizer=load_tokenizer(folder, source, "--captioner-tokenizer"),
                   settings=settings or LmSamplingSettings.for_model(source, cls.defaults),
                   device=pick_device(device), source=source, precision=precision, ref=str(ref),
                   qformer_tokenizer=load_tokenizer(folder / QFORMER_TOKENIZER, source, "--captioner-tokenizer"))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        qformer_ids = self.qformer_ids.to(self.device).expand(len(pixel_values), -1)
        return self.model.get_image_features(pixel_values, qformer_input_ids=qformer_ids,
                                             qformer_attention_mask=torch.ones_like(qformer_ids),
                                             return_dict=True).pooler_output
