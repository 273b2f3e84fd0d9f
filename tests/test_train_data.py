"""Training data (capfilt.models.data) and augmentations (capfilt.models.augment)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capfilt.models.augment import AugmentConfig, random_resized_crop, transform
from capfilt.models.data import (
    BadParquetFile, DataConfig, EpochLoader, Layout, Stream, StreamPosition, check_files, count_rows, detect_layout,
    epoch_streams, find_files,
)


def png(colour, size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def write_img2dataset(path, rows: int, failed: set[int]):
    """img2dataset's --output_format parquet: failed downloads keep a row with a null image."""
    ok = [i not in failed for i in range(rows)]
    pq.write_table(pa.table({
        "url": [f"http://x/{i}.jpg" for i in range(rows)],
        "caption": [f"caption {i}" for i in range(rows)],
        "key": [f"{i:09d}" for i in range(rows)],
        "status": ["success" if good else "failed_to_download" for good in ok],
        "error_message": [None if good else "404" for good in ok],
        "jpg": [png((i * 10 % 255, 0, 0)) if good else None for i, good in enumerate(ok)],
    }), path, row_group_size=4)


def write_capfilt(path, texts: list[str]):
    pq.write_table(pa.table({"image": [png((i * 20 % 255, 90, 90)) for i in range(len(texts))], "text": texts,
                             "key": [str(i) for i in range(len(texts))], "source": ["web"] * len(texts),
                             "itm_score": [0.9] * len(texts)}), path, row_group_size=3)


def test_layouts_are_told_apart_by_columns():
    assert detect_layout(["jpg", "caption", "key", "status"]) == Layout("img2dataset", "jpg", "caption", "status")
    assert detect_layout(["webp", "caption", "key"]).image == "webp"
    # capfilt's kept/ files: img2dataset's columns plus the pair's text (web or synthetic) and its source
    kept = ["key", "url", "caption", "text", "source", "source_index", "itm_score", "itc_score", "jpg"]
    assert detect_layout(kept) == Layout("capfilt", "jpg", "text")
    assert detect_layout(["image", "text", "key", "source", "itm_score"]) == Layout("capfilt", "image", "text")
    assert detect_layout(["image", "text"]).name == "image-text"
    with pytest.raises(ValueError, match="no image column.*kept/"):
        detect_layout(["key", "caption", "text", "source", "stage", "error"], "failed/0.parquet")
    with pytest.raises(ValueError, match="no text column"):
        detect_layout(["jpg", "key"], "x.parquet")


def test_img2dataset_failed_rows_are_skipped(tmp_path):
    path = tmp_path / "00000.parquet"
    write_img2dataset(path, 10, failed={2, 3, 7})
    assert count_rows(str(path)) == 7
    stream = Stream([str(path)], 0, epoch=0, seed=0, config=DataConfig(shuffle=False))
    assert [s.text for s in stream] == [f"caption {i}" for i in range(10) if i not in {2, 3, 7}]
    assert stream.position == StreamPosition(1, 0)


def test_a_stream_resumes_where_it_stopped(tmp_path):
    for part in range(2):
        write_capfilt(tmp_path / f"{part}.parquet", [f"text {part} {i}" for i in range(7)])
    files = find_files([str(tmp_path)])
    config = DataConfig(block_rows=4)
    whole = [(s.text, s.seed_parts) for s in Stream(files, 0, 3, 11, config)]
    assert sorted(t for t, _ in whole) == sorted(f"text {p} {i}" for p in range(2) for i in range(7))
    assert [t for t, _ in whole[:7]] != [f"text 0 {i}" for i in range(7)]  # rows shuffled within blocks
    for stop in (3, 7, 9):
        stream = Stream(files, 0, 3, 11, config)
        head = [(s.text, s.seed_parts) for _, s in zip(range(stop), stream)]
        rest = [(s.text, s.seed_parts) for s in Stream(files, 0, 3, 11, config, stream.position)]
        assert head + rest == whole


