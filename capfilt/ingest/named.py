"""The named web datasets (``cc12m``, ``cc3m``, ``sbu``, ``laion400m``): where their URL lists live and how they are
laid out. A list is fetched from its public location into the cache folder when absent; offline, the error says
which file to put where.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


from capfilt.ingest.url_list import DatasetError, DatasetNotAvailableError

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("CAPFILT_CACHE", Path.home() / ".cache" / "capfilt")) / "datasets"


@dataclass(frozen=True)
class NamedDataset:
    """A public web dataset: where its URL list lives and how it is laid out."""

    name: str
    description: str
    files: tuple[tuple[str, str], ...]  # (public URL, file name in the cache)
    format: str
    url_col: str | int
    caption_col: str | int
    header: bool = True
    member: str | None = None  # the file to take out of a downloaded .tar.gz
    note: str = ""

    def folder(self, cache: Path) -> Path:
        return Path(cache) / self.name

    def local_paths(self, cache: Path) -> tuple[Path, ...]:
        if self.member:
            return (self.folder(cache) / self.member,)
        return tuple(self.folder(cache) / name for _, name in self.files)


_LAION_PART = "part-{:05d}-5b54c5d5-bbcf-484d-a2ce-0d6f73df1a36-c000.snappy.parquet"


_LAION_BASE = "https://the-eye.eu/public/AI/cah/laion400m-met-release/laion400m-meta/"


NAMED: dict[str, NamedDataset] = {
    d.name: d
    for d in (
        NamedDataset(
            "cc12m", "Conceptual 12M: ~12M pairs, TSV url<TAB>caption, no header",
            files=(("https://storage.googleapis.com/conceptual_12m/cc12m.tsv", "cc12m.tsv"),),
            format="tsv", url_col=0, caption_col=1, header=False,
        ),
        NamedDataset(
            "cc3m", "Conceptual Captions 3M (training split): TSV caption<TAB>url, no header",
            files=(("https://storage.googleapis.com/gcc-data/Train/GCC-training.tsv", "GCC-training.tsv"),),
            format="tsv", url_col=1, caption_col=0, header=False,
            note="Google may ask you to accept the dataset's terms first: "
                 "https://ai.google.com/research/ConceptualCaptions/download",
        ),
        NamedDataset(
            "sbu", "SBU Captions: ~1M pairs, a JSON object of lists (image_urls, captions) in a .tar.gz",
            files=(("https://www.cs.rice.edu/~vo9/sbucaptions/sbu-captions-all.tar.gz", "sbu-captions-all.tar.gz"),),
            format="json", url_col="image_urls", caption_col="captions", member="sbu-captions-all.json",
        ),
        NamedDataset(
            "laion400m", "LAION-400M metadata: 32 Parquet files with URL and TEXT columns",
            files=tuple((_LAION_BASE + _LAION_PART.format(i), _LAION_PART.format(i)) for i in range(32)),
            format="parquet", url_col="URL", caption_col="TEXT",
            note="LAION withdrew LAION-400M in 2023; if the files are gone, put any LAION-style Parquet "
                 "(URL, TEXT) there or pass its path as DATA",
        ),
    )
}


def ensure_named(spec: NamedDataset, cache: Path, fetch: bool = True) -> tuple[Path, ...]:
    """The local paths of a named dataset's URL list, fetched first when absent."""
    paths = spec.local_paths(cache)
    if all(p.is_file() for p in paths):
        return paths
    if not fetch:
        raise DatasetNotAvailableError(_not_available(spec, cache, "fetching is off (CAPFILT_OFFLINE=1)"))
    folder = spec.folder(cache)
    folder.mkdir(parents=True, exist_ok=True)
    for url, name in spec.files:
        target = folder / name
        if spec.member and (folder / spec.member).is_file():
            break
        if not target.is_file():
            try:
                fetch_file(url, target)
            except OSError as error:
                raise DatasetNotAvailableError(_not_available(spec, cache, f"fetching {url} failed: {error}")) from None
        if spec.member:
            _extract_member(target, spec.member, folder)
    return paths


def _not_available(spec: NamedDataset, cache: Path, why: str) -> str:
    places = "\n".join(f"  {url}\n    -> {spec.folder(cache) / name}" for url, name in spec.files[:3])
    more = f"\n  (+{len(spec.files) - 3} more files named like these)" if len(spec.files) > 3 else ""
    member = f"\nthen extract {spec.member} into {spec.folder(cache)}" if spec.member else ""
    note = f"\n{spec.note}" if spec.note else ""
    return (
        f"the URL list of {spec.name} is not on disk and {why}.\n"
        f"On a machine with internet, download\n{places}{more}{member}\n"
        f"and copy it there (or set CAPFILT_CACHE, or pass the file as DATA=/path/to/file).{note}"
    )


def fetch_file(url: str, target: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``target`` through a temporary name (no half file is ever left as ``target``)."""
    partial = target.with_name(target.name + ".partial")
    log.info("fetching %s -> %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _extract_member(archive: Path, member: str, folder: Path) -> Path:
    with tarfile.open(archive) as tar:
        entry = next((m for m in tar.getmembers() if Path(m.name).name == member and m.isfile()), None)
        if entry is None:
            raise DatasetError(f"{archive} has no {member}")
        partial = folder / (member + ".partial")
        with tar.extractfile(entry) as src, open(partial, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
    os.replace(partial, folder / member)
    return folder / member


def describe_named(cache: str | Path = DEFAULT_CACHE) -> str:
    """One line per named dataset: name, whether its URL list is on disk, what it is."""
    lines = [f"{'demo':10} {'built in':12} the shapes world's noisy web split, rendered locally"]
    for spec in NAMED.values():
        here = all(p.is_file() for p in spec.local_paths(Path(cache)))
        lines.append(f"{spec.name:10} {'on disk' if here else 'to fetch':12} {spec.description}  "
                     f"[{spec.folder(Path(cache))}]")
    return "\n".join(lines)
