"""Round against round: what each CapFilt output kept (`make demo-loop`'s closing table).

``python -m capfilt.recipes.loop_report OUT1 OUT2 ...`` prints one column per output
folder of ``capfilt bootstrap`` (its ``stats.json``, ``kept/`` and
``rejected/``):

- web texts and synthetic captions kept, and the paper's noise ratio (the
  share removed) of each, from ``stats.json``;
- where the rows carry the shapes world's ``kind`` column (the ``demo``
  data): the share of web texts kept per kind (clean, mismatch, partial, alt);
- where they carry its ``scene`` column: the share of synthetic captions that
  are correct (``capfilt.shapes.is_correct``), among all and among the kept.

A measure an output cannot give (no ``kind`` column, no rows of a kind) shows
as ``-``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from capfilt.help_format import HelpWithDefaults

WEB_KINDS = ("clean", "mismatch", "partial", "alt")  # capfilt.shapes.KINDS, in the table's order


def _rows(folder: Path) -> list[dict]:
    """``source``, ``text`` and, where present, ``kind`` and ``scene`` of every row of a kept/ or rejected/ folder."""
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for path in sorted(folder.glob("*.parquet")):
        names = set(pq.read_schema(path).names)
        columns = [c for c in ("source", "text", "kind", "scene") if c in names]
        rows.extend(pq.read_table(path, columns=columns).to_pylist())
    return rows


def summarize(out: str | Path) -> dict:
    """The measures of one CapFilt output folder (fractions in [0, 1], None where not measurable)."""
    out = Path(out)
    stats = json.loads((out / "stats.json").read_text())
    texts = stats["texts"]
    summary: dict = {
        "out": str(out),
        "texts": dict(texts),
        "kept": {source: (stats["kept"][source] / texts[source] if texts[source] else None) for source in texts},
        "noise_ratio": dict(stats["noise_ratio"]),
        "web_kept_by_kind": {},
        "synthetic_correct": None,
        "synthetic_correct_kept": None,
    }
    counts: Counter = Counter()
    for kept, folder in ((True, out / "kept"), (False, out / "rejected")):
        for row in _rows(folder):
            if row.get("source") == "web" and row.get("kind"):
                counts[("web", row["kind"], "n")] += 1
                counts[("web", row["kind"], "kept")] += kept
            elif row.get("source") == "synthetic" and row.get("scene"):
                correct = _correct(row["text"], row["scene"])
                counts[("synthetic", "n")] += 1
                counts[("synthetic", "correct")] += correct
                counts[("synthetic", "kept")] += kept
                counts[("synthetic", "kept correct")] += kept and correct
    kinds = [*WEB_KINDS, *sorted({k for (s, k, *_) in counts if s == "web"} - set(WEB_KINDS))]
    for kind in kinds:
        n = counts[("web", kind, "n")]
        summary["web_kept_by_kind"][kind] = counts[("web", kind, "kept")] / n if n else None
    if counts[("synthetic", "n")]:
        summary["synthetic_correct"] = counts[("synthetic", "correct")] / counts[("synthetic", "n")]
    if counts[("synthetic", "kept")]:
        summary["synthetic_correct_kept"] = counts[("synthetic", "kept correct")] / counts[("synthetic", "kept")]
    return summary


def _correct(text: str, scene: str) -> bool:
    from capfilt.shapes import is_correct, scene_from_json

    try:
        return is_correct(text or "", scene_from_json(scene))
    except (ValueError, KeyError, TypeError):  # not a shapes-world scene
        return False


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(summaries: list[dict], labels: list[str] | None = None) -> str:
    """The summaries side by side, one column each, as a Markdown table."""
    labels = labels or [f"round {i + 1}" for i in range(len(summaries))]
    kinds: list[str] = []
    for summary in summaries:
        kinds += [k for k in summary["web_kept_by_kind"] if k not in kinds]
    lines = [
        ("web texts judged", [str(s["texts"].get("web", 0)) for s in summaries]),
        ("web texts kept", [_percent(s["kept"].get("web")) for s in summaries]),
        ("synthetic captions kept", [_percent(s["kept"].get("synthetic")) for s in summaries]),
        ("noise ratio, web", [_percent(s["noise_ratio"].get("web")) for s in summaries]),
        ("noise ratio, synthetic", [_percent(s["noise_ratio"].get("synthetic")) for s in summaries]),
        *((f"web kept: {kind}", [_percent(s["web_kept_by_kind"].get(kind)) for s in summaries]) for kind in kinds),
        ("synthetic correct", [_percent(s["synthetic_correct"]) for s in summaries]),
        ("synthetic correct, among kept", [_percent(s["synthetic_correct_kept"]) for s in summaries]),
    ]
    width = max(len(name) for name, _ in lines)
    widths = [max(len(label), *(len(values[i]) for _, values in lines)) for i, label in enumerate(labels)]
    out = ["| " + " " * width + " | " + " | ".join(l.rjust(w) for l, w in zip(labels, widths)) + " |",
           "|" + "-" * (width + 2) + "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    out += ["| " + name.ljust(width) + " | " + " | ".join(v.rjust(w) for v, w in zip(values, widths)) + " |"
            for name, values in lines]
    return "\n".join(out)


def report(outs: list[str | Path], labels: list[str] | None = None, file=None) -> list[dict]:
    """Print the table of ``outs`` (CapFilt output folders) to ``file`` (stdout); returns their summaries."""
    summaries = [summarize(out) for out in outs]
    labels = labels or [f"round {i + 1}" for i in range(len(outs))]
    file = file or sys.stdout
    for label, summary in zip(labels, summaries):
        print(f"{label}: {summary['out']}", file=file)
    print(table(summaries, labels), file=file)
    return summaries


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m capfilt.recipes.loop_report",
                                     description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    parser.add_argument("outs", nargs="+", metavar="OUT", help="capfilt bootstrap output folders, one per round")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="column names (default: round 1, round 2, ...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.outs):
        parser.error("--labels needs one name per OUT")
    missing = [out for out in args.outs if not (Path(out) / "stats.json").is_file()]
    if missing:
        parser.error(f"no stats.json in {', '.join(missing)} (run capfilt bootstrap there first)")
    report(args.outs, args.labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
