"""``capfilt shapes`` (or ``python -m capfilt.shapes``): write a split as Parquet shards, or print the world's
vocabulary."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from capfilt.help_format import HelpWithDefaults
from capfilt.shapes.captions import VOCABULARY
from capfilt.shapes.render import IMAGE_FORMATS, RenderConfig
from capfilt.shapes.writer import DEFAULT_SHARD_SIZE, write_split
from capfilt.shapes.splits import SPLITS, WorldConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capfilt shapes", formatter_class=HelpWithDefaults,
                                     description="Write a shapes-world split as Parquet shards, or print the world's "
                                                 "vocabulary (offline: every image is rendered).")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write a split as img2dataset-style Parquet shards",
                                description="Write a split as img2dataset-style Parquet shards.",
                                formatter_class=HelpWithDefaults)
    write.add_argument("--split", choices=SPLITS, required=True)
    write.add_argument("--n", type=int, required=True, help="number of image-text pairs")
    write.add_argument("--seed", type=int, default=0, help="seed of the split's scenes and texts")
    write.add_argument("--out", required=True, help="output folder")
    write.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="pairs per shard")
    write.add_argument("--format", choices=IMAGE_FORMATS, default="jpg", help="image encoding (and column name)")
    write.add_argument("--processes", type=int, default=1, help="rendering processes")
    write.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    write.add_argument("--negatives", action="store_true",
                       help="add the hard negatives' columns, negative_caption and replaced_caption "
                            "(capfilt.shapes.negatives)")
    commands.add_parser("vocab", help="print the world's caption words, one a line",
                        description="Print the world's caption words, one a line.", formatter_class=HelpWithDefaults)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "vocab":
        print("\n".join(VOCABULARY))
        return 0
    config = WorldConfig(render=RenderConfig(image_formats=(args.format,)))
    try:
        paths = write_split(
            args.split, args.n, args.seed, args.out, args.shard_size, config, args.processes, args.overwrite,
            negatives=args.negatives,
        )
    except FileExistsError:  # the writer's message names its Python argument; this command's is a flag
        parser.exit(2, f"capfilt shapes write: error: {args.out} already holds shards; pass --overwrite to replace "
                       "them, or write to another --out\n")
    except ValueError as error:
        parser.exit(2, f"capfilt shapes write: error: {error}\n")
    kinds: Counter = Counter()
    for path in paths:
        stats = json.loads(path.with_name(path.stem + "_stats.json").read_text(encoding="utf-8"))
        kinds.update(stats["kinds"])
    print(f"wrote {args.n} {args.split} pairs (seed {args.seed}) in {len(paths)} shards to {args.out}: {dict(kinds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
