"""Training the MED end to end on a tiny real dataset: loss, data parallelism, resume, export."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image, ImageDraw
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.models.checkpointing import latest_checkpoint, read_checkpoint
from capfilt.models.data import BadParquetFile
from capfilt.models.checkpointing import med_from_run
from capfilt.models.configure import configure
from capfilt.models.loop import train
from capfilt.models.train import _parser, main

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220)}
SHAPES = ("square", "circle")


def colour_shape_png(colour: str, shape: str, rng: np.random.Generator) -> bytes:
    """A 40 px image: a grey-ish background with one coloured square or circle."""
    image = Image.new("RGB", (40, 40), tuple(int(v) for v in rng.integers(90, 170, 3)))
    x, y = (int(v) for v in rng.integers(2, 20, 2))
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)([x, y, x + 17, y + 17], fill=COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()



@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two capfilt-layout Parquet files of 24 pairs each: 'a {colour} {shape}'."""
    folder = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for part in range(2):
        pairs = [(str(c), str(s)) for c, s in zip(rng.choice(list(COLOURS), 24), rng.choice(SHAPES, 24))]
        table = pa.table({"image": [colour_shape_png(c, s, rng) for c, s in pairs],
                          "text": [f"a {c} {s}" for c, s in pairs],
                          "key": [f"{part}-{i}" for i in range(24)]})
        pq.write_table(table, folder / f"part-{part}.parquet", row_group_size=8)
    return str(folder / "*.parquet")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny(task, dataset, tokenizer_dir, out, **overrides):
    settings = dict(data=[dataset], out=str(out), model="tiny", image_size=32, tokenizer=tokenizer_dir, batch_size=8,
                    queue_size=16, workers=1, log_every=1, device="cpu", lr=2e-3, warmup_steps=2, epochs=100)
    return configure(task, **{**settings, **overrides})


def log_records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, dataset, tokenizer_dir):
    """A tiny MED pre-trained for 24 steps, through the command line."""
    out = tmp_path_factory.mktemp("pretrain")
    main(["pretrain", "--data", dataset, "--out", str(out), "--model", "tiny", "--image-size", "32",
          "--tokenizer", tokenizer_dir, "--batch-size", "8", "--queue-size", "16", "--workers", "1",
          "--log-every", "1", "--device", "cpu", "--lr", "2e-3", "--warmup-steps", "2", "--max-steps", "24",
          "--lr-decay", "1", "--no-randaugment"])
    return out


def test_pretraining_loss_falls(pretrained):
    records = log_records(pretrained)
    assert [r["step"] for r in records] == list(range(1, 25))
    total = [r["loss_itc"] + r["loss_itm"] + r["loss_lm"] for r in records]
    assert np.mean(total[-4:]) < np.mean(total[:4]) - 1.0
    assert np.mean([r["loss_lm"] for r in records[-4:]]) < 0.75 * np.mean([r["loss_lm"] for r in records[:4]])
    assert {"samples_per_s", "eta_s", "lr", "alpha"} <= set(records[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, config):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    train(config)


def _final_state(out):
    return read_checkpoint(latest_checkpoint(out))


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, dataset, tokenizer_dir):
    # Same global batch (8) and the same 2 data streams; ITC keys, queues and ITM negatives are global.
    one = tiny("pretrain", dataset, tokenizer_dir, tmp_path / "one", streams=2, max_steps=3)
    two = tiny("pretrain", dataset, tokenizer_dir, tmp_path / "two", streams=2, max_steps=3)
    train(one)
    mp.spawn(_ddp_worker, args=(2, _free_port(), two), nprocs=2, join=True)
    a, b = _final_state(tmp_path / "one"), _final_state(tmp_path / "two")
    assert (a["world_size"], b["world_size"]) == (1, 2) and a["state"] == b["state"]
    for key, value in a["model"].items():  # equal up to float summation order (Adam rescales tiny differences)
        assert torch.allclose(value.float(), b["model"][key].float(), atol=5e-5), key
    records_one, records_two = log_records(tmp_path / "one"), log_records(tmp_path / "two")
    for r1, r2 in zip(records_one, records_two, strict=True):
        for name in ("loss_itc", "loss_itm", "loss_lm"):
            assert r1[name] == pytest.approx(r2[name], rel=1e-4), (r1["step"], name)