def test_ranks_read_contiguous_slices_of_the_same_global_batch(tmp_path, tokenizer):
    for part in range(4):
        write_capfilt(tmp_path / f"{part}.parquet", [f"a red square {part} {i}" for i in range(6)])
    files = find_files([str(tmp_path / "*.parquet")])
    config = DataConfig(batch_size=4, streams=2, workers=1, max_tokens=12)

    def batches(rank, world_size):
        loader = EpochLoader(files, config, tokenizer, 16, AugmentConfig(), seed=5, epoch=1, streams=2, rank=rank,
                             world_size=world_size)
        return list(loader)

    whole, halves = batches(0, 1), list(zip(batches(0, 2), batches(1, 2)))
    assert len(whole) == len(halves) == 6  # each stream: 2 files x 6 rows, 2 per batch
    for full, (first, second) in zip(whole, halves):
        assert torch.equal(full.pixel_values, torch.cat([first.pixel_values, second.pixel_values]))
        assert torch.equal(full.input_ids, torch.cat([first.input_ids, second.input_ids]))
        assert full.positions == {**first.positions, **second.positions}


def test_too_few_files_or_none_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        find_files([str(tmp_path / "*.parquet")])
    with pytest.raises(ValueError, match="cannot feed 3 streams"):
        epoch_streams(["a", "b"], 3, 0, 0, True)


def test_augmentation_is_seeded_and_flip_can_be_turned_off():
    left_red = Image.new("RGB", (32, 32), (0, 0, 255))
    left_red.paste((255, 0, 0), (0, 0, 16, 32))
    plain = AugmentConfig(crop_min_scale=1.0, randaugment=False)  # full-image crops: only the flip changes it

    def red_on_left(config, seed):
        pixels = transform(left_red, 32, config, np.random.default_rng(seed))
        return bool(pixels[0, :, :8].mean() > pixels[0, :, -8:].mean())

    assert not all(red_on_left(plain, seed) for seed in range(20))  # flipped sometimes (p 0.5)
    no_flip = AugmentConfig(crop_min_scale=1.0, randaugment=False, hflip=False)
    assert all(red_on_left(no_flip, seed) for seed in range(20))
    full = AugmentConfig(crop_min_scale=0.2)
    a, b = (transform(left_red, 24, full, np.random.default_rng(4)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (3, 24, 24)
    crop = random_resized_crop(Image.new("RGB", (100, 10)), 16, np.random.default_rng(0), 0.9)
    assert crop.size == (16, 16)  # no 0.9-area crop fits the 3/4..4/3 ratio: centre crop


def test_shapes_world_splits_are_read_as_img2dataset(tmp_path, tokenizer):
    from capfilt.shapes.writer import read_split, write_split

    write_split("human", 8, seed=3, out=tmp_path, shard_size=4)
    files = find_files([str(tmp_path)])
    assert [detect_layout(pq.read_schema(f).names).name for f in files] == ["img2dataset"] * 2
    config = DataConfig(batch_size=4, streams=2, shuffle=False, workers=1, max_tokens=64)
    batches = list(EpochLoader(files, config, tokenizer, 32, AugmentConfig(hflip=False), seed=0, epoch=0,
                               streams=2, rank=0, world_size=1))
    captions = [row["caption"] for row in read_split(tmp_path)]
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for b in batches for ids in b.input_ids]
    assert len(batches) == 2 and sorted(decoded) == sorted(captions)


def test_positives_by_image_or_by_identical_text(tmp_path, tokenizer):
    texts = ["A red square.", "a green circle", "a red square", "a blue square"]
    write_capfilt(tmp_path / "0.parquet", texts)  # four different images
    files = find_files([str(tmp_path)])

    def ids(positives):
        config = DataConfig(batch_size=4, workers=1, max_tokens=12, shuffle=False, positives=positives)
        (batch,) = list(EpochLoader(files, config, tokenizer, 16, AugmentConfig(augment=False), seed=0, epoch=0,
                                    streams=1, rank=0, world_size=1))
        return batch.image_ids.tolist()

    by_image, by_text = ids("image"), ids("text")
    assert len(set(by_image)) == 4  # every image differs
    assert by_text[0] == by_text[2] and len(set(by_text)) == 3  # same caption once normalised
    with pytest.raises(ValueError, match="positives"):
        DataConfig(positives="caption")


def test_worker_processes_give_the_threads_batches_and_tokens_match_the_tokenizer(tmp_path, tokenizer):
    texts = ["a red square left of a blue circle", "", "a green triangle", "a red square left of a blue circle"]
    for part in range(2):
        write_capfilt(tmp_path / f"{part}.parquet", [texts[i % 4] + f" {part} {i % 3}" for i in range(8)])
    rows = pq.read_table(tmp_path / "1.parquet").to_pylist()
    rows[2]["image"] = b"not an image"  # skipped: the stream reads on
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "1.parquet")
    files = find_files([str(tmp_path)])
    augment = AugmentConfig(crop_min_scale=0.2)  # seeded per sample: the seed must reach the worker

    def batches(processes: bool) -> list:
        config = DataConfig(batch_size=4, streams=2, workers=2, max_tokens=9, prompt="a picture of ",
                            worker_processes=processes)
        return list(EpochLoader(files, config, tokenizer, 16, augment, seed=7, epoch=0, streams=2, rank=0,
                                world_size=1))

    threads, processes = batches(False), batches(True)
    assert len(threads) == len(processes) == 3  # stream 1: 7 decodable rows, 2 a batch
    for a, b in zip(threads, processes):
        assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.image_ids, b.image_ids) and a.positions == b.positions
    # The cached per-text encoding equals the tokenizer's own padded batch call (truncated, repeated, empty).
    loader = EpochLoader(files, DataConfig(batch_size=4, streams=2, workers=1, max_tokens=9), tokenizer, 16, augment,
                         seed=7, epoch=0, streams=2, rank=0, world_size=1)
    loader.close()
    texts = ["a picture of a red square", "a picture of a red square left of a big blue circle above", "",
             "a picture of a red square", "blue"]
    expected = tokenizer(texts, padding="max_length", truncation=True, max_length=9, return_tensors="pt")
    input_ids, attention_mask = loader._encode(texts)
    assert torch.equal(input_ids, expected.input_ids) and torch.equal(attention_mask, expected.attention_mask)


