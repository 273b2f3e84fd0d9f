"""``capfilt export-dataset``: CapFilt's kept/ as webdataset tar shards, for open_clip and other webdataset loaders.

Each kept row becomes one sample, three tar members named by its sample_id (made safe for webdataset, below):

- ``{sample_id}.jpg`` (``.png``, ``.webp``: the kept file's image column's name): the image bytes, as the input
  had them;
- ``{sample_id}.txt``: ``caption``, the kept text (UTF-8);
- ``{sample_id}.json``: every other column but the image, ``text`` (the same as ``caption``) and ``capfilt_config``
  (the run's settings, the same in every row: they are in ``capfilt_export.json`` once): ``sample_id``, ``key``,
  ``url``, ``web_text``, ``source``, ``source_index``, ``itm_score``, ``itc_score``, ``image_sha256``, ``width``,
  ``height``, ``captioner``, ``filter`` and the input's own columns.

The key is the row's ``sample_id`` with ``.`` and ``/`` written ``_``: a webdataset reader ends a key at its name's
first dot. Tars are ``00000.tar``, ``00001.tar`` ... in the order of the kept files (sorted by name) and their
rows, sized by this rule (``tar_sizes``):

- ``samples_per_tar`` samples a tar (10,000, img2dataset's shard size: about 1 GB at 100 kB an image; the last one
  holds the rest), where that makes at least ``min_tars`` tars (8);
- otherwise ``min_tars`` tars (one a sample where there are fewer samples), their sizes differing by at most one.

Why: a webdataset loader gives each DataLoader worker whole tars, and open_clip refuses to start with fewer tars
than workers ("number of shards must be >= total workers": ``--workers`` 4 by default, times the GPUs), so a small
export in one tar would not train. 8 tars serve the usual 2 to 8 workers; ``--min-tars`` sets more.
Beside the tars:

- ``sizes.json``: ``{"00000.tar": 10000, ...}``, the samples of each tar, as open_clip's ``get_dataset_size``
  reads it from the tars' folder (so ``--train-num-samples`` can be left out);
- ``shardindex.json``: the same as a ``wids`` shard index (webdataset's indexed, random-access reader:
  ``wids.ShardListDataset("DIR/shardindex.json")``): ``wids_version`` 1 and each tar's ``url`` (relative to the
  index), ``nsamples`` and ``filesize``;
- ``capfilt_export.json``: where the samples came from, the counts and the run's provenance (the kept files'
  Parquet metadata ``capfilt``).

A tar is written under a temporary name and renamed when whole; ``sizes.json`` is written last, so a folder with
it is complete. Members carry no time or owner (mtime 0, uid/gid 0, mode 0644): the same kept/ gives the same
bytes. Rows are read a row group at a time; memory does not grow with the dataset. The output is a local folder.

Command line: ``capfilt export-dataset --format webdataset --from OUT/kept --out DIR [--samples-per-tar 10000]
[--min-tars 8]``; it prints the open_clip command that trains on DIR (``open_clip_command``).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shlex
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from capfilt.columns import IMAGE_COLUMNS
from capfilt.console_progress import progress
from capfilt.help_format import HelpWithDefaults
from capfilt.pipelines.schema import read_provenance

FORMATS = ("webdataset",)
SAMPLES_PER_TAR = 10_000  # img2dataset's default shard size
MIN_TARS = 8  # a small export is split into this many tars, for loaders with up to 8 workers (module docstring)
SIZES_FILE = "sizes.json"  # open_clip's name
WIDS_INDEX_FILE = "shardindex.json"  # the name webdataset's `widsindex create` gives a shard index
MANIFEST_FILE = "capfilt_export.json"
READ_BATCH_ROWS = 256
_LEFT_OUT = ("text", "capfilt_config")  # besides the image and caption: the same as caption; the run's, once


class ExportError(ValueError):
    """Input that cannot be exported, or an output folder that is in use."""


def kept_files(sources: list[str]) -> list[str]:
    """The Parquet files ``sources`` name (folders: their ``*.parquet``; files; globs), sorted; an error if none."""
    files = set()
    for source in sources:
        if os.path.isdir(source):  # a folder's name is literal, wildcard characters included
            files.update(glob.glob(os.path.join(glob.escape(source), "*.parquet")))
        elif os.path.isfile(source):
            files.add(source)
        else:
            files.update(path for path in glob.glob(source) if os.path.isfile(path))
    if not files:
        raise ExportError(f"no Parquet files in {sources}: give CapFilt's OUT/kept folder (or its files)")
    return sorted(files)


def _check(path: str, schema) -> str:
    """The image column of a kept file; a clear error for any other table."""
    image = next((name for name in IMAGE_COLUMNS if name in schema.names), None)
    if image is None:
        raise ExportError(f"{path} has no image column ({', '.join(IMAGE_COLUMNS)}): rejected/ and failed/ hold no "
                          "images; export kept/")
    if "web_text" not in schema.names or "caption" not in schema.names:
        version = read_provenance(schema).get("schema_version")
        raise ExportError(f"{path} is not CapFilt kept/ output of schema version 3 or later (schema version "
                          f"{version}): its caption column may be the web text, not the kept one. Rerun bootstrap "
                          "into a new output folder")
    return image


def sample_key(sample_id: str) -> str:
    """The tar members' name stem for a sample: its ``sample_id`` without the characters webdataset splits on."""
    return sample_id.replace(".", "_").replace("/", "_")


