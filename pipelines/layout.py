"""The output folder, and how a shard's output is committed so that reruns are safe.

::

    OUT/
      README.md                  the dataset card: its configs open kept/ (default), rejected/, failed/ with HF
                                 datasets (capfilt.pipelines.dataset_card)
      kept/{shard}.parquet       kept (image, text) pairs, image bytes included
      rejected/{shard}.parquet   removed texts with their scores
      failed/{shard}.parquet     rows that could not be judged, with stage and error
      .capfilt/done/{shard}.json     completion marker: the shard's stats
      .capfilt/done/{shard}.keys     the 64-bit hashes of the shard's keys (duplicate keys across shards)
      .capfilt/done/{shard}.images   the 64-bit hashes of its images with a kept text (duplicate images across
                                     shards)
      .capfilt/done/{shard}.dedup    --dedup-images: the rows moved from kept/ to rejected/ at a run's end
                                     because an earlier shard kept the same image (capfilt.pipelines.image_dedup)
      .capfilt/tmp/{run}/        one folder per job: its run.json (host, pid), and per
                                 attempt at a shard a folder of files being written
                                 (never read) with its progress.json (rows read so far)
      stats.json, report.html    the whole run (see capfilt.pipelines.report)
      _run.json                  the run's settings (``claim``)

The bookkeeping lives under ``.capfilt/``: a name starting with a dot, which HF datasets' default globbing
(``load_dataset("parquet", data_dir=OUT)``, a card's patterns) and shell globs skip, so that no loader takes a
marker or a half-written file for data. Outputs of schema version 4 and earlier kept their markers in ``_done/``
(``LEGACY_DONE``; temporary files in ``_tmp/``, never read): ``OutputLayout.existing`` reads them where they are, so
that ``capfilt refilter`` takes such a folder as its source and writes it anew in this layout. A bootstrap rerun
into one is refused (``claim``: its kept/ lacks version 5's columns, and one folder holds one schema).

A shard's three files are written under ``.capfilt/tmp/`` with a unique name, then
renamed to their final names, and only then is the marker written (itself
through a temporary name). A shard counts as done exactly when its marker
exists; a rerun skips those and redoes the others, overwriting whatever a
killed run left behind under the same deterministic names, so the end result
equals an uninterrupted run's. This replaces Beam's ``WriteToParquet``,
whose output appears all at once at the end of the job (a job killed at 99%
keeps nothing), and needs no shuffle of image bytes: each shard is read,
judged and written by one worker.

Jobs sharing an output folder. Each job (``start_run``) writes only under
its own ``.capfilt/tmp/{run}/`` and removes only that folder when it ends
(``end_run``); an attempt that fails removes its own files at once. So two
jobs may run at the same time on one OUT: on disjoint shard sets, or even on
the same shard (both write the same rows; the second commit replaces the
first's identical files, and a shard done meanwhile is skipped). A job with
other settings is refused by ``_run.json`` (``claim``). What a killed job
left in ``.capfilt/tmp/`` is removed by the next job that can tell it is dead
(``sweep_temp``: a job on a local runner on this machine whose process is
gone); any other job's folder is left alone and listed in a warning, to be
deleted by hand once that job is over. Leftovers are never read.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace

from apache_beam.io.filesystems import FileSystems

from capfilt.pipelines import paths
from capfilt.pipelines.paths import glob_in

log = logging.getLogger(__name__)

KEPT, REJECTED, FAILED = "kept", "rejected", "failed"
OUTPUTS = (KEPT, REJECTED, FAILED)
INTERNAL = ".capfilt"  # capfilt's own files: hidden from loaders' globs (the module's docstring)
DONE, TMP = f"{INTERNAL}/done", f"{INTERNAL}/tmp"
LEGACY_DONE = "_done"  # the markers' folder up to schema version 4
STATS_FILE, REPORT_FILE, RUN_FILE = "stats.json", "report.html", "_run.json"
PROGRESS_FILE = "progress.json"  # in an attempt's temp folder: {"rows": rows read so far}; gone at commit
RUN_INFO = "run.json"  # in a job's temp folder: who runs it (host, pid, whether its workers run on that host)
KEYS_SUFFIX = ".keys"  # beside a marker: the shard's key hashes (capfilt.pipelines.stats.KeyTally)
IMAGES_SUFFIX = ".images"  # beside a marker: the hashes of the shard's images with a kept text (stats.HashTally)
DEDUP_SUFFIX = ".dedup"  # beside a marker: JSON, the rows moved by the cross-shard image dedup (image_dedup)


class SettingsMismatchError(ValueError):
    """An output folder that earlier runs filled with other settings."""


@dataclass(frozen=True)
class OutputLayout:
    """Paths under one output root (a local folder or a ``gs://``/``s3://`` prefix)."""

    root: str
    run: str = ""  # the job's id (``start_run``): its attempts write under .capfilt/tmp/{run}/
    done: str = DONE  # the markers' folder: LEGACY_DONE for an output of schema version 4 read as is (``existing``)

    @classmethod
    def existing(cls, root: str) -> OutputLayout:
        """The layout of an output folder to read: its markers where they are, in ``.capfilt/done/`` or (written
        by capfilt of schema version 4 or earlier) in ``_done/``."""
        if not glob_in(root, DONE, "*.json") and glob_in(root, LEGACY_DONE, "*.json"):
            return cls(root, done=LEGACY_DONE)
        return cls(root)

    def _path(self, *parts: str) -> str:
        return FileSystems.join(self.root.rstrip("/"), *parts)

    def output(self, kind: str, shard_id: str) -> str:
        return self._path(kind, f"{shard_id}.parquet")

    def marker(self, shard_id: str) -> str:
        return self._path(self.done, f"{shard_id}.json")

    @property
    def stats_file(self) -> str:
        return self._path(STATS_FILE)

    @property
    def report_file(self) -> str:
        return self._path(REPORT_FILE)

    def keys_file(self, shard_id: str) -> str:
        return self._path(self.done, f"{shard_id}{KEYS_SUFFIX}")

    def images_file(self, shard_id: str) -> str:
        return self._path(self.done, f"{shard_id}{IMAGES_SUFFIX}")

    def dedup_file(self, shard_id: str) -> str:
        return self._path(self.done, f"{shard_id}{DEDUP_SUFFIX}")

    def temp_dir(self, shard_id: str) -> str:
        """A fresh folder for one attempt at a shard, in the job's own folder (concurrent attempts never collide)."""
        return self._path(TMP, self.run or "norun", f"{shard_id}-{uuid.uuid4().hex[:12]}")

    def progress_files(self) -> dict[str, str]:
        """The progress file of every attempt of every job in ``_tmp/``, by path -> its shard id."""
        files = glob_in(self.root, TMP, "*", "*", PROGRESS_FILE)
        return {path: posixpath.basename(posixpath.dirname(path)).rsplit("-", 1)[0] for path in files}

    def start_run(self, local: bool) -> OutputLayout:
        """This layout for a new job: its own ``_tmp/{run}/``, with ``run.json`` saying who runs it.

        ``local``: the job's workers run on this machine and end with this process (a local runner, or a Dask
        cluster started by this process), so that a later job can tell from the pid that this one is dead.
        """
        layout = replace(self, run=f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        info = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                "local": local, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_text(layout._path(TMP, layout.run, RUN_INFO), json.dumps(info, sort_keys=True))
        return layout

    def end_run(self) -> None:
        """Remove this job's temporary folder (only its own: other jobs may be writing to this OUT)."""
        if self.run:
            _delete_tree(self._path(TMP, self.run))
        _remove_empty_dir(self._path(TMP))

    def discard(self, temp_dir: str) -> None:
        """Remove a failed attempt's files now rather than at the job's end."""
        _delete_quietly(temp_dir)

    def sweep_temp(self) -> list[str]:
        """Remove the temporary folders of jobs that are provably dead; return the other jobs' folders left alone.

        Provably dead: its ``run.json`` says its workers ran on this host with its process, and no process with
        that pid (and start time) is alive. Anything else (a job on another machine or a remote runner, running
        or killed; a folder without ``run.json``) is listed in a warning and left for a person to delete.
        """
        tmp = self._path(TMP)
        files = glob_in(self.root, TMP, "*", RUN_INFO) + glob_in(self.root, TMP, "*", "*", "*")  # run.json, attempts'
        runs = sorted({path[len(tmp):].lstrip("/").split("/")[0] for path in files} - {self.run})
        others = []
        for name in runs:
            folder = self._path(TMP, name)
            info_path = FileSystems.join(folder, RUN_INFO)
            try:
                info = json.loads(read_text(info_path)) if FileSystems.exists(info_path) else None
            except (OSError, ValueError):  # being written
                info = None
            if isinstance(info, dict) and _this_process(info):  # this job's own (it holds OUT while it runs)
                continue
            if isinstance(info, dict) and _dead_local_job(info):
                log.info("removing %s, left by a killed job (pid %s on this host)", folder, info.get("pid"))
                _delete_tree(folder)
            else:
                others.append(folder)
        if others:
            log.warning("%d temporary folder(s) of other jobs in %s (running now, or killed on another machine or "
                        "runner): %s. They are never read; delete them once those jobs are over",
                        len(others), self._path(TMP), ", ".join(others[:5]) + (" ..." if len(others) > 5 else ""))
        return others

    def is_done(self, shard_id: str) -> bool:
        return FileSystems.exists(self.marker(shard_id))

    def _marker_paths(self) -> list[str]:
        return glob_in(self.root, self.done, "*.json")

    def done_ids(self) -> set[str]:
        return {posixpath.basename(p)[: -len(".json")] for p in self._marker_paths()}

    def read_markers(self) -> list[dict]:
        """Every finished shard's stats, sorted by shard id."""
        markers = []
        for path in self._marker_paths():
            with FileSystems.open(path) as f:
                markers.append(json.loads(f.read()))
        return sorted(markers, key=lambda m: m["shard"])

    def commit(self, shard_id: str, temp_files: dict[str, str], marker: dict, keys: bytes | None = None,
               images: bytes | None = None) -> None:
        """Move a shard's finished files (and its key and image hashes) into place, then write its marker: the
        shard is done. A cross-shard dedup record of an earlier commit of the shard goes: it was about those files."""
        if set(temp_files) != set(OUTPUTS):
            raise ValueError(f"a shard commits {OUTPUTS}, got {sorted(temp_files)}")
        for kind in OUTPUTS:
            _ensure_dir(self._path(kind))
        folder = posixpath.dirname(temp_files[KEPT])
        sources = [temp_files[kind] for kind in OUTPUTS]
        finals = [self.output(kind, shard_id) for kind in OUTPUTS]
        for name, data, final in (("keys.bin", keys, self.keys_file(shard_id)),
                                  ("images.bin", images, self.images_file(shard_id))):
            if data is None:
                continue
            _ensure_dir(self._path(self.done))
            sources.append(FileSystems.join(folder, name))
            finals.append(final)
            with FileSystems.create(sources[-1]) as f:
                f.write(data)
        existing = [path for path in finals + [self.dedup_file(shard_id)] if FileSystems.exists(path)]
        if existing:  # left by a killed attempt (and some filesystems' rename will not overwrite)
            paths.delete(existing)
        FileSystems.rename(sources, finals)
        temp_marker = posixpath.join(folder, "marker.json")
        write_text(temp_marker, json.dumps(marker, sort_keys=True))
        _ensure_dir(self._path(self.done))
        FileSystems.rename([temp_marker], [self.marker(shard_id)])
        remove_progress(folder)  # explicitly: object stores keep "folders"' objects
        _delete_quietly(folder)

    def write_atomically(self, path: str, text: str) -> None:
        """Write ``path`` through a temporary name: readers (and a job writing it at the same time) never see half."""
        temp = self._path(TMP, self.run or "norun", f"{uuid.uuid4().hex[:12]}-{posixpath.basename(path)}")
        write_text(temp, text)
        try:
            FileSystems.rename([temp], [path])  # replaces the file (a POSIX rename; an object store's copy)
        except OSError:  # a filesystem whose rename will not overwrite
            _delete_quietly(path)
            FileSystems.rename([temp], [path])

    def read_key_hashes(self, shard_ids: list[str]) -> Iterator[tuple[str, bytes]]:
        """Each finished shard's key hashes file (``capfilt.pipelines.stats.KeyTally``), where it has one."""
        return self._read_each(shard_ids, self.keys_file)

    def read_image_hashes(self, shard_ids: list[str]) -> Iterator[tuple[str, bytes]]:
        """Each finished shard's image hashes file (its images with a kept text), where it has one."""
        return self._read_each(shard_ids, self.images_file)

    @staticmethod
    def _read_each(shard_ids: list[str], path_of) -> Iterator[tuple[str, bytes]]:
        for shard_id in shard_ids:
            path = path_of(shard_id)
            if FileSystems.exists(path):
                with FileSystems.open(path) as f:
                    yield shard_id, f.read()

    def replace_files(self, sources: list[str], finals: list[str]) -> None:
        """Rename finished temporary files over existing ones, one by one (each replacement is atomic where the
        filesystem's rename is)."""
        for source, final in zip(sources, finals):
            try:
                FileSystems.rename([source], [final])
            except OSError:  # a filesystem whose rename will not overwrite
                _delete_quietly(final)
                FileSystems.rename([source], [final])

    def commit_damaged(self, shard_id: str, marker: dict) -> None:
        """Mark done a shard of which nothing could be read: it has no output files (a killed attempt's go)."""
        stale = [self.output(kind, shard_id) for kind in OUTPUTS] + [self.keys_file(shard_id),
                                                                     self.images_file(shard_id),
                                                                     self.dedup_file(shard_id)]
        existing = [path for path in stale if FileSystems.exists(path)]
        if existing:
            paths.delete(existing)
        folder = self.temp_dir(shard_id)
        temp_marker = FileSystems.join(folder, "marker.json")
        write_text(temp_marker, json.dumps(marker, sort_keys=True))
        _ensure_dir(self._path(self.done))
        FileSystems.rename([temp_marker], [self.marker(shard_id)])
        _delete_quietly(folder)

    def claim(self, settings: dict) -> None:
        """Record the run's settings in ``_run.json``, or check them against an earlier run's (``check_claim``).

        Resuming is only sound with the same settings: finished shards are
        skipped, so a changed threshold or model would mix two runs' outputs.
        """
        if not self.check_claim(settings):
            write_text(self._path(RUN_FILE), json.dumps(settings, indent=2, sort_keys=True) + "\n")

    def check_claim(self, settings: dict) -> bool:
        """Whether an earlier run recorded these settings here (False: none did); a ``SettingsMismatchError`` when
        it recorded others, or when this output cannot be claimed. Reads only."""
        if paths.is_remote(self.root) and paths.has_wildcards(self.root):
            raise SettingsMismatchError(f"{self.root}: an output prefix on an object store cannot hold * ? [ (Beam "
                                        "reads them as wildcards, and a rerun could not delete its own files)")
        path = self._path(RUN_FILE)
        if not FileSystems.exists(path):
            return False
        earlier = {**SETTINGS_BEFORE_FAMILIES, **json.loads(read_text(path))}
        now = {**SETTINGS_BEFORE_FAMILIES, **settings}
        if earlier == now:
            return True
        if self._unused():  # a run that stopped before any shard was done (a model that failed to load): no mix
            log.info("%s: no shard was done with its recorded settings; claiming it with these", self.root)
            return False
        old, new = earlier.get("schema_version"), settings.get("schema_version")
        if old != new:
            raise SettingsMismatchError(
                f"{self.root} holds output of schema version {old}, this capfilt writes version {new} (the versions "
                "are listed in capfilt/pipelines/schema.py): finish it with the capfilt that made it, or write to a "
                "new output folder; `capfilt refilter --from OUT --out NEW --threshold T` rewrites its finished "
                "shards in this version without running the models")
        changed = sorted(k for k in set(earlier) | set(now) if earlier.get(k) != now.get(k))
        hint = ""
        if set(changed) <= REFILTER_SETTINGS and settings.get("threshold") is not None:
            hint = (f"; or split it anew from its stored scores, without running the models: capfilt refilter "
                    f"--from {self.root} --out NEW --threshold {settings.get('threshold')}" +
                    "".join(f" {_refilter_flag(k, settings.get(k))}" for k in changed if k != "threshold"))
        raise SettingsMismatchError(
            f"{self.root} holds the output of a run with other settings (changed: {', '.join(changed)}); "
            f"resume with the same settings or write to a new output folder{hint}")

    def _unused(self) -> bool:
        """No shard is done here (in this layout or schema 4's) and no other job that may be alive writes here."""
        if glob_in(self.root, DONE, "*.json") or glob_in(self.root, LEGACY_DONE, "*.json"):
            return False
        for info_path in glob_in(self.root, TMP, "*", RUN_INFO):
            try:
                info = json.loads(read_text(info_path))
            except (OSError, ValueError):  # being written: a job is starting
                return False
            if not (isinstance(info, dict) and _dead_local_job(info)):
                return False
        return True


# Settings that ``capfilt refilter`` changes from stored scores (the changed-settings error names it for them).
REFILTER_SETTINGS = {"threshold", "by", "select", "dedup_images"}
# What a run recorded in _run.json before these settings existed meant: BLIP models, judged by ITM.
SETTINGS_BEFORE_FAMILIES = {"by": "itm", "captioner_family": "blip", "filter_family": "blip"}


def _refilter_flag(name: str, value) -> str:
    if name == "dedup_images":
        return "--dedup-images" if value else "--no-dedup-images"
    return f"--{name.replace('_', '-')} {value}"


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


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _this_process(info: dict) -> bool:
    """Whether a job's ``run.json`` is this very process's."""
    return info.get("host") == socket.gethostname() and info.get("pid") == os.getpid() and \
        info.get("process_start") == _process_start(os.getpid())


def _dead_local_job(info: dict) -> bool:
    """Whether the job ``run.json`` describes ran on this host with its workers and its process is gone."""
    if not info.get("local") or info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    pid = info["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    started = _process_start(pid)
    return started is not None and info.get("process_start") is not None and started != info["process_start"]


def _delete_tree(folder: str) -> None:
    """Remove a job's temporary folder: on object stores its files one by one (a job's folder is two deep)."""
    if "://" in folder:
        files = glob_in(folder, "*") + glob_in(folder, "*", "*")
        if files:
            try:
                paths.delete(files)
            except OSError as error:
                log.warning("could not delete %s: %s", folder, error)
    _delete_quietly(folder)


def _remove_empty_dir(path: str) -> None:
    """Remove a local folder if it is empty (another job may have put its folder there meanwhile)."""
    if "://" in path:  # object stores have no folders
        return
    try:
        os.rmdir(path)
    except OSError:
        pass


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
            paths.delete([path])
    except OSError as error:
        log.warning("could not delete %s: %s", path, error)
