"""`capfilt evaluate`: no model is a usage error, a wrong one a one-line error, and each stage shows progress."""

from __future__ import annotations

import io
import json

from capfilt import cli, console_progress


def test_no_model_is_a_usage_error_that_says_what_to_give(capsys):
    assert cli.main(["evaluate"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "usage: capfilt evaluate" in captured.err
    assert "nothing to evaluate: give --captioner MODEL and/or --filter MODEL" in captured.err


def test_a_model_that_is_not_there_is_one_line_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "no-such-filter"
    assert cli.main(["evaluate", "--filter", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capfilt evaluate: error: ") and str(missing) in err and "Traceback" not in err


def test_each_stage_shows_its_progress_as_plain_lines_off_a_terminal(tmp_path, capsys):
    results = tmp_path / "results.json"
    assert cli.main(["evaluate", "--captioner", "demo", "--filter", "demo", "--n", "12", "--methods", "greedy",
                     "--device", "cpu", "--json", str(results)]) == 0
    captured = capsys.readouterr()
    assert "| web-text kind |" in captured.out  # the table still goes to stdout, alone
    assert "\r" not in captured.err  # a log stays readable: no bar redrawn in place
    lines = captured.err.splitlines()
    two_objects = json.loads(results.read_text())["relation"]["n"]
    for stage, total in (("rendering 12 web pairs", 12), ("filter, web texts", 12), ("captioner, greedy", 12),
                         ("filter, two-object swaps", two_objects), ("captioner, relation", two_objects)):
        mine = [line for line in lines if line.startswith(stage)]
        assert f": 0/{total} pairs, 0%" in mine[0], stage  # a line as the stage starts ...
        assert f": {total}/{total} pairs, 100%" in mine[-1], stage  # ... and one as it ends


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_progress_is_a_tqdm_bar(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with console_progress.progress(3, "scoring") as advance:
        for _ in range(3):
            advance(1)
    assert "\r" in terminal.getvalue() and "scoring: 100%" in terminal.getvalue()


def test_without_a_name_progress_shows_nothing(capsys):
    with console_progress.progress(3, None) as advance:
        advance(3)
    assert capsys.readouterr() == ("", "")
