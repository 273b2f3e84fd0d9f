"""The output opened as is by the loaders trainers use, none written for capfilt: HF ``datasets``
(``load_dataset(OUT)`` and each config), ``webdataset`` through a torch ``DataLoader`` with 2 workers, ``wids`` from
the shard index, open_clip's webdataset contract, and DuckDB. Every value is checked against the Parquet files read
back with pyarrow.

open_clip itself is not installed here: PyPI's open_clip_torch needs torchvision, whose wheels pin a torch other than
the CPU build the project installs (``pip install --dry-run open_clip_torch`` pulls CUDA torch 2.14). Its reader is
tested through its documented contract instead (``test_open_clip_reads_the_printed_command``).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import shlex

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from PIL import Image

from capfilt import cli
from capfilt.pipelines import bootstrap
from capfilt.pipelines.dataset_card import CARD_FILE, write_dataset_card
from capfilt.pipelines.export_dataset import SIZES_FILE, WIDS_INDEX_FILE, sample_key, tar_sizes
from capfilt.pipelines.layout import OutputLayout
from capfilt.pipelines.report import read_stats
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import list_shards
from test_export_dataset import png

ROWS_PER_SHARD = 5  # 2 shards, one row a failed download: 9 images, each with 3 texts of which top-1 is kept


@pytest.fixture(scope="module")
def out(tmp_path_factory, captioner_folder, filter_folder):
    """A finished OUT with rows in kept/, rejected/ (--select top-1 of 3 texts) and failed/ (a failed download)."""
    folder = tmp_path_factory.mktemp("input")
    for shard in range(2):
        rows = []
        for i in range(ROWS_PER_SHARD):
            lost = shard == 1 and i == 2
            rows.append({"key": f"{shard}{i}", "url": f"http://127.0.0.1/{shard}/{i}.png",
                         "caption": f"web {shard}.{i}", "png": None if lost else png((40 * i, 100 * shard, 90)),
                         "status": "failed_to_download" if lost else "success",
                         "error_message": "HTTP Error 404: Not Found" if lost else None, "licence": "cc-by"})
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text("{}")
    settings = BootstrapSettings(captioner=str(captioner_folder), filter=str(filter_folder), threshold=0.0,
                                 num_captions=2, select="top-1", batch_size=4, torch_threads=1)
    root = tmp_path_factory.mktemp("out")
    with BeamTestPipeline(runner="FnApiRunner") as p:
        bootstrap.build_pipeline(p, list_shards(folder), settings, str(root))
    return root


def table(out, kind) -> pa.Table:
    return pq.read_table(out / kind)


def test_load_dataset_opens_kept_by_default_and_rejected_and_failed_as_configs(out, tmp_path):
    from datasets import load_dataset

    cache = str(tmp_path / "cache")
    kept, rejected, failed = (table(out, kind) for kind in ("kept", "rejected", "failed"))
    assert (kept.num_rows, rejected.num_rows, failed.num_rows) == (9, 18, 1)
    default = load_dataset(str(out), cache_dir=cache)
    assert list(default) == ["train"]
    rows = default["train"]
    assert rows.num_rows == kept.num_rows
    assert rows["sample_id"] == kept.column("sample_id").to_pylist()
    assert rows["caption"] == kept.column("caption").to_pylist()
    image = rows[0]["png"]  # the struct column decodes to a PIL image, the kept bytes
    assert isinstance(image, Image.Image) and image.size == (36, 30)
    assert rows["status"] == ["success"] * kept.num_rows and rows["error_message"] == [None] * kept.num_rows
    again = load_dataset(str(out), "rejected", split="train", cache_dir=cache)
    assert again["sample_id"] == rejected.column("sample_id").to_pylist()
    assert set(again["reason"]) == {"not in top n"} and set(again["status"]) == {"success"}
    lost = load_dataset(str(out), "failed", split="train", cache_dir=cache)
    assert lost["stage"] == ["download"] and lost["status"] == ["failed_to_download"]
    assert lost["error"] == ["HTTP Error 404: Not Found"]


def test_an_empty_failed_gets_no_config(out, tmp_path):
    """datasets raises "corresponds to no data" on a config whose files hold no rows: failed/ without rows has
    none, and load_dataset(OUT) still opens kept/."""
    from datasets import load_dataset

    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for path in (copy / "failed").glob("*.parquet"):
        pq.write_table(pq.read_table(path).slice(0, 0), path)
    stats = read_stats(OutputLayout(str(copy)))
    stats["failed"] = {stage: 0 for stage in stats["failed"]}
    layout = OutputLayout(str(copy))
    write_dataset_card(layout, stats, layout.read_markers())
    assert load_dataset(str(copy), split="train", cache_dir=str(tmp_path / "c")).num_rows == 9
    with pytest.raises(ValueError, match="'failed' not found"):
        load_dataset(str(copy), "failed", cache_dir=str(tmp_path / "c"))


def test_datasets_globbing_skips_the_bookkeeping_folders(out):
    """``load_dataset("parquet", data_dir=OUT)`` and a card's patterns resolve files through datasets' own globbing:
    markers, hash files and temporary files are never among them."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    internal = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
                      and p.relative_to(out).parts[0] == ".capfilt")
    assert any(name.endswith(".json") for name in internal) and any(name.endswith(".keys") for name in internal)
    resolved = DataFilesDict.from_patterns(get_data_patterns(str(out)), base_path=str(out))
    names = {path.split(str(out) + "/", 1)[1] for files in resolved.values() for path in files}
    assert names and not names & set(internal)
    assert not any(name.startswith(("_done", "_tmp", ".capfilt")) for name in names)
    card = (out / CARD_FILE).read_text()
    assert "kept/*.parquet" in card and "default: true" in card