def test_a_negatives_column_is_read_into_each_batch(tmp_path, tokenizer):
    from capfilt.shapes.writer import read_split, write_split

    write_split("human", 12, seed=3, out=tmp_path / "neg", shard_size=12, negatives=True)
    files = find_files([str(tmp_path / "neg")])
    config = DataConfig(batch_size=12, workers=1, max_tokens=16, shuffle=False, negatives="negative_caption")
    (batch,) = list(EpochLoader(files, config, tokenizer, 16, AugmentConfig(augment=False), seed=0, epoch=0,
                                streams=1, rank=0, world_size=1))
    negatives = [row["negative_caption"] for row in read_split(tmp_path / "neg")]
    assert batch.has_negative.tolist() == [text is not None for text in negatives] and any(negatives)
    for ids, mask, text in zip(batch.negative_ids, batch.negative_mask, negatives):
        if text:  # what the tokenizer gives for the column's text, padded
            assert ids[mask.bool()].tolist() == tokenizer(text, truncation=True, max_length=16).input_ids
    assert batch.negative_mask[~batch.has_negative].sum() == 2 * (~batch.has_negative).sum()  # [CLS] [SEP] only
    plain = DataConfig(batch_size=12, workers=1, max_tokens=16, shuffle=False)
    (without,) = list(EpochLoader(files, plain, tokenizer, 16, AugmentConfig(augment=False), seed=0, epoch=0,
                                  streams=1, rank=0, world_size=1))
    assert without.has_negative is None and torch.equal(without.input_ids, batch.input_ids)
    write_split("human", 4, seed=3, out=tmp_path / "plain")
    loader = EpochLoader(find_files([str(tmp_path / "plain")]), DataConfig(batch_size=4, workers=1, negatives="x"),
                         tokenizer, 16, AugmentConfig(augment=False), seed=0, epoch=0, streams=1, rank=0, world_size=1)
    with pytest.raises(ValueError, match="no negatives column 'x'"):
        list(loader)


