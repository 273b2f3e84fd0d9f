"""One help style: each command's --help names the program a user types and shows every default it has."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from capfilt import cli

# (what a user types, how its help is asked for, the module and its parser function)
COMMANDS = [
    ("capfilt train", ["train", "pretrain", "--help"], "capfilt.models.train", "_parser"),
    ("capfilt evaluate", ["evaluate", "--help"], "capfilt.recipes.evaluate", "build_parser"),
    ("capfilt shapes", ["shapes", "--help"], "capfilt.shapes.__main__", "build_parser"),
    ("capfilt export", ["export", "--help"], "capfilt.models.export", "build_parser"),
    ("capfilt demo-models", ["demo-models", "--help"], "capfilt.recipes.demo", "build_parser"),
    ("capfilt experiment", ["experiment", "--help"], "capfilt.recipes.experiment", "build_parser"),
    ("python -m capfilt.recipes.loop_report", None, "capfilt.recipes.loop_report", "build_parser"),
    ("python -m capfilt.models.average", None, "capfilt.models.average", "build_parser"),
]


def _help(argv: list[str] | None, module, capsys) -> str:
    """The help text as the command prints it, whitespace-normalised (argparse wraps lines)."""
    if argv is None:  # run as python -m: the module's own main
        with pytest.raises(SystemExit) as done:
            module.main(["--help"])
        assert done.value.code == 0
    else:
        assert cli.main(argv) == 0
    return " ".join(capsys.readouterr().out.split())


def _shown(default) -> list[str]:
    """How a default may read in the help: as argparse prints it, or a list as its words."""
    forms = [str(default)]
    if isinstance(default, list | tuple):
        forms.append(" ".join(map(str, default)))
    return forms


def _defaults(parser: argparse.ArgumentParser) -> dict[str, object]:
    """Every flag's default that the parser's help must show (not None, False, "" or a suppressed one)."""
    unshown = (None, False, argparse.SUPPRESS)
    return {action.dest: action.default for action in parser._actions if action.help != argparse.SUPPRESS
            and not any(action.default is value for value in unshown) and action.default != ""}


@pytest.mark.parametrize("program, argv, module_name, parser_name", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_names_the_real_program_and_shows_every_default(program, argv, module_name, parser_name, capsys,
                                                             monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per flag: a default is never cut by wrapping
    module = importlib.import_module(module_name)
    text = _help(argv, module, capsys)
    assert text.startswith(f"usage: {program} ")
    for flag, default in _defaults(getattr(module, parser_name)()).items():
        assert any(form in text for form in _shown(default)), (flag, default)
    assert "(default: None)" not in text


def test_each_shapes_subcommand_shows_its_defaults(capsys, monkeypatch):
    from capfilt.shapes.__main__ import build_parser
    from capfilt.shapes.writer import DEFAULT_SHARD_SIZE

    monkeypatch.setenv("COLUMNS", "2000")
    (commands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    for name, parser in commands.choices.items():
        assert cli.main(["shapes", name, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert text.startswith(f"usage: capfilt shapes {name}")
        for flag, default in _defaults(parser).items():
            assert f"(default: {default})" in text, (name, flag)
        if name == "write":
            assert f"pairs per shard (default: {DEFAULT_SHARD_SIZE})" in text and "(default: jpg)" in text
            assert "(default: 0)" in text  # --seed


def test_evaluate_help_shows_its_defaults(capsys, monkeypatch):
    from capfilt.recipes.evaluate import EVALUATION_SEED

    monkeypatch.setenv("COLUMNS", "2000")
    assert cli.main(["evaluate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "web pairs to score / scenes to caption (default: 1000)" in text
    assert f"seed of the fresh web split (default: {EVALUATION_SEED})" in text


@pytest.mark.parametrize("argv", [["shapes", "write", "--help"], ["shapes", "vocab"], ["bootstrap", "--help"],
                                  ["refilter", "--help"], ["train", "pretrain", "--help"], ["--help"],
                                  ["evaluate", "--help"], ["export", "--help"], ["demo-models", "--help"],
                                  ["experiment", "--help"], ["export-dataset", "--help"], ["datasets", "--help"]])
def test_help_imports_no_torch(argv):
    code = ("import sys\nfrom capfilt import cli\n"
            f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("module", ["capfilt.recipes.loop_report", "capfilt.models.average"])
def test_python_m_commands_help_imports_no_torch(module):
    code = (f"import sys\nimport {module} as command\n"
            "try:\n    command.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'pyarrow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "[]"
