"""Training throughput and peak memory of MED pre-training (ITC + ITM + LM) on CPU.

    python bench/bench_train.py                      # tiny and base, CPU
    python bench/bench_train.py --configs tiny --steps 40 --batch 16

Each configuration runs in a child process (so that its peak RSS is its own)
through the real entry point, ``capfilt.models.train.train``: synthetic
random-noise JPEGs in a capfilt-layout Parquet file, read, decoded and
augmented as in training. The base model gets a 30524-id vocabulary (BERT's
size, filler words) so that its embeddings and LM head are full size.
Samples/s is measured over the steps after the first (warm-up) one; peak
memory is ``ru_maxrss`` of the child.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULTS = {  # config: (image size, global batch, steps)
    "tiny": (32, 16, 30),
    "base": (224, 4, 4),
}


def _write_data(folder: Path, image_size: int, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(rows):
        buffer = io.BytesIO()
        side = image_size + 32
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    texts = [" ".join(rng.choice(["a", "red", "small", "dog", "on", "the", "left", "square"], 12)) for _ in range(rows)]
    pq.write_table(pa.table({"image": images, "text": texts, "key": [str(i) for i in range(rows)]}),
                   folder / "bench.parquet", row_group_size=64)


def _tokenizer(folder: Path, full_size: bool):
    from capfilt.configs import BERT_VOCAB_SIZE
    from capfilt.vocab import compact_tokenizer, wordpiece_vocab

    words = "a red small dog on the left square".split()
    if full_size:  # pad with filler words up to bert-base-uncased's 30522 ids
        words += [f"filler{i}" for i in range(BERT_VOCAB_SIZE - len(wordpiece_vocab(words)))]
    return compact_tokenizer(words, folder)


def child(name: str, image_size: int, batch: int, steps: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from capfilt.models.train import configure, train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _write_data(tmp, image_size, batch * (steps + 1))
        _tokenizer(tmp / "tokenizer", full_size=name != "tiny")
        config = configure("pretrain", data=[str(tmp / "bench.parquet")], out=str(tmp / "run"), model=name,
                           image_size=image_size, tokenizer=str(tmp / "tokenizer"), batch_size=batch,
                           queue_size=batch * 4, max_steps=steps, log_every=1, checkpoint_every=0, device="cpu",
                           workers=2)
        started = time.perf_counter()
        train(config)
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    timed = records[1:]
    seconds = sum(1 / r["steps_per_s"] for r in timed)
    return {"config": name, "image_size": image_size, "global_batch": batch, "steps": steps,
            "samples_per_s": round(len(timed) * batch / seconds, 2), "seconds_per_step": round(seconds / len(timed), 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "torch_threads": torch.get_num_threads(), "wall_s": round(wall, 1),
            "final_losses": {k: round(v, 3) for k, v in records[-1].items() if k.startswith("loss_")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    parser.add_argument("--steps", type=int, help="steps per config (default: tiny 30, base 4)")
    parser.add_argument("--batch", type=int, help="global batch (default: tiny 16, base 4)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, batch, steps = DEFAULTS[args.child]
        print(json.dumps(child(args.child, size, args.batch or batch, args.steps or steps, args.threads)))
        return
    import torch

    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, torch {torch.__version__}, CPU only, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    for name in args.configs:
        command = [sys.executable, __file__, "--child", name]
        command += ["--steps", str(args.steps)] if args.steps else []
        command += ["--batch", str(args.batch)] if args.batch else []
        command += ["--threads", str(args.threads)] if args.threads else []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode:
            sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
        print(json.dumps(json.loads(result.stdout.strip().splitlines()[-1])))


if __name__ == "__main__":
    main()
