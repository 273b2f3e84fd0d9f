"""Which family a model belongs to and which role it can take, read from its config.json and file names only.

A model folder's ``config.json`` names its ``model_type`` and, when transformers saved it, its class
(``architectures``). That decides the family and the roles, before any weight is read:

==================  ======================================  =====================================
family              captioner                               filter
==================  ======================================  =====================================
``blip``            ``BlipForConditionalGeneration``         ``BlipForImageTextRetrieval`` (ITM, ITC)
``blip-2``          ``Blip2ForConditionalGeneration``        ``Blip2ForImageTextRetrieval`` (ITM, ITC)
                    (OPT or Flan-T5 language model)
``instructblip``    ``InstructBlipForConditionalGeneration``  -
``clip``            -                                       ``CLIPModel`` (ITC only)
``siglip``          -                                       ``SiglipModel`` (ITC only)
==================  ======================================  =====================================

An original Salesforce ``.pth`` and ``demo`` are BLIP. A BLIP or BLIP-2 folder whose config names no class takes
either role; strict loading then decides. ``check_role`` is the pre-flight check a job runs for every model at once:
importing this module imports ``capfilt.checkpoints`` (torch, transformers), but nothing reads weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from capfilt.checkpoints import CAPTIONER, FILTER, CheckpointError, ModelSource, resolve
from capfilt.tokenizer import TOKENIZER_FILES

BLIP, BLIP2, INSTRUCTBLIP, CLIP, SIGLIP = "blip", "blip-2", "instructblip", "clip", "siglip"

# config.json's model_type -> family
FAMILY_OF_MODEL_TYPE = {"blip": BLIP, "blip-2": BLIP2, "instructblip": INSTRUCTBLIP, "clip": CLIP, "siglip": SIGLIP}
# the transformers class each (family, role) loads as
CLASSES = {
    (BLIP, CAPTIONER): "BlipForConditionalGeneration",
    (BLIP, FILTER): "BlipForImageTextRetrieval",
    (BLIP2, CAPTIONER): "Blip2ForConditionalGeneration",
    (BLIP2, FILTER): "Blip2ForImageTextRetrieval",
    (INSTRUCTBLIP, CAPTIONER): "InstructBlipForConditionalGeneration",
    (CLIP, FILTER): "CLIPModel",
    (SIGLIP, FILTER): "SiglipModel",
}
ITC_ONLY = (CLIP, SIGLIP)  # filters without an ITM head: they judge by their image-text similarity
NAMES = {BLIP: "BLIP", BLIP2: "BLIP-2", INSTRUCTBLIP: "InstructBLIP", CLIP: "CLIP", SIGLIP: "SigLIP"}
ACCEPTS = {
    CAPTIONER: "a BLIP captioner (BlipForConditionalGeneration, an original .pth or demo), BLIP-2 with OPT or Flan-T5 "
               "(Blip2ForConditionalGeneration) or InstructBLIP (InstructBlipForConditionalGeneration)",
    FILTER: "a BLIP ITM filter (BlipForImageTextRetrieval, an original .pth or demo), BLIP-2's Q-Former "
            "(Blip2ForImageTextRetrieval), CLIP (CLIPModel) or SigLIP (SiglipModel)",
}
# What a tokenizer folder holds: BLIP's files (capfilt.tokenizer), or a sentencepiece/BPE model's
LM_TOKENIZER_FILES = (*TOKENIZER_FILES, "spiece.model", "vocab.json", "sentencepiece.bpe.model")
QFORMER_TOKENIZER = "qformer_tokenizer"  # InstructBlipProcessor.save_pretrained's folder for the Q-Former's tokenizer


@dataclass(frozen=True)
class ModelKind:
    """A model's family and the transformers class its config names (None when it names none)."""

    family: str
    architecture: str | None

    def roles(self) -> tuple[str, ...]:
        """The roles this model can take."""
        roles = tuple(role for role in (CAPTIONER, FILTER) if (self.family, role) in CLASSES)
        if self.architecture is None:
            return roles
        return tuple(role for role in roles if CLASSES[self.family, role] == self.architecture)


