"""``capfilt COMMAND``: one command for the whole loop; delegation, Beam options, warnings, exit statuses."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types

import pyarrow.parquet as pq
import pytest

from capfilt import cli
from capfilt.pipelines import keep_share
from capfilt.recipes import bootstrap as recipe

LOOP = ("datasets", "shapes", "train", "export", "evaluate", "bootstrap", "refilter", "export-dataset",
        "demo-models", "experiment")


def test_help_lists_every_command_in_loop_order(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    listed = [words[0] for words in lines if words and words[0] in LOOP and len(words) > 1]
    assert listed == list(LOOP)  # each with a description on its own line
    assert [name for name, _, _ in cli.COMMANDS] == list(LOOP)


def test_help_and_delegation_import_only_the_chosen_command():
    code = ("import sys\nfrom capfilt import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert cli.main(['shapes', 'vocab']) == 0\n"
            "print(sorted(m for m in ('torch', 'transformers', 'apache_beam', 'capfilt.models.train', "
            "'capfilt.pipelines.settings') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "[]"


def test_shapes_vocab_prints_the_worlds_words(capsys):
    from capfilt.shapes.captions import VOCABULARY

    assert cli.main(["shapes", "vocab"]) == 0
    assert capsys.readouterr().out.split() == list(VOCABULARY)


def test_train_passes_every_argument_to_the_trainer(capsys):
    assert cli.main(["train", "pretrain", "--print-config", "--seed", "7"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["task"] == "pretrain" and config["seed"] == 7

    assert cli.main(["train", "finetune-filter", "--help"]) == 0  # the trainer's own help, not capfilt's
    help_text = capsys.readouterr().out
    assert "--print-config" in help_text and "finetune-captioner" in help_text
    assert cli.main(["train"]) == 2  # the trainer's usage error: no task
    assert "required: task" in capsys.readouterr().err


def test_export_and_evaluate_show_their_own_help(capsys):
    assert cli.main(["export", "--help"]) == 0
    assert "{captioner,filter}" in capsys.readouterr().out
    assert cli.main(["evaluate", "--help"]) == 0
    assert "--captioner" in capsys.readouterr().out
    assert cli.main(["export-dataset", "--help"]) == 0
    assert "--samples-per-tar" in capsys.readouterr().out


def _exit(code):
    sys.exit(code)


@pytest.mark.parametrize("ends, status, message", [
    (lambda: None, 0, ""), (lambda: 5, 5, ""), (lambda: _exit(None), 0, ""), (lambda: _exit(6), 6, ""),
    (lambda: _exit("error: broken"), 1, "error: broken"),
])
def test_a_delegated_commands_exit_status_is_returned(ends, status, message, monkeypatch, capsys):
    seen = []
    module = types.ModuleType("capfilt_fake_command")
    module.main = lambda argv: seen.append(argv) or ends()
    monkeypatch.setitem(sys.modules, "capfilt_fake_command", module)
    monkeypatch.setitem(cli.DELEGATED, "experiment", "capfilt_fake_command")
    assert cli.main(["experiment", "--work", "w", "x", "--flag=1", "-q"]) == status
    assert seen == [["--work", "w", "x", "--flag=1", "-q"]]  # every argument, unchanged
    assert message in capsys.readouterr().err


def test_beam_options_pass_through_in_both_forms():
    """The parsing ``capfilt bootstrap`` does: the command, then its own flags; the rest are Beam's."""
    argv = ["-v", "bootstrap", "--runner", "DaskRunner", "--dask_client_address", "tcp://127.0.0.1:8786",
            "--workers", "2", "--project=P", "--streaming", "--region", "europe-west4", "--threshold", "0.4"]
    args, rest = cli.build_parser(bootstrap_flags=False).parse_known_args(argv)
    assert args.command == "bootstrap" and args.verbose
    boot, unknown = cli.bootstrap_parser().parse_known_args(rest)
    assert (boot.runner, boot.workers, boot.threshold) == ("DaskRunner", 2, 0.4)
    assert cli.beam_options(unknown) == [
        "--dask_client_address=tcp://127.0.0.1:8786", "--project=P", "--streaming", "--region=europe-west4"]
    # The full parser (build_parser()) reads the same.
    full, full_unknown = cli.build_parser().parse_known_args(argv)
    assert full.runner == "DaskRunner" and cli.beam_options(full_unknown) == cli.beam_options(unknown)


