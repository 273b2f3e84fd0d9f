"""Counts of one shard, and of a whole run as the sum of its shards' counts.

Every input row ends in exactly one of: a judged image (its web text and K
synthetic captions each kept or rejected) or a failed row. ``check`` states
that accounting as arithmetic, so a shard that loses a row cannot be marked
done.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from capfilt.pipelines.schema import SOURCES, STAGES, SYNTHETIC, WEB

HISTOGRAM_BINS = 20  # ITM match probability in [0, 1], bins of 0.05
MAX_SAMPLES_PER_CELL = 3  # report examples per (source, kept/removed) and shard


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

    def add_text(self, source: str, itm: float, kept: bool) -> None:
        (self.kept if kept else self.rejected)[source] += 1
        self.histogram[source][min(int(itm * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1

    def wants_sample(self, source: str, kept: bool) -> bool:
        return sum(1 for s in self.samples if s["source"] == source and s["kept"] == kept) < MAX_SAMPLES_PER_CELL

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
            "itm_histogram": self.histogram,
            "seconds": round(self.seconds, 3),
            "samples": self.samples,
        }


def merge(markers: list[dict]) -> dict:
    """The sum of shard stats (``ShardStats.to_dict`` outputs), with the noise ratios."""
    total = {
        "shards": len(markers),
        "rows": 0,
        "images": 0,
        "failed": Counter(),
        "kept": Counter(),
        "rejected": Counter(),
        "web_missing": 0,
        "itm_histogram": {s: [0] * HISTOGRAM_BINS for s in SOURCES},
        "shard_seconds": 0.0,
    }
    for m in markers:
        for key in ("rows", "images", "web_missing"):
            total[key] += m[key]
        for key in ("failed", "kept", "rejected"):
            total[key].update(m[key])
        for source in SOURCES:
            total["itm_histogram"][source] = [a + b for a, b in zip(total["itm_histogram"][source],
                                                                     m["itm_histogram"][source])]
        total["shard_seconds"] += m["seconds"]
    total["failed"] = {stage: total["failed"][stage] for stage in STAGES}
    total["kept"] = {source: total["kept"][source] for source in SOURCES}
    total["rejected"] = {source: total["rejected"][source] for source in SOURCES}
    total["texts"] = {source: total["kept"][source] + total["rejected"][source] for source in SOURCES}
    # The paper's noise ratio (§4.2): the share of texts the filter removes, per source.
    total["noise_ratio"] = {
        source: (total["rejected"][source] / total["texts"][source]) if total["texts"][source] else None
        for source in SOURCES
    }
    total["texts_before"] = total["texts"][WEB]  # web texts judged
    total["texts_after"] = sum(total["kept"].values())  # kept web texts + kept synthetic captions
    total["shard_seconds"] = round(total["shard_seconds"], 3)
    return total
