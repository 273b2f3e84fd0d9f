"""The captioner and the filter of one worker, loaded together, once: any captioner family with any filter."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from capfilt.captioner import Captioner
from capfilt.checkpoints import CheckpointError
from capfilt.device import WorkerSlot, precision_name, worker_device
from capfilt.families import load_captioner, load_filter, sampling_settings
from capfilt.filter import Filter
from capfilt.pipelines.settings import BootstrapSettings


def check_shared_input(captioner, filter_) -> None:
    """Refuse two models that want different pixels at one input size.

    The shard job decodes each image once per input size (``capfilt.images.decode_for_model`` keys its pixels by
    ``image_size``), so two models of one size must preprocess alike. CLIP's centre crop differs from BLIP's
    squashed resize: e.g. a BLIP-2 captioner (224 px) with a CLIP ViT-L/14 ranker (224 px) cannot share yet.
    """
    ours, theirs = captioner.preprocess, filter_.preprocess
    if ours.image_size == theirs.image_size and type(ours) is not type(theirs):
        raise CheckpointError(
            f"the {captioner.family} captioner and the {filter_.family} filter both take {ours.image_size} px "
            f"images but preprocess them differently ({type(ours).__name__} vs {type(theirs).__name__}); "
            "the shard job cannot yet feed them separately")


@dataclass
class Models:
    """CapFilt's two models: separately fine-tuned, as in the paper (sharing them made the filter lenient).

    The captioner is any captioner family and the filter any filter family (``capfilt.families``): ``captioner``
    and ``filter`` have the interfaces of ``Captioner`` and ``Filter``.
    """

    captioner: Captioner
    filter: Filter
    slot: WorkerSlot | None = None  # this worker's slot on a multi-GPU node (capfilt.device.worker_device)

    @classmethod
    def load(cls, settings: BootstrapSettings) -> Models:
        """Both models, on this worker's device; sampling: the family's defaults, the captioner folder's, the run's."""
        sampling = sampling_settings(settings.captioner, settings.captioner_tokenizer, **settings.sampling_overrides)
        device, slot = worker_device(settings.device)
        try:
            captioner = load_captioner(settings.captioner, device=device, tokenizer=settings.captioner_tokenizer,
                                       settings=sampling, precision=settings.precision)
            filter_ = load_filter(settings.filter, device=device, tokenizer=settings.filter_tokenizer,
                                  precision=settings.precision)
            check_shared_input(captioner, filter_)
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
        """Each model's family, reference, where its weights came from (the resolved folder or file), the dtype
        they are held in and the precision it ran at."""
        return {
            role: {"family": model.family, "ref": model.ref, "kind": model.source.kind, "path": str(model.source.path),
                   "weights": str(model.weights).removeprefix("torch."),
                   "precision": precision_name(model.device, model.precision)} if model.source else None
            for role, model in (("captioner", self.captioner), ("filter", self.filter))
        }
