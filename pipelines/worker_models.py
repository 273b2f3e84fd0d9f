"""The captioner and the filter of one worker, loaded together, once: any captioner family with any filter."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from capfilt.captioner import Captioner
from capfilt.checkpoints import CheckpointError
from capfilt.device import WorkerSlot, precision_name, worker_device
from capfilt.families import load_captioner, load_filter, sampling_settings
from capfilt.filter import Filter
from capfilt.pipelines.selection import BY_ITM
from capfilt.pipelines.settings import AUTO_FAMILY, BootstrapSettings


def check_models(settings: BootstrapSettings, captioner, filter_) -> None:
    """Refuse models that are not of the families the run was set up for, or a filter that cannot give the score
    the run judges by (a CLIP or SigLIP ranker has no ITM head)."""
    for role, model, family in (("captioner", captioner, settings.captioner_family),
                                ("filter", filter_, settings.filter_family)):
        if family != AUTO_FAMILY and model.family != family:
            raise CheckpointError(
                f"the {role} {model.ref!r} is a {model.family} model, but this run was set up for a {family} "
                f"{role} ({role}_family): the model changed since the job started; start it again")
    if settings.by == BY_ITM and filter_.judged_by != BY_ITM:
        raise CheckpointError(
            f"the filter {filter_.ref!r} ({filter_.family}) has no ITM head, so it cannot judge by ITM: judge by its "
            "similarity (by itc: --by itc --threshold T, a cosine in [-1, 1], or --select top-N)")


@dataclass
class Models:
    """CapFilt's two models: separately fine-tuned, as in the paper (sharing them made the filter lenient).

    The captioner is any captioner family and the filter any filter family (``capfilt.families``): ``captioner``
    and ``filter`` have the interfaces of ``Captioner`` and ``Filter``. Each gets its own pixels, however the two
    preprocess (``capfilt.images.ImagePreprocessor.key``).
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
            check_models(settings, captioner, filter_)
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