@pytest.fixture(scope="module")
def export(out, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "tars"
    printed = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(printed):
        assert cli.main(["export-dataset", "--from", str(out / "kept"), "--out", str(folder)]) == 0
    return folder, printed.getvalue()


def test_a_small_export_is_split_for_the_usual_worker_counts(out, export):
    folder, _ = export
    sizes = json.loads((folder / SIZES_FILE).read_text())
    assert list(sizes.values()) == [2, 1, 1, 1, 1, 1, 1, 1]  # 9 samples into 8 tars
    assert tar_sizes(9) == [2, 1, 1, 1, 1, 1, 1, 1] and tar_sizes(3) == [1, 1, 1]
    assert tar_sizes(25_000) == [3125] * 8  # fewer than 8 full tars: 8 of equal size
    assert tar_sizes(85_000) == [10_000] * 8 + [5_000]  # 8 full tars or more: img2dataset's size, the rest last


def test_webdataset_through_a_dataloader_with_two_workers(out, export):
    import torch
    import webdataset as wds

    folder, _ = export
    kept = {sample_key(row["sample_id"]): row for row in table(out, "kept").to_pylist()}
    tars = sorted(str(path) for path in folder.glob("*.tar"))
    dataset = wds.WebDataset(tars, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False) \
        .to_tuple("__key__", "png", "txt")
    seen = []
    for key, image, text in torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2):
        assert image == kept[key]["png"]["bytes"] and text.decode() == kept[key]["caption"]
        seen.append(key)
    assert sorted(seen) == sorted(kept)  # each sample once, both workers together


def test_wids_reads_the_shard_index(out, export, tmp_path):
    from wids import ShardListDataset

    folder, _ = export
    kept = {sample_key(row["sample_id"]): row for row in table(out, "kept").to_pylist()}
    dataset = ShardListDataset(str(folder / WIDS_INDEX_FILE), cache_dir=str(tmp_path / "wids"), transformations=[])
    assert len(dataset) == len(kept)
    seen = set()
    for i in range(len(dataset)):
        sample = dataset[i]
        row = kept[sample["__key__"]]
        assert sample[".png"].read() == row["png"]["bytes"]
        assert sample[".txt"].read().decode() == row["caption"]
        seen.add(sample["__key__"])
    assert seen == set(kept)


def test_open_clip_reads_the_printed_command(out, export):
    """open_clip's get_wds_dataset (open_clip_train/data.py), as documented there: ``--train-data`` brace-expanded
    into tars; at least ``--workers`` times the GPUs tars ("number of shards must be >= total workers"); the sample
    count from sizes.json in the first tar's folder, by tar base name; an image under jpg, png, jpeg or webp and a
    ``txt`` caption per sample."""
    import braceexpand
    import torch
    import webdataset as wds

    folder, printed = export
    command = re.search(r"open_clip: (python -m open_clip_train\.main .*)", printed).group(1)
    flags = dict(re.findall(r"--([\w-]+) '?([^' ]+)'?", command))
    assert flags["dataset-type"] == "webdataset"
    urls = list(braceexpand.braceexpand(flags["train-data"]))
    assert urls == [str(path.resolve()) for path in sorted(folder.glob("*.tar"))]
    assert len(urls) >= int(flags["workers"]) == 4  # open_clip's default workers on one GPU
    sizes = json.loads((folder / SIZES_FILE).read_text())
    assert sum(sizes[url.rsplit("/", 1)[1]] for url in urls) == table(out, "kept").num_rows
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(),
        wds.select(lambda s: "txt" in s and any(k in s for k in ("png", "jpg", "jpeg", "webp"))),
        wds.decode("pilrgb"), wds.rename(image="jpg;png;jpeg;webp", text="txt"), wds.to_tuple("image", "text"))
    pairs = list(torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2))
    assert len(pairs) == table(out, "kept").num_rows
    assert all(isinstance(image, Image.Image) and text for image, text in pairs)


def test_duckdb_reads_kept_by_glob(out):
    import duckdb

    kept = table(out, "kept")
    found = duckdb.sql(f"SELECT sample_id, caption, png.bytes AS image FROM '{out}/kept/*.parquet' "
                       "WHERE status = 'success' ORDER BY sample_id").fetchall()
    expected = sorted(zip(kept.column("sample_id").to_pylist(), kept.column("caption").to_pylist(),
                          [v["bytes"] for v in kept.column("png").to_pylist()]))
    assert found == expected


def test_the_cards_command_carries_every_setting_with_a_flag():
    from capfilt.cli import build_parser
    from capfilt.pipelines.dataset_card import command

    settings = {"captioner": "cap", "filter": "fil", "num_captions": 3, "threshold": None, "by": "itc",
                "select": "top-2", "seed": 7, "batch_size": 16, "dedup_images": True, "min_image_size": 12,
                "sampling_overrides": {"top_p": 0.85, "instruction": "A photo of"}}
    line = command({"settings": settings}, "out", ["/data/shards/00000.parquet"])
    argv = shlex.split(line)
    assert argv[:2] == ["capfilt", "bootstrap"]
    args = build_parser().parse_args(argv[1:])  # the command parses, and says what the run used
    assert (args.top_p, args.instruction, args.min_image_size, args.threshold, args.by, args.select, args.seed,
            args.num_captions, args.dedup_images) == (0.85, "A photo of", 12, None, "itc", "top-2", 7, 3, True)