def test_resume_continues_exactly(tmp_path, dataset, tokenizer_dir):
    # 8 steps straight vs 4, stop, resume, 4 more (an epoch is 6 steps: the resume crosses it).
    train(tiny("pretrain", dataset, tokenizer_dir, tmp_path / "straight", max_steps=8))
    train(tiny("pretrain", dataset, tokenizer_dir, tmp_path / "resumed", max_steps=4))
    train(tiny("pretrain", dataset, tokenizer_dir, tmp_path / "resumed", max_steps=8))
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    assert a["state"] == b["state"] and a["state"]["epoch"] == 1
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for (_, sa), (_, sb) in zip(sorted(a["optimizer"]["state"].items()), sorted(b["optimizer"]["state"].items())):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["loss_lm"] for r in log_records(tmp_path / "straight")][4:] == \
        [r["loss_lm"] for r in log_records(tmp_path / "resumed")][4:]


def test_finetuned_captioner_exports_to_transformers(tmp_path, dataset, tokenizer_dir, pretrained):
    # 48 px: the pre-trained 32 px position embeddings are interpolated.
    out = tmp_path / "captioner"
    train(tiny("finetune-captioner", dataset, "", out, init=str(pretrained), image_size=48, max_steps=2))
    med, tokenizer = med_from_run(out)
    model = BlipForConditionalGeneration.from_pretrained(out / "captioner", local_files_only=True).eval()
    med.eval()
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    tokens = tokenizer(["a picture of a red square", "a picture of a blue circle"], return_tensors="pt")
    ids = tokens.input_ids.clone()
    ids[:, 0] = tokenizer.bos_token_id
    with torch.no_grad():
        want = med.text_decoder(input_ids=ids, attention_mask=tokens.attention_mask,
                                encoder_hidden_states=med.vision_model(pixel_values=pixels).last_hidden_state).logits
        got = model(pixel_values=pixels, input_ids=ids, attention_mask=tokens.attention_mask).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert med.settings.prompt_length == 4


