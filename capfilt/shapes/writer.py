"""Writing a split as img2dataset-style Parquet shards, and reading it back.

A split folder holds ``00000.parquet``, ``00001.parquet``, … and a
``00000_stats.json`` per shard, as img2dataset's Parquet writer lays them
out. Each row has img2dataset's columns (``key``, the image bytes under the
encode format's name, ``caption``, ``url``, ``width``, ``height``,
``status``, ``error_message``) and the ground truth: ``kind`` (clean /
mismatch / partial / alt) and ``scene`` (the scene as JSON), so that texts
and synthetic captions can be scored later. Written with ``negatives``, a
split also has two columns of hard negatives (``capfilt.shapes.negatives``),
null where a row has none, which the trainer's ``negatives`` setting feeds to
ITM: ``negative_caption``, the scene's caption with its words swapped or its
relation changed, and ``replaced_caption``, with one word replaced.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.shapes.negatives import negative_caption, replaced_caption
from capfilt.shapes.render import IMAGE_FORMATS
from capfilt.shapes.scene import Scene, scene_from_json, scene_to_json
from capfilt.shapes.splits import WorldConfig, make_sample
from capfilt.shapes.world import IMAGE_SIZE

SHARD_DIGITS = 5  # 00000.parquet, as img2dataset names shards
MIN_SAMPLE_DIGITS = 4  # key = shard id + index in shard, e.g. "000000012"
DEFAULT_SHARD_SIZE = 1000
NEGATIVE_COLUMN = "negative_caption"
REPLACED_COLUMN = "replaced_caption"
NEGATIVE_COLUMNS = (NEGATIVE_COLUMN, REPLACED_COLUMN)
NEGATIVE_STREAM = 4  # the negatives' random stream, apart from a sample's scene, render and text streams
REPLACED_STREAM = 5  # the replaced-word negatives' stream


def shard_schema(image_format: str = "jpg", negatives: bool = False) -> pa.Schema:
    """img2dataset's Parquet columns, the image column named after its format, plus the ground truth."""
    return pa.schema(
        [
            ("key", pa.string()),
            (image_format, pa.binary()),
            ("caption", pa.string()),
            ("url", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("status", pa.string()),
            ("error_message", pa.string()),
            ("kind", pa.string()),
            ("scene", pa.string()),
        ]
        + ([(column, pa.string()) for column in NEGATIVE_COLUMNS] if negatives else [])
    )


def sample_digits(shard_size: int) -> int:
    """Digits of the in-shard part of a key."""
    return max(MIN_SAMPLE_DIGITS, math.ceil(math.log10(max(shard_size, 2))))


def shard_key(shard: int, position: int, shard_size: int) -> str:
    """img2dataset's key: the zero-padded shard id, then the zero-padded position in the shard."""
    return f"{shard:0{SHARD_DIGITS}d}{position:0{sample_digits(shard_size)}d}"


def negative_rng(split: str, seed: int, index: int, stream: int = NEGATIVE_STREAM) -> np.random.Generator:
    """The random stream of sample ``index``'s hard negative (the same whatever the shard size)."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, stream])


def write_shard(
    out: str | Path, split: str, seed: int, shard: int, n: int, shard_size: int, config: WorldConfig = WorldConfig(),
    negatives: bool = False,
) -> dict:
    """Write shard ``shard`` of a split of ``n`` samples and its stats; return the stats."""
    out = Path(out)
    image_format = _single_format(config)
    start, stop = shard * shard_size, min(n, (shard + 1) * shard_size)
    schema = shard_schema(image_format, negatives)
    rows = {name: [] for name in schema.names}
    for index in range(start, stop):
        sample = make_sample(split, seed, index, config)
        key = shard_key(shard, index - start, shard_size)
        rows["key"].append(key)
        rows[image_format].append(sample.image_bytes)
        rows["caption"].append(sample.text)
        rows["url"].append(f"shapes://{split}/{key}")
        rows["width"].append(IMAGE_SIZE)
        rows["height"].append(IMAGE_SIZE)
        rows["status"].append("success")
        rows["error_message"].append(None)
        rows["kind"].append(sample.kind)
        rows["scene"].append(scene_to_json(sample.scene))
        if negatives:
            rows[NEGATIVE_COLUMN].append(negative_caption(sample.scene, negative_rng(split, seed, index)))
            rows[REPLACED_COLUMN].append(replaced_caption(sample.scene, negative_rng(split, seed, index,
                                                                                     REPLACED_STREAM)))
    name = f"{shard:0{SHARD_DIGITS}d}"
    table = pa.table(rows, schema=schema)
    partial = out / f"{name}.parquet.tmp"
    pq.write_table(table, partial)
    os.replace(partial, out / f"{name}.parquet")
    count = stop - start
    stats = {
        "count": count,
        "successes": count,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "status_dict": {"success": count},
        "split": split,
        "seed": seed,
        "kinds": dict(sorted(Counter(rows["kind"]).items())),
    }
    (out / f"{name}_stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


def write_split(
    split: str,
    n: int,
    seed: int,
    out: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    config: WorldConfig = WorldConfig(),
    processes: int = 1,
    overwrite: bool = False,
    negatives: bool = False,
) -> list[Path]:
    """Write ``n`` samples of a split into ``out`` as Parquet shards; return the shard paths.

    Shards are independent, so ``processes`` > 1 writes them in parallel with
    the same bytes. An ``out`` that already holds shards is an error unless
    ``overwrite``, which first removes them (no stale shard of a bigger run survives).
    ``negatives`` adds the hard negatives' columns (see the module's docstring).
    """
    if n < 0 or shard_size < 1:
        raise ValueError(f"need n >= 0 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    _single_format(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.parquet")) + sorted(out.glob("*_stats.json"))
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({existing[0].name}, …); pass overwrite=True")
    for path in existing:
        path.unlink()
    shards = range(math.ceil(n / shard_size))
    jobs = [(out, split, seed, shard, n, shard_size, config, negatives) for shard in shards]
    if processes > 1 and len(jobs) > 1:
        # spawn: workers start clean, whatever threads (torch, BLAS) the caller runs
        with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_write_shard_job, jobs))
    else:
        for job in jobs:
            write_shard(*job)
    return [out / f"{shard:0{SHARD_DIGITS}d}.parquet" for shard in shards]


def read_split(folder: str | Path) -> Iterator[dict]:
    """Rows of a written split, in shard order: the Parquet columns, with ``scene`` parsed to a Scene."""
    for path in sorted(Path(folder).glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            scene: Scene = scene_from_json(row["scene"])
            yield {**row, "scene": scene}


def _write_shard_job(job: tuple) -> dict:
    return write_shard(*job)


def _single_format(config: WorldConfig) -> str:
    formats = config.render.image_formats
    if len(formats) != 1 or formats[0] not in IMAGE_FORMATS:
        raise ValueError(f"a written split needs one image format among {IMAGE_FORMATS}, got {formats}")
    return formats[0]