def test_the_apitools_warning_is_dropped_and_nothing_else(caplog):
    cli.silence_beam_apitools_warning()
    cli.silence_beam_apitools_warning()  # once is enough; twice adds nothing
    assert sum(isinstance(f, cli._DropApitoolsWarning) for f in logging.getLogger().filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.warning("apitools not found, and bigquery client libraries are not available despite ...")
        logging.warning("another root warning")
        logging.getLogger("capfilt.somewhere").warning("apitools not found: a message of another logger")
    assert [r.getMessage() for r in caplog.records] == [
        "another root warning", "apitools not found: a message of another logger"]


def test_importing_beam_after_the_cli_prints_no_apitools_warning():
    code = ("import logging\nfrom capfilt import cli\nlogging.basicConfig()\ncli.silence_beam_apitools_warning()\n"
            "import apache_beam\nlogging.warning('still here')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "apitools" not in result.stderr and "still here" in result.stderr


def stats(web_kept, web_rejected, synthetic_kept, synthetic_rejected, duplicates=0):
    """Run stats with these counts; ``duplicates`` of the kept web texts were removed as duplicates instead."""
    return {"kept": {"web": web_kept - duplicates, "synthetic": synthetic_kept},
            "rejected": {"web": web_rejected + duplicates, "synthetic": synthetic_rejected},
            "rejected_reasons": {"below threshold": {"web": web_rejected, "synthetic": synthetic_rejected},
                                 "duplicate text": {"web": duplicates, "synthetic": 0}},
            "texts": {"web": web_kept + web_rejected, "synthetic": synthetic_kept + synthetic_rejected}}


def test_keep_share_warnings_per_source():
    from capfilt.pipelines.settings import BootstrapSettings

    settings = BootstrapSettings(threshold=0.5)
    assert recipe.keep_share_warnings(stats(600, 400, 500, 500), settings) == []
    assert recipe.keep_share_warnings(stats(0, 99, 99, 0), settings) == []  # too few texts to tell
    # The share is the filter's: texts removed as duplicates passed it.
    assert recipe.keep_share_warnings(stats(600, 400, 500, 500, duplicates=595), settings) == []
    (duplicates,) = recipe.keep_share_warnings(stats(1000, 0, 500, 500, duplicates=600), settings)
    assert "kept 100.0% of the 1000 web texts" in duplicates
    (low,) = recipe.keep_share_warnings(stats(0, 1000, 500, 500), settings)
    assert "kept 0.0% of the 1000 web texts" in low and "shapes world" in low and "--threshold 0.5" in low
    (captions,) = recipe.keep_share_warnings(stats(500, 500, 9, 991), settings)
    assert "synthetic captions" in captions and "captioner" in captions
    high = recipe.keep_share_warnings(stats(1000, 0, 995, 5), BootstrapSettings(threshold=0.0))
    assert len(high) == 2 and all("over 99%" in w and "--threshold 0.0" in w for w in high)
    # --strict: 4, after the statuses that ask for something else first (1: rerun, 3: replace damaged input).
    assert recipe.exit_status([], [], high) == recipe.EXIT_KEEP_SHARE == 4
    assert recipe.exit_status([], [], []) == 0
    assert recipe.exit_status(["00000"], [], high) == 1
    assert recipe.exit_status([], [{"shard": "00000"}], high) == 3


def test_a_run_that_keeps_everything_warns_and_fails_with_strict(captioner_folder, filter_folder, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.setattr(keep_share, "KEEP_SHARE_MIN_TEXTS", 4)  # a tiny run: 4 images
    common = ["bootstrap", "--out", str(tmp_path / "out"), "--captioner", str(captioner_folder),
              "--filter", str(filter_folder), "--demo-size", "4", "--demo-shard-size", "4", "--torch-threads", "1",
              "--threshold", "0"]
    assert cli.main(common) == 0  # a warning only
    err = capsys.readouterr().err
    assert "warning: the filter kept 100.0% of the 4 web texts" in err and "--threshold 0.0 is likely too low" in err
    assert "warning: the filter kept 100.0% of the 4 synthetic captions" in err
    assert pq.read_table(tmp_path / "out" / "kept").num_rows == 8
    assert cli.main([*common, "--strict"]) == 4  # the same finished run, judged strictly
    assert "warning: the filter kept 100.0%" in capsys.readouterr().err


def test_a_reader_that_leaves_early_is_no_error(tmp_path):
    """`capfilt datasets | head`: the reader is gone before capfilt writes; it ends quietly with status 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails: EPIPE, as after `head` has read its lines
    code = "import sys; from capfilt import cli; sys.exit(cli.main(['datasets', '--cache-dir', sys.argv[1]]))"
    writer = subprocess.run([sys.executable, "-c", code, str(tmp_path)], stdout=write_end, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    os.close(write_end)
    assert writer.returncode == 0 and "Traceback" not in writer.stderr, writer.stderr


def test_a_flag_neither_capfilt_nor_beam_knows_stops_the_run_before_it_starts(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["bootstrap", "--treshold", "0.9", "--captioner", "demo", "--filter", "demo", "--out", str(out)])
    assert code == 2 and not out.exists()  # nothing written: the job never started
    assert "unknown flag --treshold (did you mean --threshold?)" in capsys.readouterr().err


def test_beams_own_options_still_pass_through():
    cli.check_beam_options(["--project=P", "--region=europe-west4", "--temp_location=gs://b/t", "--streaming",
                            "--setup_file=./setup.py", "--sdk_container_image=img", "--direct_num_workers=2",
                            "--direct_running_mode=multi_processing", "--flink_master=h:8081"], "DataflowRunner")
    cli.check_beam_options(["--dask_client_address=tcp://h:8786", "--dask_npartitions=4"], "DaskRunner")
    with pytest.raises(cli.UsageError, match="--projcet"):
        cli.check_beam_options(["--projcet=P"], "DataflowRunner")


def test_bootstrap_help_names_the_families_defaults_without_importing_torch():
    """``capfilt bootstrap --help`` stays fast (no torch), and the defaults it quotes are the modules' own."""
    import subprocess
    import sys

    from capfilt import cli
    from capfilt.blip2 import LmSamplingSettings
    from capfilt.instructblip import CAPTION_INSTRUCTION

    code = ("import sys; from capfilt import cli; cli.bootstrap_parser().format_help(); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    lm = LmSamplingSettings()
    assert (cli.LM_MAX_LENGTH, cli.LM_MIN_LENGTH, cli.CAPTION_INSTRUCTION) == (lm.max_length, lm.min_length,
                                                                              CAPTION_INSTRUCTION)
    text = " ".join(cli.bootstrap_parser().format_help().split())
    for needed in ("--by {itm,itc}", "--instruction TEXT", "new tokens", "OPT-2.7b 15.5/7.7", "CLIP ViT-L/14 1.7"):
        assert needed in text, needed