def read_config(source: ModelSource) -> dict:
    """The folder's config.json as a dict; a clear error when it is not JSON."""
    path = source.path / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def model_kind(source: ModelSource, ref: str | Path | None = None, role: str | None = None) -> ModelKind:
    """The family of the model at ``source`` (``.pth`` files are BLIP); an error for a family capfilt cannot use."""
    if source.kind == "pth":
        return ModelKind(BLIP, None)
    config = read_config(source)
    model_type = config.get("model_type")
    family = FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        where = f"{role} {str(ref)!r}" if role else str(source.path)
        accepts = f"the {role} accepts {ACCEPTS[role]}" if role else f"capfilt takes {', '.join(NAMES.values())}"
        raise CheckpointError(f"{where} is a {model_type!r} model (config.json's model_type), which capfilt cannot "
                              f"use; {accepts}")
    known = {CLASSES[key] for key in CLASSES if key[0] == family}
    architectures = [name for name in config.get("architectures") or [] if name in known]
    return ModelKind(family, architectures[0] if architectures else None)


def _describe(kind: ModelKind) -> str:
    roles = kind.roles()
    what = f"{NAMES[kind.family]} model"
    if kind.architecture:
        what += f" ({kind.architecture})"
    use = " or ".join(roles)
    return f"a {what}, which capfilt takes as a {use}" if roles else f"a {what}"


def _has_tokenizer(folder: Path, names: tuple[str, ...] = LM_TOKENIZER_FILES) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in names)


def check_role(ref: str | Path, role: str, tokenizer: str | Path | None = None) -> None:
    """Refuse, with one line, a model that does not exist, cannot take ``role`` or has no tokenizer.

    ``role``: ``checkpoints.CAPTIONER`` or ``FILTER``; ``tokenizer``: the tokenizer given for it, if any (a
    folder, or BLIP's ``vocab.txt``). Reads config.json and file names only.
    """
    if role not in ACCEPTS:
        raise ValueError(f"role must be {CAPTIONER!r} or {FILTER!r}, not {role!r}")
    source = resolve(ref, role)  # a missing folder, file or cached hub id: its own one-line error
    kind = model_kind(source, ref, role)
    if role not in kind.roles():
        raise CheckpointError(f"{role} {str(ref)!r} is {_describe(kind)}; the {role} accepts {ACCEPTS[role]}")
    flag = f"--{role}-tokenizer"
    names = TOKENIZER_FILES if kind.family == BLIP else LM_TOKENIZER_FILES  # BLIP reads BERT's WordPiece files
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        if not (path.is_file() or _has_tokenizer(path, names)):
            raise CheckpointError(f"no tokenizer at {path} ({flag}): expected a folder with one of "
                                  f"{', '.join(names)}, or BLIP's vocab.txt")
        return
    folder = source.path.parent if source.kind == "pth" else source.path
    if not _has_tokenizer(folder, names):
        what = "the .pth file's folder" if source.kind == "pth" else "the model folder"
        raise CheckpointError(f"{role} {str(ref)!r} has no tokenizer: {what} {folder} holds none of "
                              f"{', '.join(names)}; pass {flag} PATH")
    if kind.family == INSTRUCTBLIP and not _has_tokenizer(source.path / QFORMER_TOKENIZER):
        raise CheckpointError(f"{role} {str(ref)!r} has no Q-Former tokenizer: InstructBLIP reads its instruction "
                              f"with the one in {source.path / QFORMER_TOKENIZER}, which holds none of "
                              f"{', '.join(LM_TOKENIZER_FILES)}")


def family_for(ref: str | Path, role: str, tokenizer: str | Path | None = None) -> str:
    """The family of the model at ``ref``, checked to take ``role`` (``check_role``'s one-line errors).

    A BLIP model is left to BLIP's loader, whose errors (a tokenizer beside a ``.pth``, ...) are as they were.
    """
    kind = model_kind(resolve(ref, role), ref, role)
    if kind.family != BLIP or role not in kind.roles():
        check_role(ref, role, tokenizer)
    return kind.family


def judged_by(family: str) -> str:
    """The score a filter of ``family`` judges by unless told otherwise: ``itm``, or ``itc`` without an ITM head."""
    return "itc" if family in ITC_ONLY else "itm"
