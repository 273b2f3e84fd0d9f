"""Listing and deleting files under a folder whose own name is literal: ``[1]``, ``*`` or ``?`` in OUT or an input
folder.

Beam's ``FileSystems.match`` reads every ``*``, ``?`` and ``[`` of its pattern as a wildcard and has no way to
quote them (``FileSystem.translate_pattern``), so ``out[1]/.capfilt/done/*.json`` would look for ``out1/...`` and find
nothing. ``glob_in(folder, *parts)`` keeps ``folder`` literal and lets only ``parts`` hold wildcards:

- a local folder is listed with the standard library's ``glob`` after ``glob.escape(folder)``;
- a remote one (``gs://``, ``s3://``) goes through ``FileSystems.match`` with each wildcard character of
  ``folder`` written as a one-character class (``[*]``, ``[?]``; ``[][]`` for ``[``, which also admits ``]``:
  ``[[]`` would be a "possible nested set" to Python's ``re``), and the matches are then kept only where they
  start with ``folder`` itself. The listing starts at the text before the first such character (Beam's prefix
  rule), which can list more objects than the folder holds; the result is exact all the same.
"""

from __future__ import annotations

import glob
import os
import shutil

from apache_beam.io.filesystems import FileSystems

WILDCARDS = "*?["


def is_remote(path: str) -> bool:
    """A ``scheme://`` path, read through Beam's filesystems; anything else is a local path."""
    return "://" in path


def has_wildcards(path: str) -> bool:
    return any(ch in path for ch in WILDCARDS)


def escape_for_beam(path: str) -> str:
    """``path`` as a Beam match pattern that matches ``path`` (and the same path with ``]`` for any ``[``)."""
    return "".join("[][]" if ch == "[" else f"[{ch}]" if ch in WILDCARDS else ch for ch in path)


def glob_in(folder: str, *parts: str) -> list[str]:
    """The files matching ``folder/part/part...`` (wildcards in ``parts`` only), sorted."""
    if is_remote(folder):
        folder = folder.rstrip("/")
        pattern = FileSystems.join(escape_for_beam(folder), *parts)
        matches = FileSystems.match([pattern])[0].metadata_list
        return sorted(m.path for m in matches if m.path.startswith(folder + "/"))
    pattern = os.path.join(glob.escape(folder), *parts)
    return sorted(path for path in glob.glob(pattern) if os.path.isfile(path))


def delete(paths: list[str]) -> None:
    """Delete these files or folders (folders with what they hold), each path taken literally.

    Beam's ``FileSystems.delete`` matches its arguments as patterns (locally and on GCS): ``out[1]`` would delete
    ``out1``. Local paths are deleted here; remote ones go to Beam, and one with a wildcard character is refused
    (``OutputLayout.claim`` refuses such an output prefix before anything is written).
    """
    remote = [path for path in paths if is_remote(path)]
    if any(has_wildcards(path) for path in remote):
        raise ValueError(f"cannot delete {[p for p in remote if has_wildcards(p)]} exactly: Beam reads * ? [ in an "
                         "object's name as wildcards")
    if remote:
        FileSystems.delete(remote)
    for path in paths:
        if is_remote(path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
