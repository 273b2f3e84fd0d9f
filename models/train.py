"""Training the MED: pre-training (ITC+ITM+LM), captioner fine-tuning (LM), filter fine-tuning (ITC+ITM).

One loop for the three tasks of CapFilt (paper §3.3, ``capfilt.models.loop``); what differs is the
configuration (``capfilt.models.config``), whose values are BLIP's (paper §4.1 and the original
``configs/*.yaml``). From Python::

    config = configure("pretrain", data=["web/*.parquet"], out="runs/pt", model="base", tokenizer="bert/")
    train(config)

From the shell (any field of the configuration is a ``--flag``; ``--model NAME`` picks a preset, which sets the
model's shape and the settings that go with it, see ``capfilt.models.presets`` and ``--help``)::

    capfilt train pretrain --data 'web/*.parquet' --out runs/pt --tokenizer bert/
    capfilt train pretrain --model demo --data out/bootstrap/kept --out runs/demo-pt
    torchrun --nproc_per_node 8 -m capfilt.models.train finetune-captioner --data 'coco/*.parquet' \\
        --out runs/cap --init runs/pt --tokenizer runs/pt/tokenizer

A run folder holds ``tokenizer/``, ``log.jsonl`` (one line per logged step),
``checkpoints/step-*`` and, after fine-tuning, the exported ``captioner/`` or
``filter/`` folder. Running the same command again resumes from the newest
checkpoint. SIGINT (Ctrl-C) or SIGTERM stops a run after the step in progress with
a checkpoint of it, one line saying so, and the shell's status (130, 143).
``capfilt train ...`` is this command line (``main``; ``python -m
capfilt.models.train`` and torchrun's ``-m capfilt.models.train`` run the same).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from capfilt.help_format import HelpWithDefaults
from capfilt.models.config import TASKS
from capfilt.models.configure import SETTINGS, configure
from capfilt.models.flag_help import epilog, setting_help

FLAG_TYPES = {"int": int, "float": float, "str": str}  # a field's annotation -> what its flag parses
EXIT_SIGINT = 130  # the shell's status for SIGINT (128 + 2), also where SIGINT comes outside the training steps


class _Help(HelpWithDefaults, argparse.RawDescriptionHelpFormatter):
    """Defaults shown as every command shows them; the presets' section and the epilog kept as written."""


def _parser() -> argparse.ArgumentParser:
    """The command line: the task, --print-config, and one flag per setting, its help from the field."""
    parser = argparse.ArgumentParser(
        prog="capfilt train", description="Pre-train the MED or fine-tune the captioner / filter. SIGINT (Ctrl-C) "
        "or SIGTERM stops a run after the step in progress, with a checkpoint of it; rerun to resume.",
        formatter_class=_Help, epilog=epilog())
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    for name, (_, item) in SETTINGS.items():
        if name == "task":
            continue
        flag, text = "--" + name.replace("_", "-"), setting_help(name)
        if item.type == "bool":
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif item.type.startswith("tuple"):
            parser.add_argument(flag, dest=name, nargs="+", default=None, help=text)
        else:
            parser.add_argument(flag, dest=name, type=FLAG_TYPES[item.type], default=None, help=text,
                                **({"metavar": "NAME_OR_CONFIG"} if name == "model" else {}))
    return parser


def main(argv: list[str] | None = None) -> None:
    """``capfilt train TASK [--flags]`` and ``python -m capfilt.models.train TASK [--flags]``."""
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("task", "print_config")}
    config = configure(args.task, **overrides)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(config), indent=2))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    main_rank = os.environ.get("RANK", "0") == "0"
    if not main_rank:  # one process reports progress
        logging.getLogger().setLevel(logging.WARNING)
    # Imported here, not at the top: what --help and --print-config need stays small.
    from capfilt.models.loop import TrainingStopped, train

    try:
        train(config)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    except TrainingStopped as stopped:
        if main_rank:
            print(f"capfilt train: {stopped}", file=sys.stderr)
        sys.exit(stopped.status)
    except KeyboardInterrupt:  # SIGINT outside the steps (starting, exporting): nothing half-trained to save
        if main_rank:
            print("capfilt train: stopped by SIGINT outside the training steps; the checkpoints in --out are kept; "
                  "rerun the same command to resume", file=sys.stderr)
        sys.exit(EXIT_SIGINT)


if __name__ == "__main__":
    main()