def test_finetuned_filter_exports_to_transformers(tmp_path, dataset, tokenizer_dir, pretrained):
    out = tmp_path / "filter"
    train(tiny("finetune-filter", dataset, tokenizer_dir, out, init=str(pretrained), max_steps=2))
    med, tokenizer = med_from_run(out)
    model = BlipForImageTextRetrieval.from_pretrained(out / "filter", local_files_only=True).eval()
    med.eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = tokenizer(["a red square", "a blue circle"], return_tensors="pt")
    enc_ids = tokens.input_ids.clone()
    enc_ids[:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        image_embeds = med.vision_model(pixel_values=pixels).last_hidden_state
        itm_want = med.itm_head(med._grounded_encoder(enc_ids, tokens.attention_mask, image_embeds)[:, 0])
        itm_got = model(input_ids=enc_ids, pixel_values=pixels, attention_mask=tokens.attention_mask).itm_score
        text = med.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        itc_want = torch.nn.functional.normalize(med.vision_proj(image_embeds[:, 0]), dim=-1) @ \
            torch.nn.functional.normalize(med.text_proj(text[:, 0]), dim=-1).t()
        itc_got = model(input_ids=tokens.input_ids, pixel_values=pixels, attention_mask=tokens.attention_mask,
                        use_itm_head=False).itm_score
    assert torch.allclose(itm_got, itm_want, atol=1e-5) and torch.allclose(itc_got, itc_want, atol=1e-5)


def test_a_partial_checkpoint_is_never_resumed_from(tmp_path, dataset, tokenizer_dir):
    out = tmp_path / "run"
    train(tiny("pretrain", dataset, tokenizer_dir, out, max_steps=1))
    complete = latest_checkpoint(out)
    crashed = complete.with_name("step-00000009.partial")  # as if the process died before the rename
    crashed.mkdir()
    (crashed / "training_state.pt").write_bytes(b"truncated")
    assert latest_checkpoint(out) == complete
    with pytest.raises(ValueError, match="checkpoint of another run"):
        train(tiny("pretrain", dataset, tokenizer_dir, out, max_steps=2, queue_size=32))


def test_a_checkpoint_from_before_a_med_setting_existed_resumes_at_its_default(tmp_path, dataset, tokenizer_dir):
    out = tmp_path / "run"
    train(tiny("pretrain", dataset, tokenizer_dir, out, max_steps=1))
    path = latest_checkpoint(out) / "training_state.pt"
    saved = torch.load(path, weights_only=True)
    del saved["config"]["med"]["freeze_vision"]  # as capfilt wrote it before freeze_vision was added
    torch.save(saved, path)
    with pytest.raises(ValueError, match="MED settings differ"):  # that run trained its ViT
        train(tiny("pretrain", dataset, tokenizer_dir, out, max_steps=2, freeze_vision=True))
    assert train(tiny("pretrain", dataset, tokenizer_dir, out, max_steps=2))["step"] == 2


def test_a_time_limit_stops_with_a_checkpoint_and_an_export(tmp_path, dataset, tokenizer_dir, pretrained):
    out = tmp_path / "filter"
    # 1 ms: the limit has passed when the first step ends; the run stops there and still checkpoints and exports.
    record = train(tiny("finetune-filter", dataset, tokenizer_dir, out, init=str(pretrained), max_seconds=0.001,
                        checkpoint_every=5))
    assert record["step"] == 1 and [r["step"] for r in log_records(out)] == [1]
    assert latest_checkpoint(out).name == "step-00000001"
    assert (out / "filter" / "config.json").is_file()


def test_patch_size_overrides_the_preset_and_must_divide_the_image(tmp_path, dataset, tokenizer_dir, tokenizer):
    from capfilt.models.run_setup import model_config

    assert model_config(tiny("pretrain", dataset, tokenizer_dir, tmp_path), tokenizer).vision_config.patch_size == 8
    config = tiny("pretrain", dataset, tokenizer_dir, tmp_path / "p4", patch_size=4, max_steps=1)
    assert model_config(config, tokenizer).vision_config.patch_size == 4
    train(config)  # a 32 px image in 4 px patches: 64 patch tokens and the class token
    med, _ = med_from_run(tmp_path / "p4")
    assert med.vision_model(pixel_values=torch.zeros(1, 3, 32, 32)).last_hidden_state.shape[1] == 65
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model_config(tiny("pretrain", dataset, tokenizer_dir, tmp_path, patch_size=5), tokenizer)


def test_sincos_position_init_reaches_the_run(tmp_path, dataset, tokenizer_dir):
    from capfilt.models.med import sincos_positions

    train(tiny("pretrain", dataset, tokenizer_dir, tmp_path / "s", vision_position_init="sincos", max_steps=1,
               lr=1e-9, warmup_steps=0))  # one tiny step: the start is still there
    med, _ = med_from_run(tmp_path / "s")
    table = med.vision_model.embeddings.position_embedding[0, 1:]
    assert torch.allclose(table, sincos_positions(4, table.shape[-1]), atol=1e-4)
    with pytest.raises(ValueError, match="vision_position_init"):
        train(tiny("pretrain", dataset, tokenizer_dir, tmp_path / "x", vision_position_init="learned"))


def test_a_filter_trains_on_a_split_with_negatives_and_a_captioner_refuses_them(tmp_path, tokenizer_dir):
    from capfilt.shapes.writer import write_split

    write_split("human", 16, seed=2, out=tmp_path / "human", shard_size=16, negatives=True)
    data = str(tmp_path / "human")
    summary = train(tiny("finetune-filter", data, tokenizer_dir, tmp_path / "f", image_size=64, max_steps=2,
                         negatives="negative_caption", positives="text"))
    assert summary["step"] == 2 and [r["step"] for r in log_records(tmp_path / "f")] == [1, 2]
    with pytest.raises(ValueError, match="feeds ITM"):
        train(tiny("finetune-captioner", data, tokenizer_dir, tmp_path / "c", negatives="negative_caption"))


def test_freeze_vision_trains_the_text_side_only(tmp_path, dataset, tokenizer_dir, pretrained):
    out = tmp_path / "frozen"
    train(tiny("finetune-captioner", dataset, tokenizer_dir, out, init=str(pretrained), max_steps=3,
               freeze_vision=True))
    start, _ = med_from_run(pretrained)
    tuned, _ = med_from_run(out)
    before, after = start.state_dict(), tuned.state_dict()
    vision = [key for key in after if key.startswith("vision_model.")]
    decoder = [key for key in after if key.startswith("text_decoder.") and key in before]
    assert vision and all(torch.equal(before[key], after[key]) for key in vision)
    assert any(not torch.equal(before[key], after[key]) for key in decoder)
    assert tuned.settings.freeze_vision and not any(p.requires_grad for p in tuned.vision_model.parameters())


def _copy_dataset(dataset, folder: Path) -> Path:
    folder.mkdir()
    for path in sorted(Path(dataset).parent.glob("*.parquet")):
        shutil.copy(path, folder)
    return folder


def test_a_file_without_footer_is_named_or_left_out_and_stays_out_on_resume(tmp_path, dataset, tokenizer_dir,
                                                                              caplog):
    data = _copy_dataset(dataset, tmp_path / "data")
    whole = (data / "part-1.parquet").read_bytes()
    bad = data / "part-2.parquet"
    bad.write_bytes(whole[:len(whole) // 2])  # a third file cut short: no footer
    with pytest.raises(SystemExit, match=r"error: .*part-2\.parquet: cannot be read \(ArrowInvalid.*--skip-bad-files"):
        main(["pretrain", "--data", str(data), "--out", str(tmp_path / "strict")])
    assert not (tmp_path / "strict").exists()  # refused before the run folder is made
    assert _parser().parse_args(["pretrain", "--skip-bad-files"]).skip_bad_files is True
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="capfilt.train"):
        train(tiny("pretrain", str(data), tokenizer_dir, out, max_steps=2, skip_bad_files=True))
    assert f"left out {bad} (unreadable: ArrowInvalid" in caplog.text
    record = log_records(out)[-1]
    assert (record["skipped_files"], record["skipped_row_groups"], record["skipped_rows"]) == (1, 0, 0)
    state = read_checkpoint(latest_checkpoint(out))["state"]
    assert state["left_out"] == [os.path.abspath(bad)] and state["skipped"]["files"] == 1
    bad.write_bytes(whole)  # repaired: still left out of this run, whose streams keep their files
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="capfilt.train"):
        train(tiny("pretrain", str(data), tokenizer_dir, out, max_steps=3, skip_bad_files=True))
    assert f"{bad} reads now but stays left out" in caplog.text
    assert read_checkpoint(latest_checkpoint(out))["state"]["left_out"] == [os.path.abspath(bad)]
    # A file the run has been reading no longer reads: it keeps its place (the streams keep their files) and is
    # skipped whole where its stream reaches it. Here it is epoch 0's first file, at whose end the checkpoint of
    # step 3 stands: the resume opens it again and the skip counts in step 4.
    gone = data / "part-0.parquet"
    gone.write_bytes(gone.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="capfilt.train"):
        train(tiny("pretrain", str(data), tokenizer_dir, out, max_steps=6, skip_bad_files=True))
    assert f"{gone} no longer reads" in caplog.text and f"skipped {gone} (unreadable: " in caplog.text
    assert [r["skipped_files"] for r in log_records(out)] == [1] * 3 + [2] * 3


def test_a_garbled_row_group_is_named_or_skipped_and_resume_stays_exact(tmp_path, dataset, tokenizer_dir, caplog):
    data = _copy_dataset(dataset, tmp_path / "data")
    bad = data / "part-1.parquet"  # row groups of 8 rows; garble the header of a data page of rows 16-23
    offset = pq.ParquetFile(bad).metadata.row_group(2).column(0).data_page_offset
    garbled = bytearray(bad.read_bytes())
    garbled[offset:offset + 16] = bytes(range(240, 256))
    bad.write_bytes(bytes(garbled))
    with pytest.raises(OSError):
        pq.ParquetFile(bad).read_row_group(2)
    # 5-row blocks: the block that fails (rows 15-19) holds a good row. An epoch is 40 good rows, 5 steps. The bad
    # file comes first in epoch 0: its rows 0-15 make steps 1-2, the skip counts in step 3. It comes last in epoch 1,
    # whose steps 9-10 end at row 15: the stream meets the bad rows as it runs out (logged, not counted).
    settings = dict(block_rows=5, skip_bad_files=True)
    train(tiny("pretrain", str(data), tokenizer_dir, tmp_path / "straight", max_steps=11, **settings))
    # Without the flag: step 1 trains and checkpoints, then the error names the file and row group.
    out = tmp_path / "resumed"
    with pytest.raises(BadParquetFile, match=r"part-1\.parquet, row group 2: cannot be read \(OSError"):
        train(tiny("pretrain", str(data), tokenizer_dir, out, max_steps=11, checkpoint_every=1, block_rows=5))
    assert latest_checkpoint(out).name == "step-00000001"
    # The same run with the flag resumes from there; stopped at step 2 (the stream stands at the bad row group's
    # first row), at step 10 (just before the skip at the end of epoch 1), then run to the end.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="capfilt.train"):
        for steps in (2, 10, 11):
            train(tiny("pretrain", str(data), tokenizer_dir, out, max_steps=steps, **settings))
    assert caplog.text.count(f"skipped {bad}, row group 2, rows 16-23 (OSError") == 2  # once an epoch, not again
    assert caplog.text.count("met as epoch 1 ended (not in the counts)") == 1
    a, b = _final_state(tmp_path / "straight"), _final_state(out)
    assert a["state"] == b["state"] and a["state"]["skipped"] == {"files": 0, "row_groups": 1, "rows": 8}
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for (_, sa), (_, sb) in zip(sorted(a["optimizer"]["state"].items()), sorted(b["optimizer"]["state"].items())):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    straight, resumed = log_records(tmp_path / "straight"), log_records(out)
    assert [r["step"] for r in resumed] == list(range(1, 12))
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        assert [r[name] for r in straight] == [r[name] for r in resumed], name
    assert [r["skipped_row_groups"] for r in straight] == [0, 0] + [1] * 9
    assert [r["skipped_row_groups"] for r in resumed[1:]] == [0] + [1] * 9


def test_no_tokenizer_says_which_presets_bring_one_and_how_to_get_berts(tmp_path, dataset):
    with pytest.raises(SystemExit) as stopped:  # the README's first command, before presets: base needs BERT's
        main(["pretrain", "--data", dataset, "--out", str(tmp_path / "run")])
    message = str(stopped.value)
    assert message.startswith("error: no tokenizer for this run (looked in ") and "Pass --tokenizer" in message
    assert "The presets tiny and demo bring the shapes-world tokenizer (e.g. --model demo" in message
    assert "hf download bert-base-uncased" in message and "Salesforce/blip-image-captioning-large" in message
    with pytest.raises(SystemExit, match=r"no tokenizer at .*nowhere.*hf download bert-base-uncased"):
        main(["pretrain", "--model", "large", "--data", dataset, "--out", str(tmp_path / "run"),
              "--tokenizer", str(tmp_path / "nowhere")])


def test_too_little_data_says_the_batch_the_rows_and_what_to_pass(tmp_path, dataset, tokenizer_dir):
    with pytest.raises(ValueError) as error:  # 2 files of 24 pairs
        train(tiny("pretrain", dataset, tokenizer_dir, tmp_path / "big", batch_size=64, queue_size=64))
    assert str(error.value) == (
        "too little data for one step: 2 file(s) hold 48 pair(s) with an image, and a global batch is 64 pairs "
        "(--batch-size). Pass a smaller --batch-size (at most 48; the ITC queue, --queue-size 64, must stay a "
        "multiple of it) or more data (--data takes several files, folders or globs)")
    with pytest.raises(ValueError, match=r"each of 2 streams, whose files hold 24 to 24 pairs\. Pass a smaller "
                                         r"--batch-size \(at most 48\) or more data"):
        train(tiny("finetune-captioner", dataset, tokenizer_dir, tmp_path / "cap", batch_size=64, streams=2))


def test_the_log_says_why_training_stopped(tmp_path, dataset, tokenizer_dir, caplog):
    with caplog.at_level(logging.INFO, logger="capfilt.train"):
        record = train(tiny("pretrain", dataset, tokenizer_dir, tmp_path / "steps", max_steps=3))
    assert record["stopped"] == "max_steps" and "stopped at step 3: --max-steps 3 reached" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="capfilt.train"):  # an epoch is 48 pairs / 8 = 6 steps
        record = train(tiny("pretrain", dataset, tokenizer_dir, tmp_path / "epochs", max_steps=20, epochs=2))
    assert record["step"] == 12 and record["stopped"] == "epochs"
    assert ("stopped at step 12: the 2 epoch(s) of --epochs ran out (6 steps in epoch 0: an epoch ends when a "
            "stream runs out of pairs, at a global batch of 8); --max-steps 20 was not reached: it needs about 4 "
            "epochs, so pass --epochs 4 (or more data)") in caplog.text
    record = train(tiny("finetune-filter", dataset, tokenizer_dir, tmp_path / "time", max_seconds=0.001))
    assert record["stopped"] == "max_seconds" and record["step"] == 1