def garble_row_group(path, group: int, column: int = 0):
    """Overwrite the header of a data page of row group ``group`` in place; pyarrow then fails on that group only."""
    metadata = pq.ParquetFile(path).metadata
    offset = metadata.row_group(group).column(column).data_page_offset
    data = bytearray(open(path, "rb").read())
    data[offset:offset + 16] = bytes(range(240, 256))
    open(path, "wb").write(bytes(data))
    parquet = pq.ParquetFile(path)
    for other in range(metadata.num_row_groups):
        if other == group:
            with pytest.raises(OSError):
                parquet.read_row_group(other)
        else:
            parquet.read_row_group(other)


def truncate(path):
    """Cut a file's last half: its footer (and the metadata pyarrow needs) gone, as after an interrupted copy."""
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def test_a_file_without_footer_is_named_or_left_out(tmp_path):
    for part in range(3):
        write_capfilt(tmp_path / f"{part}.parquet", [f"text {part} {i}" for i in range(6)])
    truncate(tmp_path / "1.parquet")
    files = find_files([str(tmp_path)])
    with pytest.raises(BadParquetFile, match=r"1\.parquet: cannot be read \(ArrowInvalid.*--skip-bad-files"):
        check_files(files)
    counts, unreadable = check_files(files, skip_bad_files=True)
    assert counts == {files[0]: 6, files[2]: 6}
    assert [(s.path, s.row_group, s.rows) for s in unreadable] == [(files[1], None, 0)]
    assert "magic bytes" in unreadable[0].error
    # A file in a stream's list that no longer reads (a resumed run keeps it there): an error, or skipped whole.
    with pytest.raises(BadParquetFile, match=r"1\.parquet: cannot be read"):
        list(Stream(files, 0, 0, 0, DataConfig(shuffle=False)))
    stream = Stream(files, 0, 0, 0, DataConfig(shuffle=False, skip_bad_files=True))
    assert [s.text for s in stream] == [f"text {part} {i}" for part in (0, 2) for i in range(6)]
    assert [(s.path, s.row_group) for s in stream.take_skipped()] == [(files[1], None)]


@pytest.mark.parametrize("block_rows", [4, 100])
def test_a_garbled_row_group_is_named_or_skipped_and_a_resume_replays_the_same_rows(tmp_path, block_rows):
    texts = [f"text {i}" for i in range(12)]
    write_capfilt(tmp_path / "0.parquet", texts)  # row groups of 3 rows
    write_capfilt(tmp_path / "1.parquet", [f"more {i}" for i in range(5)])
    garble_row_group(tmp_path / "0.parquet", 2)  # rows 6, 7, 8
    files = find_files([str(tmp_path)])
    with pytest.raises(BadParquetFile, match=r"0\.parquet, row group 2: cannot be read \(OSError.*--skip-bad-files"):
        list(Stream(files, 0, 0, 0, DataConfig(block_rows=block_rows)))
    config = DataConfig(block_rows=block_rows, skip_bad_files=True)
    stream = Stream(files, 0, 3, 11, config)
    whole = [(s.text, s.seed_parts) for s in stream]
    kept = texts[:6] + texts[9:] + [f"more {i}" for i in range(5)]
    assert sorted(t for t, _ in whole) == sorted(kept)
    (skipped,) = stream.take_skipped()
    assert (skipped.path, skipped.row_group, skipped.start, skipped.end) == (files[0], 2, 6, 9)
    for stop in range(1, len(whole)):  # stopped anywhere, before or after the bad row group: the same rows follow
        stream = Stream(files, 0, 3, 11, config)
        head = [(s.text, s.seed_parts) for _, s in zip(range(stop), stream)]
        before = stream.take_skipped()
        resumed = Stream(files, 0, 3, 11, config, stream.position)
        assert head + [(s.text, s.seed_parts) for s in resumed] == whole
        assert len(before + resumed.take_skipped()) == 1  # reported once: by the run, or by its resume
