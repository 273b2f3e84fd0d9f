"""Training the MED: pre-training (ITC+ITM+LM), captioner fine-tuning (LM), filter fine-tuning (ITC+ITM).

One loop for the three tasks of CapFilt (paper §3.3, ``capfilt.models.loop``); what differs is the
configuration (``capfilt.models.config``), whose values are BLIP's (paper §4.1 and the original
``configs/*.yaml``). From Python::

    config = configure("pretrain", data=["web/*.parquet"], out="runs/pt", model="base", tokenizer="bert/")
    train(config)

From the shell (any field of the configuration is a ``--flag``; ``--model NAME`` picks a preset, which sets the
model's shape and the settings that go with it, see ``capfilt.models.presets`` and ``--help``)::

    python -m capfilt.models.train pretrain --data 'web/*.parquet' --out runs/pt --tokenizer bert/
    python -m capfilt.models.train pretrain --model demo --data out/bootstrap/kept --out runs/demo-pt
    torchrun --nproc_per_node 8 -m capfilt.models.train finetune-captioner --data 'coco/*.parquet' \\
        --out runs/cap --init runs/pt --tokenizer runs/pt/tokenizer

A run folder holds ``tokenizer/``, ``log.jsonl`` (one line per logged step),
``checkpoints/step-*`` and, after fine-tuning, the exported ``captioner/`` or
``filter/`` folder. Running the same command again resumes from the newest
checkpoint. ``capfilt train ...`` is this command line (``main``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from capfilt.models.checkpointing import config_dict
from capfilt.models.config import TASKS
from capfilt.models.configure import SETTINGS, configure
from capfilt.models.flag_help import epilog, setting_help
from capfilt.models.loop import train

FLAG_TYPES = {"int": int, "float": float, "str": str}  # a field's annotation -> what its flag parses


def _parser() -> argparse.ArgumentParser:
    """The command line: the task, --print-config, and one flag per setting, its help from the field."""
    parser = argparse.ArgumentParser(
        prog="python -m capfilt.models.train", description="Pre-train the MED or fine-tune the captioner / filter.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog())
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
    """``python -m capfilt.models.train TASK [--flags]`` and ``capfilt train TASK [--flags]``."""
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("task", "print_config")}
    config = configure(args.task, **overrides)
    if args.print_config:
        print(json.dumps(config_dict(config), indent=2))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if os.environ.get("RANK", "0") != "0":  # one process reports progress
        logging.getLogger().setLevel(logging.WARNING)
    try:
        train(config)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