def samples(files: list[str]) -> Iterator[tuple[str, str, bytes, str, dict]]:
    """(key, extension, image bytes, caption, other columns) of every row of ``files``, in order."""
    for path in files:
        parquet = pq.ParquetFile(path)
        image = _check(path, parquet.schema_arrow)
        for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS):
            for row in batch.to_pylist():
                value = row.pop(image)
                data = value.get("bytes") if isinstance(value, dict) else value
                if data is None:
                    raise ExportError(f"{path}: row {row['sample_id']} has no image bytes")
                caption = row.pop("caption")
                if caption is None:
                    raise ExportError(f"{path}: row {row['sample_id']} has no caption")
                for name in _LEFT_OUT:
                    row.pop(name, None)
                yield sample_key(row["sample_id"]), image, data, caption, row


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def _ready(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder: give a new one")
    out.mkdir(parents=True, exist_ok=True)


def tar_sizes(samples: int, samples_per_tar: int = SAMPLES_PER_TAR, min_tars: int = MIN_TARS) -> list[int]:
    """The samples of each tar for ``samples`` samples (the module's docstring): full tars of ``samples_per_tar``
    where they make ``min_tars`` tars or more, else ``min(min_tars, samples)`` tars of near-equal sizes."""
    if samples_per_tar < 1 or min_tars < 1:
        raise ExportError(f"samples_per_tar and min_tars must be at least 1, not {samples_per_tar} and {min_tars}")
    full = -(-samples // samples_per_tar)
    if full >= min_tars:
        return [samples_per_tar] * (full - 1) + [samples - samples_per_tar * (full - 1)]
    tars = min(min_tars, samples)
    return [samples // tars + (1 if i < samples % tars else 0) for i in range(tars)]


def brace_pattern(names: list[str]) -> str:
    """The tars ``00000.tar`` ... as one brace pattern (``{00000..00007}.tar``), as open_clip's ``--train-data``
    and webdataset expand it."""
    stems = [name[: -len(".tar")] for name in names]
    return f"{stems[0]}.tar" if len(stems) == 1 else f"{{{stems[0]}..{stems[-1]}}}.tar"


def open_clip_command(out: str | Path, manifest: dict) -> str:
    """The open_clip training command that reads the export in ``out``: its tars by brace pattern (open_clip reads
    the sample count from sizes.json beside them), and its default 4 workers or fewer where there are fewer tars.
    The model and training flags are open_clip's defaults unless added (``--model``, ``--batch-size`` ...)."""
    tars = shlex.quote(str(Path(out).resolve() / brace_pattern(manifest["tar_names"])))
    return f"python -m open_clip_train.main --dataset-type webdataset --train-data {tars} --workers " \
           f"{min(4, manifest['tars'])}"


def export_webdataset(sources: list[str], out: str | Path, samples_per_tar: int = SAMPLES_PER_TAR,
                      min_tars: int = MIN_TARS, show_progress: bool = False) -> dict:
    """Write the kept rows of ``sources`` as tars into ``out`` (a new or empty folder); returns the manifest.

    ``show_progress``: samples written so far on stderr (``capfilt.console_progress``), as the command line does."""
    tar_sizes(1, samples_per_tar, min_tars)  # checks the sizes before anything is read
    files = kept_files(sources)
    for path in files:  # every file before any tar: a wrong input fails at once
        _check(path, pq.read_schema(path))
    plan = tar_sizes(sum(pq.ParquetFile(path).metadata.num_rows for path in files), samples_per_tar, min_tars)
    out = Path(out)
    _ready(out)
    sizes: dict[str, int] = {}
    try:
        with progress(sum(plan), "export" if show_progress else None, unit="sample") as advance:
            _write_tars(files, plan, out, sizes, advance)
    finally:
        for leftover in out.glob("*.tar.tmp"):  # an error mid-tar: no half tar is left with a final name
            leftover.unlink(missing_ok=True)
    names = list(sizes)
    manifest = {"format": "webdataset", "from": [str(Path(path).resolve()) for path in files],
                "samples": sum(sizes.values()), "tars": len(sizes), "tar_names": names,
                "samples_per_tar": samples_per_tar, "min_tars": min_tars,
                "capfilt": read_provenance(pq.read_schema(files[0]))}
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": out.resolve().name,
             "shardlist": [{"url": name, "nsamples": sizes[name], "filesize": (out / name).stat().st_size}
                           for name in names]}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / WIDS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / SIZES_FILE).write_text(json.dumps(sizes, indent=2) + "\n")
    return manifest


def _write_tars(files: list[str], plan: list[int], out: Path, sizes: dict[str, int], advance) -> None:
    """The samples of ``files`` into tars of ``plan``'s sizes, each renamed into place when full (into ``sizes``)."""
    tar, name, count, previous = None, "", 0, None
    try:
        for key, extension, data, caption, other in samples(files):
            if tar is None:
                if len(sizes) == len(plan):
                    raise ExportError(f"{files} hold more rows than their Parquet metadata counts")
                name = f"{len(sizes):05d}.tar"
                tar, count = tarfile.open(out / f"{name}.tmp", "w"), 0
            if key == previous:  # webdataset would merge two samples with the same key that follow each other
                raise ExportError(f"two rows in a row have the key {key!r} (sample_id {other['sample_id']!r})")
            previous = key
            _member(tar, f"{key}.{extension}", data)
            _member(tar, f"{key}.json", json.dumps(other, ensure_ascii=False).encode("utf-8"))
            _member(tar, f"{key}.txt", caption.encode("utf-8"))
            count += 1
            if count == plan[len(sizes)]:
                tar.close()
                tar = None
                os.replace(out / f"{name}.tmp", out / name)
                sizes[name] = count
            advance(1)
    finally:
        if tar is not None:
            tar.close()
    if len(sizes) != len(plan):  # fewer rows than the metadata counted: kept/ changed while it was read
        raise ExportError(f"{files} hold {sum(sizes.values()) + count * (tar is not None)} rows, fewer than the "
                          f"{sum(plan)} their Parquet metadata counts (rewritten while exporting?): export again")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="capfilt export-dataset", formatter_class=HelpWithDefaults,
        description="Write CapFilt's kept/ as webdataset tars ({sample_id}.jpg, .txt: the kept text, .json: the other "
                    "columns) with sizes.json, for open_clip and other webdataset loaders.")
    parser.add_argument("--format", default="webdataset", choices=FORMATS, help="output format")
    parser.add_argument("--from", dest="sources", nargs="+", required=True, metavar="KEPT",
                        help="CapFilt's OUT/kept folder, or kept Parquet files or globs")
    parser.add_argument("--out", required=True, help="a new (or empty) local folder for the tars")
    parser.add_argument("--samples-per-tar", type=int, default=SAMPLES_PER_TAR, help="samples in each tar")
    parser.add_argument("--min-tars", type=int, default=MIN_TARS,
                        help="split a smaller export into this many tars (at least the DataLoader workers in all)")
    args = parser.parse_args(argv)
    try:
        manifest = export_webdataset(args.sources, args.out, args.samples_per_tar, args.min_tars, show_progress=True)
    except (ExportError, OSError) as error:
        parser.exit(2, f"capfilt export-dataset: error: {error}\n")
    print(f"{manifest['samples']} samples in {manifest['tars']} tar(s) -> {args.out} (sizes in {SIZES_FILE}, a wids "
          f"index in {WIDS_INDEX_FILE})")
    if manifest["tars"]:
        print(f"open_clip: {open_clip_command(args.out, manifest)}")
    return 0
