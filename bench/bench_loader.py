"""Images/s that the training loader (``capfilt.models.data.EpochLoader``) delivers, threads vs processes.

    python bench/bench_loader.py                         # renders 8 shards of the shapes world's human split
    python bench/bench_loader.py --data runs/demo/data/human --workers 2 8 --batch 64 256

The loader reads, decodes and normalises images and tokenizes captions as in
training (no augmentation: the demo recipe's setting), and the numbers count
only batches after the first (so the process pool's start is left out). The
trainer is not run: this is the most a training step can be fed.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def measure(files: list[str], tokenizer, batch: int, workers: int, processes: bool, batches: int,
            streams: int) -> float:
    from capfilt.models.augment import AugmentConfig
    from capfilt.models.data import DataConfig, EpochLoader, close_decoding_processes

    config = DataConfig(batch_size=batch, workers=workers, worker_processes=processes, max_tokens=32)
    loader = EpochLoader(files, config, tokenizer, 64, AugmentConfig(augment=False), seed=0, epoch=0,
                         streams=streams, rank=0, world_size=1)
    try:
        iterator = iter(loader)
        next(iterator)
        start, images = time.perf_counter(), 0
        for _, item in zip(range(batches), iterator):
            images += item.pixel_values.shape[0]
        return images / (time.perf_counter() - start)
    finally:
        loader.close()
        close_decoding_processes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="a folder of shards (default: render 8 x 2,500 human pairs)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    parser.add_argument("--streams", type=int, default=8)
    args = parser.parse_args()
    from capfilt.models.data import find_files
    from capfilt.shapes import VOCABULARY, write_split
    from capfilt.vocab import compact_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not data:
            data = str(Path(tmp) / "human")
            write_split("human", 20_000, 11, data, shard_size=2_500, processes=os.cpu_count() or 1)
        tokenizer = compact_tokenizer([*VOCABULARY, "picture"], Path(tmp) / "tokenizer")
        files = find_files([data])
        print(f"# {platform.machine()}, {os.cpu_count()} CPUs, {len(files)} files")
        print("| batch | workers | threads (images/s) | processes (images/s) |")
        print("| --- | --- | --- | --- |")
        for batch in args.batch:
            for workers in args.workers:
                rates = [measure(files, tokenizer, batch, workers, processes, args.batches, args.streams)
                         for processes in (False, True)]
                print(f"| {batch} | {workers} | {rates[0]:.0f} | {rates[1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
