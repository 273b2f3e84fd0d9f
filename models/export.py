"""Export a trained MED as transformers folders: the captioner and the filter (paper §3.3).

- captioner: ``BlipForConditionalGeneration`` = ``vision_model`` + ``text_decoder``;
- filter: ``BlipForImageTextRetrieval`` = ``vision_model`` + ``text_encoder`` +
  ``vision_proj`` + ``text_proj`` + ``itm_head``.

The MED uses transformers' module names, so each is a subset of its state
dict. The folder is ``save_pretrained`` (``config.json`` + ``model.safetensors``;
transformers 5 always writes safetensors) plus the tokenizer's files, and is
checked by loading it back strictly (no missing, unexpected or mis-shaped key).

A captioner folder may carry ``capfilt_sampling.json``, its sampling defaults
(``capfilt.sampling_settings.SamplingSettings``: the demo captioner's captions are
short, ``min_length`` 5). An exported captioner carries the file of the model
its run started from (``--init``: a captioner folder, or a run that has one)
or of its preset (``--model demo``), so the next round of CapFilt samples as
the last one did; the training run keeps a copy at its top, which
``export_run`` finds.

Command line: ``capfilt export captioner|filter RUN_OR_CHECKPOINT OUT_FOLDER`` (or ``python -m
capfilt.models.export ...``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from capfilt.help_format import HelpWithDefaults
from capfilt.sampling_settings import SETTINGS_FILE as SAMPLING_FILE
from capfilt.sampling_settings import SamplingSettings

# torch and transformers are imported where a model is exported: `capfilt export --help` needs neither.
if TYPE_CHECKING:
    from capfilt.models.med import MED

# role -> (the transformers class, by name; the MED's weights it takes; the loss the MED must have trained)
ROLES = {
    "captioner": ("BlipForConditionalGeneration", ("vision_model.", "text_decoder."), "lm"),
    "filter": ("BlipForImageTextRetrieval", ("vision_model.", "text_encoder.", "vision_proj.", "text_proj.",
                                             "itm_head."), "itm"),
}


def find_sampling_file(source: str | Path) -> Path | None:
    """The ``capfilt_sampling.json`` that goes with a model source: in the folder itself (a captioner folder or a
    run), its ``captioner/`` (a fine-tuning run's export), or for a ``checkpoints/step-*`` folder its run's."""
    source = Path(source)
    if not source.is_dir():
        return None
    places = [source, source / "captioner"]
    if source.parent.name == "checkpoints":
        places += [source.parent.parent, source.parent.parent / "captioner"]
    return next((place / SAMPLING_FILE for place in places if (place / SAMPLING_FILE).is_file()), None)


def check_sampling_file(path: str | Path) -> None:
    """An error unless ``path`` holds sampling settings a captioner can load."""
    values = json.loads(Path(path).read_text())
    unknown = set(values) - set(SamplingSettings.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path}: unknown sampling settings {sorted(unknown)}")
    SamplingSettings(**values)


def export(med: MED, tokenizer, role: str, folder: str | Path, sampling: str | Path | None = None) -> Path:
    """Write ``role`` (``captioner`` or ``filter``) of ``med`` to ``folder``; returns the folder.

    ``sampling``: a ``capfilt_sampling.json`` to copy into a captioner's folder (its sampling defaults).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
    if sampling is not None and role != "captioner":
        raise ValueError(f"sampling settings are a captioner's; the {role} has none")
    import transformers
    from transformers import BlipConfig

    from capfilt.checkpoints import load_hf_folder, load_strict

    class_name, prefixes, needs = ROLES[role]
    model_class = getattr(transformers, class_name)
    if not med.has(needs):
        raise ValueError(f"this MED was built for {med.settings.losses}: it has no {role}")
    model = model_class(BlipConfig.from_dict(med.config.to_dict()))
    load_strict(model, {k: v.detach().cpu() for k, v in med.state_dict().items() if k.startswith(prefixes)},
                source=f"the MED's {role}")
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if sampling is not None:
        check_sampling_file(sampling)
        if Path(sampling).resolve() != (folder / SAMPLING_FILE).resolve():
            shutil.copyfile(sampling, folder / SAMPLING_FILE)
    load_hf_folder(model_class, folder)  # strict round trip: raises on any key problem
    return folder


def export_run(source: str | Path, role: str, folder: str | Path) -> Path:
    """Export ``role`` from a capfilt run (or one of its checkpoints); a captioner gets the run's sampling file."""
    from capfilt.models.checkpointing import med_from_run

    med, tokenizer = med_from_run(source)
    return export(med, tokenizer, role, folder, sampling=find_sampling_file(source) if role == "captioner" else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capfilt export", description=__doc__.split("\n")[0],
                                     formatter_class=HelpWithDefaults)
    parser.add_argument("role", choices=sorted(ROLES), help="which model of the MED to export")
    parser.add_argument("source", help="a capfilt training run folder, or one of its checkpoints/step-* folders")
    parser.add_argument("out", help="the folder to write")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        print(export_run(args.source, args.role, args.out))
    except (FileNotFoundError, ValueError) as error:  # capfilt.checkpoints.CheckpointError is a ValueError
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
