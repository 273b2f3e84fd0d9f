"""Counts of one shard, and of a whole run as the sum of its shards' counts.

Every input row ends in exactly one of: a judged image (its web text and K
synthetic captions each kept or rejected) or a failed row. ``check`` states
that accounting as arithmetic, so a shard that loses a row cannot be marked
done.

Duplicate keys. Each shard counts the rows whose key it has already seen
(``HashTally``) and stores the sorted 64-bit hashes (BLAKE2b) of its distinct
keys beside its marker (``.capfilt/done/{shard}.keys``, 8 bytes per key). The run's
summary counts the keys that also occur in another shard from those files
(``duplicates_across``): it holds two arrays of 8 bytes per distinct
(shard, key), about 200 MB for 1,200 shards of 10,000 rows, never the keys
themselves. Two different keys share a hash with probability about n²/2⁶⁵
(4·10⁻⁶ for 12 million keys).

Duplicate images, the same way: an image counts once it has a kept text;
each shard counts the images whose bytes (SHA-256) it has already kept
(``ImageTally``, rule 4 of ``capfilt.pipelines.selection``) and stores its
kept images' 64-bit hashes (the SHA-256's first 8 bytes) in
``.capfilt/done/{shard}.images``, which both the summary's count across shards and
``--dedup-images``' drop across shards (``capfilt.pipelines.image_dedup``) read.

Texts are counted in bulk (``ShardStats.add_texts``: each text's source, the
score the run judges by and outcome code from ``capfilt.pipelines.selection``),
by the pipeline a batch at a time and by ``capfilt refilter`` a shard at a time.

The histogram is of the score that judged (``by``): a run by ITM writes it as
``itm_histogram`` (the ITM match probability on [0, 1]); a run by ITC as
``score_histogram``, ``{"score": "itc", "range": [-1.0, 1.0], "web": [...],
"synthetic": [...]}`` (the cosine similarity); both ``HISTOGRAM_BINS`` bins of
equal width, the top of the range in the last bin.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from capfilt.pipelines.schema import BELOW_THRESHOLD, DUPLICATE_TEXT, REASONS, SOURCES, STAGES, SYNTHETIC, WEB
from capfilt.pipelines.selection import BY_ITM, CODES, KEPT_CODE, SCORE_RANGES

HISTOGRAM_BINS = 20  # ITM match probability in [0, 1]: bins of 0.05; ITC cosine in [-1, 1]: bins of 0.1
MAX_SAMPLES_PER_CELL = 3  # report examples per (source, kept/removed) and shard: the first ones in row order
MAX_KEY_EXAMPLES = 5  # duplicate keys (and images) named per shard, and per run
KEY_HASH_DTYPE = np.dtype("<u8")  # the key (and image) hashes files: little-endian uint64, sorted, distinct


def key_hash(key: str) -> int:
    """A key's 64-bit hash, the same in every process and on every machine."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def image_hash(sha256_hex: str) -> int:
    """An image's 64-bit hash: the first 8 bytes of its SHA-256 (``image_sha256``, hex), little-endian."""
    return int.from_bytes(bytes.fromhex(sha256_hex[:16]), "little")


