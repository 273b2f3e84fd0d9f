"""Export a trained MED as transformers folders: the captioner and the filter (paper §3.3).

- captioner: ``BlipForConditionalGeneration`` = ``vision_model`` + ``text_decoder``;
- filter: ``BlipForImageTextRetrieval`` = ``vision_model`` + ``text_encoder`` +
  ``vision_proj`` + ``text_proj`` + ``itm_head``.

The MED uses transformers' module names, so each is a subset of its state
dict. The folder is ``save_pretrained`` (``config.json`` + ``model.safetensors``;
transformers 5 always writes safetensors) plus the tokenizer's files, and is
checked by loading it back strictly (no missing, unexpected or mis-shaped key).

Command line: ``python -m capfilt.models.export captioner|filter RUN_OR_CHECKPOINT OUT_FOLDER``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.checkpoints import CheckpointError, load_hf_folder, load_strict
from capfilt.models.med import MED

ROLES = {
    "captioner": (BlipForConditionalGeneration, ("vision_model.", "text_decoder."), "lm"),
    "filter": (BlipForImageTextRetrieval, ("vision_model.", "text_encoder.", "vision_proj.", "text_proj.",
                                           "itm_head."), "itm"),
}


def export(med: MED, tokenizer, role: str, folder: str | Path) -> Path:
    """Write ``role`` (``captioner`` or ``filter``) of ``med`` to ``folder``; returns the folder."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
    model_class, prefixes, needs = ROLES[role]
    if not med.has(needs):
        raise ValueError(f"this MED was built for {med.settings.losses}: it has no {role}")
    model = model_class(BlipConfig.from_dict(med.config.to_dict()))
    load_strict(model, {k: v.detach().cpu() for k, v in med.state_dict().items() if k.startswith(prefixes)},
                source=f"the MED's {role}")
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    load_hf_folder(model_class, folder)  # strict round trip: raises on any key problem
    return folder


def export_run(source: str | Path, role: str, folder: str | Path) -> Path:
    """Export ``role`` from a capfilt run (or one of its checkpoints)."""
    from capfilt.models.train import med_from_run

    med, tokenizer = med_from_run(source)
    return export(med, tokenizer, role, folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m capfilt.models.export", description=__doc__.split("\n")[0])
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("source", help="a capfilt training run folder, or one of its checkpoints/step-* folders")
    parser.add_argument("out", help="the folder to write")
    args = parser.parse_args(argv)
    try:
        print(export_run(args.source, args.role, args.out))
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
