"""What ``capfilt bootstrap`` refuses before the job starts (``capfilt.recipes.preflight``): every problem at once,
one line each with its fix, and nothing written to OUT; caption columns that are not found; a changed URL list."""

from __future__ import annotations

import os
import time

import pytest

from capfilt import cli
from capfilt.ingest.url_list import Columns, DatasetError, detect_url_list
from capfilt.recipes import bootstrap as recipe


def test_a_list_whose_caption_column_is_not_found_is_an_error_naming_the_flag(tmp_path):
    listed = tmp_path / "urls.csv"
    listed.write_text("image_url,alt_text,license\nhttp://a.example/1.jpg,a cat,cc-by\n")
    with pytest.raises(DatasetError, match="--caption-col") as error:
        detect_url_list([listed])
    assert "alt_text" in str(error.value) and "--no-caption" in str(error.value)
    assert detect_url_list([listed], Columns(caption="alt_text")).caption_col == "alt_text"
    assert detect_url_list([listed], Columns(no_caption=True)).caption_col is None
    with pytest.raises(DatasetError, match="is not one of its columns"):
        detect_url_list([listed], Columns(caption="alt"))
    with pytest.raises(DatasetError, match="not both"):
        Columns(caption="alt_text", no_caption=True)


def test_a_headerless_list_of_three_columns_needs_its_caption_column_named(tmp_path):
    listed = tmp_path / "urls.tsv"
    listed.write_text("http://a.example/1.jpg\ta cat\tcc-by\nhttp://a.example/2.jpg\ta dog\tcc0\n")
    with pytest.raises(DatasetError, match="--caption-col N") as error:
        detect_url_list([listed])
    assert "3 columns" in str(error.value)
    assert detect_url_list([listed], Columns(caption="1")).caption_col == 1
    assert detect_url_list([listed], Columns(no_caption=True)).caption_col is None
    with pytest.raises(DatasetError, match="0 to 2"):
        detect_url_list([listed], Columns(caption="3"))
    with pytest.raises(DatasetError, match="column index"):
        detect_url_list([listed], Columns(caption="text"))
    two = tmp_path / "two.tsv"  # CC12M's layout: the one other column is the caption, as before
    two.write_text("http://a.example/1.jpg\ta cat\n")
    assert detect_url_list([two]).caption_col == 1


def test_every_problem_is_listed_at_once_and_nothing_is_written(tmp_path, captioner_folder, filter_folder, capsys):
    listed = tmp_path / "urls.csv"
    listed.write_text("image_url,alt_text,license\nhttp://127.0.0.1/1.jpg,a cat,cc-by\n")
    out = tmp_path / "out"
    code = cli.main(["bootstrap", "--data", str(listed), "--out", str(out),
                     "--captioner", str(filter_folder),  # a filter given as captioner
                     "--filter", str(tmp_path / "model_large_retrieval_coco.pth"),  # not on disk
                     "--treshold", "0.9"])
    assert code == 2
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.startswith("  - ")]
    assert len(lines) == 4, error
    assert "did you mean --threshold" in error
    assert "--caption-col" in error
    assert "--captioner" in error and str(filter_folder) in error
    pth = next(line for line in lines if "model_large_retrieval_coco.pth" in line)
    assert "no such file" in pth and "hub" not in pth
    assert not out.exists()


def test_a_failed_start_leaves_out_reusable(tmp_path, captioner_folder, filter_folder, capsys):
    out = tmp_path / "out"
    common = ["bootstrap", "--out", str(out), "--demo-size", "4", "--demo-shard-size", "4", "--torch-threads", "1",
              "-k", "1"]
    assert cli.main([*common, "--captioner", str(filter_folder), "--filter", str(filter_folder)]) == 2
    assert not out.exists()
    assert cli.main([*common, "--captioner", str(captioner_folder), "--filter", str(filter_folder)]) == 0
    assert (out / "stats.json").is_file()


def test_a_changed_url_list_is_detected_by_content(tmp_path):
    listed = tmp_path / "urls.tsv"
    listed.write_text("http://a.example/1.jpg\ta cat\n")
    folder = tmp_path / "shards"

    def params():
        source = recipe.datasets.UrlListInput(detect_url_list([listed]), name="urls")
        return recipe.download_params(source, recipe.DownloadSettings(), (), fingerprints=True)

    assert recipe.record_source(folder, params()) is False
    assert recipe.source_conflict(folder, params()) is None
    stamp = time.time() + 5
    os.utime(listed, (stamp, stamp))  # touched, not changed: the same bytes
    assert recipe.source_conflict(folder, params()) is None
    with listed.open("a") as f:
        f.write("http://a.example/2.jpg\ta dog\n")
    conflict = recipe.source_conflict(folder, params())
    assert conflict and "grew" in conflict and "--out" in conflict
    # A record written before lists were fingerprinted is not checked for it.
    record = recipe.beside(folder, recipe.SOURCE_SUFFIX)
    old = {k: v for k, v in recipe.json.loads(record.read_text()).items() if k != "list_files"}
    record.write_text(recipe.json.dumps(old))
    assert recipe.source_conflict(folder, params()) is None


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    from capfilt import __version__
    assert capsys.readouterr().out.strip() == f"capfilt {__version__}"


def test_a_delegated_command_stopped_by_ctrl_c_says_one_line(monkeypatch, capsys):
    import capfilt.recipes.loop_report as module

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.DELEGATED, "evaluate", module.__name__)
    monkeypatch.setattr(module, "main", interrupted)
    assert cli.main(["evaluate"]) == 130
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "stopped by SIGINT" in error and "Traceback" not in error


