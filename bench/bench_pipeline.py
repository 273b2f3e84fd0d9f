"""Throughput of the CapFilt pipeline on tiny random-weight models: images per second.

Measures the whole Beam job (DirectRunner: listing, model loading, decode,
caption, filter, Parquet writing, commit, stats and report) and, for
comparison, the same shards processed in a plain loop without Beam. Tiny
models make this a measure of the pipeline's own overhead, not of BLIP.

    HF_HUB_OFFLINE=1 nice python bench/bench_pipeline.py --images 512 --shards 4
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.configs import preset_config
from capfilt.pipelines import bootstrap
from capfilt.pipelines.layout import OutputLayout
from capfilt.pipelines.worker_models import Models
from capfilt.pipelines.process import process_shard
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import list_shards
from capfilt.vocab import compact_tokenizer

WORDS = "a picture of the small large red green blue circle square triangle left right above below".split()


def tiny_models(folder: Path) -> tuple[str, str]:
    tokenizer = compact_tokenizer(WORDS, folder / "tokenizer")
    config = preset_config("tiny", tokenizer=tokenizer)
    paths = []
    for seed, model_class, name in ((0, BlipForConditionalGeneration, "captioner"),
                                    (1, BlipForImageTextRetrieval, "filter")):
        torch.manual_seed(seed)
        model_class(config).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        paths.append(str(folder / name))
    return paths[0], paths[1]


def write_shards(folder: Path, images: int, shards: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    per_shard = -(-images // shards)
    for shard in range(shards):
        rows = []
        for i in range(shard * per_shard, min(images, (shard + 1) * per_shard)):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            rows.append({"key": f"{i:09d}", "url": f"http://bench/{i}.jpg", "caption": "a small red circle",
                         "jpg": buffer.getvalue(), "status": "success", "error_message": None})
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64, help="px; the tiny models see 32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("-k", "--num-captions", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--runner", default="DirectRunner")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="capfilt-bench-"))
    try:
        captioner, filter_ = tiny_models(work / "models")
        write_shards(work / "input", args.images, args.shards, args.image_size)
        shards = list_shards(work / "input")
        settings = BootstrapSettings(captioner=captioner, filter=filter_, batch_size=args.batch_size,
                                     num_captions=args.num_captions, torch_threads=args.torch_threads)

        start = time.perf_counter()
        bootstrap.run(shards, settings, str(work / "beam"), runner=args.runner)
        beam_seconds = time.perf_counter() - start

        torch.set_num_threads(args.torch_threads)
        start = time.perf_counter()
        models = Models.load(settings)
        layout = OutputLayout(str(work / "loop"))
        for shard in shards:
            process_shard(shard, models, settings, layout)
        loop_seconds = time.perf_counter() - start

        print(json.dumps({
            "images": args.images, "shards": args.shards, "batch_size": args.batch_size, "k": args.num_captions,
            "torch_threads": args.torch_threads, "runner": args.runner,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "beam_seconds": round(beam_seconds, 2), "beam_images_per_s": round(args.images / beam_seconds, 1),
            "loop_seconds": round(loop_seconds, 2), "loop_images_per_s": round(args.images / loop_seconds, 1),
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
