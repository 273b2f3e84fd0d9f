"""The captioner and the filter of one worker, loaded together, once."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from capfilt.captioner import Captioner, SamplingSettings
from capfilt.checkpoints import CAPTIONER, resolve
from capfilt.filter import Filter
from capfilt.pipelines.settings import BootstrapSettings


@dataclass
class Models:
    """CapFilt's two models: separately fine-tuned, as in the paper (sharing them made the filter lenient)."""

    captioner: Captioner
    filter: Filter

    @classmethod
    def load(cls, settings: BootstrapSettings) -> Models:
        """Both models; sampling: the paper's defaults, then the captioner folder's, then the run's overrides."""
        sampling = SamplingSettings.for_model(resolve(settings.captioner, CAPTIONER), **settings.sampling_overrides)
        captioner = Captioner.load(settings.captioner, device=settings.device, tokenizer=settings.captioner_tokenizer,
                                   settings=sampling)
        filter_ = Filter.load(settings.filter, device=settings.device, tokenizer=settings.filter_tokenizer)
        return cls(captioner, filter_)

    @property
    def sampling(self) -> dict:
        """The sampling settings the captioner uses."""
        return asdict(self.captioner.settings)

    def provenance(self) -> dict:
        """Where each model's weights came from (the resolved folder or file)."""
        return {
            role: {"kind": model.source.kind, "path": str(model.source.path)} if model.source else None
            for role, model in (("captioner", self.captioner), ("filter", self.filter))
        }
