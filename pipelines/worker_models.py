"""The captioner and the filter of one worker, loaded together, once."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from capfilt.captioner import Captioner, SamplingSettings
from capfilt.checkpoints import CAPTIONER, resolve
from capfilt.device import WorkerSlot, precision_name, worker_device
from capfilt.filter import Filter
from capfilt.pipelines.settings import BootstrapSettings


@dataclass
class Models:
    """CapFilt's two models: separately fine-tuned, as in the paper (sharing them made the filter lenient)."""

    captioner: Captioner
    filter: Filter
    slot: WorkerSlot | None = None  # this worker's slot on a multi-GPU node (capfilt.device.worker_device)

    @classmethod
    def load(cls, settings: BootstrapSettings) -> Models:
        """Both models, on this worker's device; sampling: the paper's defaults, the captioner folder's, the run's."""
        sampling = SamplingSettings.for_model(resolve(settings.captioner, CAPTIONER), **settings.sampling_overrides)
        device, slot = worker_device(settings.device)
        try:
            captioner = Captioner.load(settings.captioner, device=device, tokenizer=settings.captioner_tokenizer,
                                       settings=sampling, precision=settings.precision)
            filter_ = Filter.load(settings.filter, device=device, tokenizer=settings.filter_tokenizer,
                                  precision=settings.precision)
        except BaseException:
            if slot:
                slot.release()
            raise
        return cls(captioner, filter_, slot)

    def release(self) -> None:
        """Give this worker's GPU slot back (the DoFn's teardown)."""
        if self.slot:
            self.slot.release()

    @property
    def sampling(self) -> dict:
        """The sampling settings the captioner uses."""
        return asdict(self.captioner.settings)

    def provenance(self) -> dict:
        """Where each model's weights came from (the resolved folder or file), and the precision it ran at."""
        return {
            role: {"kind": model.source.kind, "path": str(model.source.path),
                   "precision": precision_name(model.device, model.precision)} if model.source else None
            for role, model in (("captioner", self.captioner), ("filter", self.filter))
        }
