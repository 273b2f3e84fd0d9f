"""Peak memory of ``capfilt bootstrap`` on huge images: it must not grow with the images' pixel count.

Writes one img2dataset-style Parquet shard of ``--images`` valid PNGs of ``--side`` x ``--side`` pixels
(smooth colour fields: 36 Mpx each at 6000, under the 50 Mpx cap) and runs ``capfilt bootstrap`` on it with
the demo models in a child process; prints that process's peak RSS and wall time. The same with small
images shows what the models and Beam cost by themselves.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_memory.py --images 32 --side 6000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def write_shard(path: Path, images: int, side: int) -> int:
    """One shard of PNGs; returns its size in bytes."""
    rng = np.random.default_rng(0)
    writer = None
    for i in range(images):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        coarse.resize((side, side), Image.BILINEAR).save(buffer, format="PNG", compress_level=1)
        row = {"key": f"{i:09d}", "url": f"http://127.0.0.1/{i}.png", "caption": "a large red circle",
               "png": buffer.getvalue(), "status": "success", "error_message": None}
        table = pa.Table.from_pylist([row])
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)  # a row group per image, as img2dataset writes big rows
    writer.close()
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--side", type=int, default=6000, help="pixels per side")
    parser.add_argument("--decode-threads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="capfilt-bench-memory-"))
    try:
        (work / "shards").mkdir()
        size = write_shard(work / "shards" / "00000.parquet", args.images, args.side)
        command = [sys.executable, "-m", "capfilt.cli", "bootstrap", "--data", str(work / "shards" / "00000.parquet"),
                   "--out", str(work / "out"), "--captioner", "demo", "--filter", "demo", "--no-report",
                   "--batch-size", str(args.batch_size), "--decode-threads", str(args.decode_threads)]
        start = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KiB on Linux
        stats = json.loads((work / "out" / "stats.json").read_text())
        print(json.dumps({"images": args.images, "side": args.side, "shard_mb": round(size / 1e6, 1),
                          "decode_threads": args.decode_threads, "batch_size": args.batch_size,
                          "judged": stats["images"], "failed": stats["failed"],
                          "peak_rss_gb": round(peak_gb, 2), "seconds": round(seconds, 1)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