def test_a_changed_threshold_names_refilter(tmp_path, capsys):
    out = tmp_path / "out"
    common = ["bootstrap", "--out", str(out), "--demo-size", "4", "--demo-shard-size", "4", "--torch-threads", "1"]
    assert cli.main(common) == 0
    capsys.readouterr()
    assert cli.main([*common, "--threshold", "0.7", "--select", "top-1"]) == 2
    error = capsys.readouterr().err
    assert f"capfilt refilter --from {out} --out NEW --threshold 0.7 --select top-1" in error
    assert cli.main([*common, "-k", "2"]) == 2  # a model setting: refilter cannot help, and is not named
    assert "refilter" not in capsys.readouterr().err


def test_an_out_where_no_shard_was_done_can_be_claimed_anew(tmp_path):
    from capfilt.pipelines.layout import OutputLayout, SettingsMismatchError

    layout = OutputLayout(str(tmp_path / "out"))
    layout.claim({"schema_version": 5, "captioner": "a filter folder by mistake"})
    layout.claim({"schema_version": 5, "captioner": "demo"})  # the failed start finished no shard: no mix
    running = layout.start_run(local=False)  # a job elsewhere, maybe alive: its OUT is not taken from it
    with pytest.raises(SettingsMismatchError, match="changed: captioner"):
        layout.claim({"schema_version": 5, "captioner": "other"})
    running.end_run()
    downloading = layout.start_run(local=True)  # a job of this host that claimed OUT and is still downloading
    with pytest.raises(SettingsMismatchError, match="changed: captioner"):
        layout.claim({"schema_version": 5, "captioner": "other"})
    downloading.end_run()
    layout.claim({"schema_version": 5, "captioner": "other"})
    (tmp_path / "out" / ".capfilt" / "done").mkdir(parents=True)
    (tmp_path / "out" / ".capfilt" / "done" / "00000.json").write_text("{}")
    with pytest.raises(SettingsMismatchError, match="changed: captioner"):
        layout.claim({"schema_version": 5, "captioner": "demo"})


def test_judging_choices_a_filter_cannot_take_are_problem_lines(tmp_path, captioner_folder, capsys):
    """A CLIP/SigLIP filter (no ITM head) with neither a threshold nor top-N, by ITM, or --instruction for a
    captioner that reads none: each a line naming the ways out, nothing written."""
    from transformers import CLIPConfig, CLIPModel

    from test_family_clip import tokenizer

    clip = tmp_path / "clip"
    CLIPModel(CLIPConfig(text_config=dict(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, max_position_embeddings=16),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, image_size=24, patch_size=8),
                         projection_dim=16)).save_pretrained(clip)
    tokenizer("<start> $A <end>").save_pretrained(clip)
    out = tmp_path / "out"
    base = ["bootstrap", "--out", str(out), "--captioner", str(captioner_folder), "--filter", str(clip)]
    cases = [([], "no default threshold", ("--by itc --threshold T", "--select top-N")),
             (["--by", "itm", "--select", "top-2"], "no ITM head", ("--by itc",)),
             (["--select", "top-2", "--instruction", "Describe it."], "--instruction is for an InstructBLIP", ()),
             (["--by", "itc", "--threshold", "1.5"], "[-1, 1]", ())]
    for extra, problem, ways in cases:
        assert cli.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("  - ")]
        assert len(lines) == 1 and problem in lines[0] and all(way in lines[0] for way in ways), err
        assert not out.exists()
    # A judging problem and a DATA problem: both listed (the settings cannot be built, DATA is still checked).
    listed = tmp_path / "urls.csv"
    listed.write_text("image_url,alt_text,license\nhttp://127.0.0.1/1.jpg,a cat,cc-by\n")
    assert cli.main([*base, "--data", str(listed)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  - ")]
    assert len(lines) == 2 and "no default threshold" in lines[0] and "--caption-col" in lines[1]
    settings = cli.settings_from_args(cli.build_parser().parse_args([*base, "--select", "top-2"]))
    assert (settings.by, settings.threshold, settings.filter_family) == ("itc", None, "clip")
    settings = cli.settings_from_args(cli.build_parser().parse_args([*base, "--threshold", "0.2"]))
    assert (settings.by, settings.threshold, settings.select) == ("itc", 0.2, "all")
    settings = cli.settings_from_args(cli.build_parser().parse_args(["bootstrap", "--filter", str(captioner_folder)]))
    assert (settings.by, settings.threshold, settings.captioner_family) == ("itm", 0.5, "blip")


def test_a_model_only_a_remote_runner_reads_leaves_its_family_to_the_worker():
    args = cli.build_parser().parse_args([
        "bootstrap", "--data", "cc12m", "--runner", "DataflowRunner", "--captioner", "org/not-cached-captioner",
        "--filter", "org/not-cached-filter", "--instruction", "A photo of", "--by", "itc", "--select", "top-2"])
    settings = cli.settings_from_args(args)
    assert (settings.captioner_family, settings.filter_family) == ("auto", "auto")
    assert (settings.by, settings.threshold, settings.sampling_overrides) == ("itc", None, {"instruction": "A photo of"})


def test_a_headerless_csv_with_a_quoted_comma_before_the_url(tmp_path):
    listed = tmp_path / "urls.csv"
    listed.write_text('"a cat, sitting",http://a.example/1.jpg\n"a dog",http://a.example/2.jpg\n')
    found = detect_url_list([listed])
    assert (found.url_col, found.caption_col, found.header) == (1, 0, False)
