"""The output folder, and how a shard's output is committed so that reruns are safe.

::

    OUT/
      kept/{shard}.parquet       kept (image, text) pairs, image bytes included
      rejected/{shard}.parquet   removed texts with their scores
      failed/{shard}.parquet     rows that could not be judged, with stage and error
      _done/{shard}.json         completion marker: the shard's stats
      _tmp/                      files being written (never read), and each running
                                 attempt's progress.json (rows read so far)
      stats.json, report.html    the whole run (see capfilt.report)

A shard's three files are written under ``_tmp/`` with a unique name, then
renamed to their final names, and only then is the marker written (itself
through a temporary name). A shard counts as done exactly when its marker
exists; a rerun skips those and redoes the others, overwriting whatever a
killed run left behind under the same deterministic names, so the end result
equals an uninterrupted run's. This replaces Beam's ``WriteToParquet``,
whose output appears all at once at the end of the job (a job killed at 99%
keeps nothing), and needs no shuffle of image bytes: each shard is read,
judged and written by one worker.
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from dataclasses import dataclass

from apache_beam.io.filesystems import FileSystems

log = logging.getLogger(__name__)

KEPT, REJECTED, FAILED = "kept", "rejected", "failed"
OUTPUTS = (KEPT, REJECTED, FAILED)
DONE, TMP = "_done", "_tmp"
STATS_FILE, REPORT_FILE, RUN_FILE = "stats.json", "report.html", "_run.json"
PROGRESS_FILE = "progress.json"  # in an attempt's temp folder: {"rows": rows read so far}; gone at commit


class SettingsMismatchError(ValueError):
    """An output folder that earlier runs filled with other settings."""


@dataclass(frozen=True)
class OutputLayout:
    """Paths under one output root (a local folder or a ``gs://``/``s3://`` prefix)."""

    root: str

    def _path(self, *parts: str) -> str:
        return FileSystems.join(self.root.rstrip("/"), *parts)

    def output(self, kind: str, shard_id: str) -> str:
        return self._path(kind, f"{shard_id}.parquet")

    def marker(self, shard_id: str) -> str:
        return self._path(DONE, f"{shard_id}.json")

    @property
    def stats_file(self) -> str:
        return self._path(STATS_FILE)

    @property
    def report_file(self) -> str:
        return self._path(REPORT_FILE)

    def temp_dir(self, shard_id: str) -> str:
        """A fresh folder for one attempt at a shard (concurrent attempts never collide)."""
        return self._path(TMP, f"{shard_id}-{uuid.uuid4().hex[:12]}")

    def progress_files(self) -> dict[str, str]:
        """The progress file of every attempt in ``_tmp/``, by path -> its shard id."""
        files = _glob(self._path(TMP, "*", PROGRESS_FILE))
        return {path: posixpath.basename(posixpath.dirname(path)).rsplit("-", 1)[0] for path in files}

    def is_done(self, shard_id: str) -> bool:
        return FileSystems.exists(self.marker(shard_id))

    def _marker_paths(self) -> list[str]:
        return _glob(self._path(DONE, "*.json"))

    def done_ids(self) -> set[str]:
        return {posixpath.basename(p)[: -len(".json")] for p in self._marker_paths()}

    def read_markers(self) -> list[dict]:
        """Every finished shard's stats, sorted by shard id."""
        markers = []
        for path in self._marker_paths():
            with FileSystems.open(path) as f:
                markers.append(json.loads(f.read()))
        return sorted(markers, key=lambda m: m["shard"])

    def commit(self, shard_id: str, temp_files: dict[str, str], marker: dict) -> None:
        """Move a shard's finished files into place, then write its marker: the shard is done."""
        if set(temp_files) != set(OUTPUTS):
            raise ValueError(f"a shard commits {OUTPUTS}, got {sorted(temp_files)}")
        for kind in OUTPUTS:
            _ensure_dir(self._path(kind))
        finals = [self.output(kind, shard_id) for kind in OUTPUTS]
        existing = [path for path in finals if FileSystems.exists(path)]
        if existing:  # left by a killed attempt (and some filesystems' rename will not overwrite)
            FileSystems.delete(existing)
        FileSystems.rename([temp_files[kind] for kind in OUTPUTS], finals)
        temp_marker = posixpath.join(posixpath.dirname(temp_files[KEPT]), "marker.json")
        write_text(temp_marker, json.dumps(marker, sort_keys=True))
        _ensure_dir(self._path(DONE))
        FileSystems.rename([temp_marker], [self.marker(shard_id)])
        remove_progress(posixpath.dirname(temp_files[KEPT]))  # explicitly: object stores keep "folders"' objects
        _delete_quietly(posixpath.dirname(temp_files[KEPT]))

    def claim(self, settings: dict) -> None:
        """Record the run's settings in ``_run.json``, or check them against an earlier run's.

        Resuming is only sound with the same settings: finished shards are
        skipped, so a changed threshold or model would mix two runs' outputs.
        """
        path = self._path(RUN_FILE)
        if FileSystems.exists(path):
            earlier = json.loads(read_text(path))
            if earlier != settings:
                changed = sorted(k for k in set(earlier) | set(settings) if earlier.get(k) != settings.get(k))
                raise SettingsMismatchError(
                    f"{self.root} holds the output of a run with other settings (changed: {', '.join(changed)}); "
                    "resume with the same settings or write to a new output folder"
                )
            return
        write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")

    def clean_temp(self) -> None:
        """Remove what unfinished attempts left under ``_tmp/``."""
        _delete_quietly(self._path(TMP))


def write_text(path: str, text: str) -> None:
    with FileSystems.create(path) as f:
        f.write(text.encode("utf-8"))


def read_text(path: str) -> str:
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


def progress_path(temp_dir: str) -> str:
    """The progress file of the attempt writing into ``temp_dir``."""
    return FileSystems.join(temp_dir, PROGRESS_FILE)


def remove_progress(temp_dir: str) -> None:
    """Remove an attempt's progress file (when it commits or fails), so that ``Progress`` stops counting it."""
    _delete_quietly(progress_path(temp_dir))


def _glob(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _ensure_dir(path: str) -> None:
    if "://" in path:  # object stores have no folders
        return
    if not FileSystems.exists(path):
        try:
            FileSystems.mkdirs(path)
        except OSError:  # made meanwhile by another worker
            pass


def _delete_quietly(path: str) -> None:
    try:
        if FileSystems.exists(path):
            FileSystems.delete([path])
    except OSError as error:
        log.warning("could not delete %s: %s", path, error)