def test_the_first_steps_are_logged_before_log_every(tmp_path, dataset, tokenizer_dir, caplog):
    with caplog.at_level(logging.INFO, logger="capfilt.train"):
        train(tiny("pretrain", dataset, tokenizer_dir, tmp_path / "run", max_steps=5, log_every=50))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/5", "2/5", "3/5", "5/5"]  # the first steps, then the end's
    assert "itc " in lines[0] and "first step done" in lines[0]
    assert "samples/s | eta " in lines[1]  # a rate and an ETA once a step past the first is timed
    assert [r["step"] for r in log_records(tmp_path / "run")] == [5]  # log.jsonl: every log_every steps and the end


def test_a_slow_run_logs_at_least_every_heartbeat(tmp_path, dataset, tokenizer_dir, caplog, monkeypatch):
    from capfilt.models import progress

    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)  # every step is "a heartbeat late"
    with caplog.at_level(logging.INFO, logger="capfilt.train"):
        train(tiny("pretrain", dataset, tokenizer_dir, tmp_path / "run", max_steps=6, log_every=50))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{step}/6" for step in range(1, 7)]


def test_an_exported_captioner_carries_its_sources_sampling_defaults(tmp_path, dataset, tokenizer_dir, pretrained):
    from capfilt.captioner import Captioner
    from capfilt.sampling_settings import SETTINGS_FILE
    from capfilt.shipped import DEMO_MODELS
    from capfilt.models.export import export_run

    first = tmp_path / "first"  # from a pre-training run without sampling defaults: the export has none
    train(tiny("finetune-captioner", dataset, tokenizer_dir, first, init=str(pretrained), max_steps=1))
    assert not (first / "captioner" / SETTINGS_FILE).exists() and not (first / SETTINGS_FILE).exists()
    (first / "captioner" / SETTINGS_FILE).write_text(json.dumps({"min_length": 3, "max_length": 12}))
    # The next round, from the exported captioner folder or from the run that holds it, samples the same way.
    for source, out in ((first / "captioner", tmp_path / "from-folder"), (first, tmp_path / "from-run")):
        train(tiny("finetune-captioner", dataset, tokenizer_dir, out, init=str(source), max_steps=1))
        settings = Captioner.load(out / "captioner", device="cpu").settings
        assert (settings.min_length, settings.max_length) == (3, 12), source
    assert Captioner.load(export_run(tmp_path / "from-run", "captioner", tmp_path / "by-hand"),
                          device="cpu").settings.min_length == 3
    # The demo preset's captioner gets the shipped demo captioner's defaults (min length 5, not BLIP's 10).
    demo = tmp_path / "demo"
    train(configure("finetune-captioner", model="demo", data=[dataset], out=str(demo), batch_size=8, workers=1,
                    device="cpu", max_steps=1, log_every=1))
    shipped = DEMO_MODELS / "captioner" / SETTINGS_FILE
    assert (demo / "captioner" / SETTINGS_FILE).read_text() == shipped.read_text()
    assert Captioner.load(demo / "captioner", device="cpu").settings.min_length == 5
    from capfilt.models.run_setup import sampling_file  # a filter has no sampling defaults

    assert sampling_file(configure("finetune-filter", model="demo", init=str(first / "captioner"))) is None