def itm_bins(itm) -> np.ndarray:
    """Each ITM match probability's histogram bin: [0, 1] in ``HISTOGRAM_BINS`` bins of equal width, 1.0 in the
    last."""
    return np.minimum((np.asarray(itm, dtype=np.float64) * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)


def score_bins(scores, by: str = BY_ITM) -> np.ndarray:
    """Each score's histogram bin on its range (``selection.SCORE_RANGES[by]``) in ``HISTOGRAM_BINS`` bins of equal
    width, the top in the last; a cosine a rounding outside [-1, 1] in the bin at its end."""
    if by == BY_ITM:
        return itm_bins(scores)
    low, high = SCORE_RANGES[by]
    position = (np.asarray(scores, dtype=np.float64) - low) / (high - low) * HISTOGRAM_BINS
    return np.clip(position.astype(np.int64), 0, HISTOGRAM_BINS - 1)


def histogram_record(histogram: dict, by: str) -> dict:
    """A marker's (and stats.json's) histogram entry: ``itm_histogram`` for a run by ITM, as capfilt always wrote
    it; ``score_histogram`` with its score and range for a run by another score."""
    if by == BY_ITM:
        return {"itm_histogram": histogram}
    return {"score_histogram": {"score": by, "range": list(SCORE_RANGES[by]), **histogram}}


def judged_histogram(stats: dict) -> tuple[str, tuple[float, float], dict[str, list[int]]]:
    """The score, range and per-source counts of a marker's or stats.json's histogram (``histogram_record``)."""
    if "itm_histogram" in stats:
        return BY_ITM, SCORE_RANGES[BY_ITM], stats["itm_histogram"]
    record = stats["score_histogram"]
    return record["score"], tuple(record["range"]), {source: record[source] for source in SOURCES}


class HashTally:
    """Values of one shard by their 64-bit hashes: how many repeat one seen before, a few of those values, and the
    distinct hashes (the ``.capfilt/done/{shard}.keys`` or ``.images`` file)."""

    def __init__(self):
        self._hashes: set[int] = set()
        self.duplicates = 0
        self.examples: list[str] = []

    def add(self, value: str, digest: int) -> bool:
        """Count ``value`` (whose hash is ``digest``); True when its hash was seen before."""
        if digest in self._hashes:
            self.duplicates += 1
            if len(self.examples) < MAX_KEY_EXAMPLES and value not in self.examples:
                self.examples.append(value)
            return True
        self._hashes.add(digest)
        return False

    def hashes_file(self) -> bytes:
        """The distinct hashes, sorted, as little-endian uint64."""
        return np.sort(np.fromiter(self._hashes, dtype=KEY_HASH_DTYPE, count=len(self._hashes))).tobytes()


class KeyTally(HashTally):
    """The keys of one shard: how many rows repeat a key, a few of those keys, and the distinct keys' hashes."""

    def add(self, key: str) -> bool:  # type: ignore[override]
        return super().add(key, key_hash(key))


class ImageTally(HashTally):
    """The images of one shard with a kept text, by SHA-256 (hex): how many repeat an image kept before (rule 4 of
    ``capfilt.pipelines.selection``), a few of their SHA-256s, and the distinct images' hashes."""

    def add(self, sha256_hex: str) -> bool:  # type: ignore[override]
        return super().add(sha256_hex, image_hash(sha256_hex))


def duplicates_across(shards: Iterable[tuple[str, bytes]]) -> tuple[int, list[tuple[int, list[str]]]]:
    """From each shard's hashes file (an iterable, read one at a time): the (shard, value)s whose hash an earlier
    shard has too, and a few of those hashes with the shards that hold them.

    Holds at most two arrays of 8 bytes per (shard, key): the hashes, then a sorted copy.
    """
    names, parts = [], []
    for name, data in shards:
        names.append(name)
        parts.append(np.frombuffer(data, dtype=KEY_HASH_DTYPE))
    starts = np.cumsum([0] + [part.size for part in parts])
    hashes = np.concatenate(parts) if parts else np.empty(0, dtype=KEY_HASH_DTYPE)
    del parts  # the files' bytes
    ordered = np.sort(hashes)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    del ordered
    count = int(repeated.size)
    examples = np.unique(repeated)[:MAX_KEY_EXAMPLES]
    found = []
    if examples.size:
        at = np.nonzero(np.isin(hashes, examples))[0]
        holders = np.searchsorted(starts, at, side="right") - 1
        for digest in examples:
            found.append((int(digest), sorted(names[i] for i in holders[hashes[at] == digest])))
    return count, found


@dataclass
class ShardStats:
    """What happened to one shard's rows; JSON-able through ``to_dict``."""

    shard: str
    input: str = ""
    rows: int = 0  # input rows
    images: int = 0  # rows whose image was judged
    failed: Counter = field(default_factory=Counter)  # stage -> rows
    kept: Counter = field(default_factory=Counter)  # source -> texts
    rejected: Counter = field(default_factory=Counter)  # source -> texts
    web_missing: int = 0  # judged images without a web text
    histogram: dict = field(default_factory=lambda: {s: [0] * HISTOGRAM_BINS for s in SOURCES})
    seconds: float = 0.0
    samples: list = field(default_factory=list)  # a few judged pairs with thumbnails, for the report
    damaged: dict | None = None  # the input shard is damaged: what was broken (``ShardJob.damage_record``)
    keys: KeyTally = field(default_factory=KeyTally)  # not in the marker: its hashes go beside it
    kept_images: ImageTally = field(default_factory=ImageTally)  # images with a kept text (rule 4): as keys
    reasons: Counter = field(default_factory=Counter)  # (reason, source) -> rejected texts
    run: str = ""  # the job that processed the shard (``OutputLayout.run``), "" where not recorded
    started: float = field(default_factory=time.time)  # wall clock (Unix seconds) when its processing began
    by: str = BY_ITM  # the score that judged the texts (``BootstrapSettings.by``): the histogram's

    def add_texts(self, sources: Sequence[str], scores, codes) -> None:
        """Judged texts: each one's source, the score it was judged by (``by``) and outcome
        (``selection.KEPT_CODE``, or ``selection.CODES[reason]``), counted per source and reason, and in the
        histogram of that score."""
        sources = np.asarray(sources, dtype=object)
        codes = np.asarray(codes, dtype=np.int64)
        bins = score_bins(scores, self.by)
        if not sources.size == codes.size == bins.size:
            raise ValueError(f"{sources.size} sources, {codes.size} outcomes and {bins.size} scores")
        unknown = set(sources.tolist()) - set(SOURCES)
        if unknown:
            raise ValueError(f"texts of unknown sources {sorted(unknown)}: the sources are {SOURCES}")
        for source in SOURCES:
            mine = sources == source
            outcomes = np.bincount(codes[mine], minlength=len(REASONS) + 1)
            self.kept[source] += int(outcomes[KEPT_CODE])
            self.rejected[source] += int(outcomes.sum() - outcomes[KEPT_CODE])
            for reason, code in CODES.items():
                self.reasons[(reason, source)] += int(outcomes[code])
            counts = np.bincount(bins[mine], minlength=HISTOGRAM_BINS).tolist()
            self.histogram[source] = [a + b for a, b in zip(self.histogram[source], counts)]

    def wanted_samples(self, sources: Sequence[str], kept, usable=None) -> list[int]:
        """Which of these judged texts (in row order: their sources, whether each is kept, and whether its image is
        at hand, ``usable``, default all) the report takes as examples, as indices in row order: per source and
        outcome (kept, removed) the first usable ones, until the shard has ``MAX_SAMPLES_PER_CELL`` of each
        (``capfilt.pipelines.report.example`` makes them)."""
        sources = np.asarray(sources, dtype=object)
        kept = np.asarray(kept, dtype=bool)
        usable = np.ones(kept.size, dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
        picks: list[int] = []
        for source in SOURCES:
            for outcome in (True, False):
                room = MAX_SAMPLES_PER_CELL - sum(1 for s in self.samples if s["source"] == source and
                                                  s["kept"] == outcome)
                if room > 0:
                    picks += np.flatnonzero((sources == source) & (kept == outcome) & usable)[:room].tolist()
        return sorted(picks)

    def check(self, num_captions: int) -> None:
        """Raise unless every input row and every text is accounted for."""
        failed = sum(self.failed.values())
        if self.images + failed != self.rows:
            raise AssertionError(f"shard {self.shard}: {self.rows} rows but {self.images} judged + {failed} failed")
        web = self.kept[WEB] + self.rejected[WEB]
        synthetic = self.kept[SYNTHETIC] + self.rejected[SYNTHETIC]
        if web != self.images - self.web_missing or synthetic != self.images * num_captions:
            raise AssertionError(
                f"shard {self.shard}: {self.images} images ({self.web_missing} without web text), K={num_captions}, "
                f"but {web} web and {synthetic} synthetic texts judged"
            )
        for source in SOURCES:
            reasons = sum(self.reasons[(reason, source)] for reason in REASONS)
            if reasons != self.rejected[source]:
                raise AssertionError(f"shard {self.shard}: {self.rejected[source]} {source} texts rejected but "
                                     f"{reasons} with a reason")

    def to_dict(self) -> dict:
        return {
            "shard": self.shard,
            "input": self.input,
            "rows": self.rows,
            "images": self.images,
            "failed": {stage: self.failed[stage] for stage in STAGES},
            "kept": {source: self.kept[source] for source in SOURCES},
            "rejected": {source: self.rejected[source] for source in SOURCES},
            "web_missing": self.web_missing,
            "by": self.by,
            **histogram_record(self.histogram, self.by),
            "seconds": round(self.seconds, 3),
            "samples": self.samples,
            "damaged": self.damaged,
            "duplicate_keys": {"rows": self.keys.duplicates, "examples": list(self.keys.examples)},
            "rejected_reasons": {reason: {source: self.reasons[(reason, source)] for source in SOURCES}
                                 for reason in REASONS},
            # Images with a kept text whose bytes an earlier row of the shard had (sha256 hex examples).
            "duplicate_images": {"images": self.kept_images.duplicates, "examples": list(self.kept_images.examples)},
            # Which job did the shard, and when it began (it ended ``seconds`` later): the report's run time.
            "timing": {"run": self.run, "started": round(self.started, 3)},
        }


def merge(markers: list[dict], by: str = BY_ITM) -> dict:
    """The sum of shard stats (``ShardStats.to_dict`` outputs), with the noise ratios; ``by``: the score the run
    judged by (a marker of another one is an error: its histogram would not add up)."""
    histogram = {s: [0] * HISTOGRAM_BINS for s in SOURCES}
    total = {
        "shards": len(markers),
        "rows": 0,
        "images": 0,
        "failed": Counter(),
        "kept": Counter(),
        "rejected": Counter(),
        "web_missing": 0,
        "by": by,
        **histogram_record(histogram, by),
        "rejected_reasons": {reason: Counter() for reason in REASONS},
        "shard_seconds": 0.0,
    }
    for m in markers:
        score, _, counts = judged_histogram(m)
        if score != by:
            raise ValueError(f"shard {m['shard']} was judged by {score}, the run by {by}: its marker is another "
                             "run's")
        for reason in REASONS:
            total["rejected_reasons"][reason].update(m["rejected_reasons"][reason])
        for key in ("rows", "images", "web_missing"):
            total[key] += m[key]
        for key in ("failed", "kept", "rejected"):
            total[key].update(m[key])
        for source in SOURCES:
            histogram[source] = [a + b for a, b in zip(histogram[source], counts[source])]
        total["shard_seconds"] += m["seconds"]
    total.update(histogram_record(histogram, by))  # the sums (in the key's place)
    total["failed"] = {stage: total["failed"][stage] for stage in STAGES}
    total["kept"] = {source: total["kept"][source] for source in SOURCES}
    total["rejected"] = {source: total["rejected"][source] for source in SOURCES}
    total["texts"] = {source: total["kept"][source] + total["rejected"][source] for source in SOURCES}
    total["rejected_reasons"] = {reason: {source: counts[source] for source in SOURCES}
                                 for reason, counts in total["rejected_reasons"].items()}
    noise = total["rejected_reasons"][BELOW_THRESHOLD]
    # The paper's noise ratio (§4.2): the share of texts the filter removes (below the threshold), per source.
    # Texts removed as duplicates or by --select passed the filter: they are not noise.
    total["noise_ratio"] = {
        source: (noise[source] / total["texts"][source]) if total["texts"][source] else None for source in SOURCES
    }
    total["duplicate_texts"] = dict(total["rejected_reasons"][DUPLICATE_TEXT])
    total["texts_before"] = total["texts"][WEB]  # web texts judged
    total["texts_after"] = sum(total["kept"].values())  # kept web texts + kept synthetic captions
    total["shard_seconds"] = round(total["shard_seconds"], 3)
    return total


def run_timing(markers: list[dict], run: str = "") -> dict:
    """How long the finished shards took, over every run that made them, and this job's part (``run``, its
    ``OutputLayout.run``), for the report and ``stats.json``'s ``timing``.

    ``shard_seconds``: each shard's processing time (reading its rows to committing its files) summed over all
    finished shards, whichever run or job made them; ``images_per_shard_second`` is then one worker's rate (with W
    workers at once a job goes up to W times faster). ``this_run``: the shards this job finished, from the first
    one's start to the last one's commit on the wall clock (model loading and the summary not included), and the
    images per second of the job with all its workers; None when it finished none (all were done before, or its
    markers do not record it). Shards made before capfilt recorded timing count in ``shard_seconds`` only.
    """
    seconds = sum(m["seconds"] for m in markers)
    images = sum(m["images"] for m in markers)
    timed = [m for m in markers if isinstance(m.get("timing"), dict) and m["timing"].get("started")]
    runs = sorted({m["timing"]["run"] for m in timed if m["timing"].get("run")})
    mine = [m for m in timed if run and m["timing"].get("run") == run]
    this_run = None
    if mine:
        start = min(m["timing"]["started"] for m in mine)
        wall = max(m["timing"]["started"] + m["seconds"] for m in mine) - start
        done = sum(m["images"] for m in mine)
        this_run = {"run": run, "shards": len(mine), "rows": sum(m["rows"] for m in mine), "images": done,
                    "started": round(start, 3), "wall_seconds": round(wall, 3),
                    "images_per_second": round(done / wall, 3) if wall > 0 else None}
    return {"shard_seconds": round(seconds, 3),
            "images_per_shard_second": round(images / seconds, 3) if seconds > 0 else None,
            "runs": len(runs), "shards_untimed": len(markers) - len(timed), "this_run": this_run}
