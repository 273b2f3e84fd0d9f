"""A CapFilt run's ``stats.json`` and ``report.html``, built from its shards' completion markers.

The markers (``_done/{shard}.json``) hold each shard's counts, its ITM score
histogram and a few example pairs with thumbnails, so the run's summary
needs no second pass over the data and includes shards finished by earlier
(interrupted) runs. The report shows the counts per source, the paper's
noise ratio (the share of web texts and of synthetic captions the filter
removes; §4.2), an ITM score histogram (inline SVG) and examples of kept and
removed pairs.
"""

from __future__ import annotations

import html
import json

import capfilt
from capfilt.pipelines.layout import FAILED, KEPT, REJECTED, OutputLayout, read_text, write_text
from capfilt.pipelines.schema import SCHEMA_VERSION, SOURCES, STAGES
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.stats import HISTOGRAM_BINS, merge

EXAMPLES_PER_OUTCOME = 12


def build_stats(markers: list[dict], settings: BootstrapSettings, selected_shards: int,
                shard_errors: list[dict] = ()) -> dict:
    """The run's stats: every finished shard's counts summed, the settings, and what is unfinished."""
    totals = merge(markers)
    totals.pop("shards")
    return {
        "schema_version": SCHEMA_VERSION,
        "capfilt_version": capfilt.__version__,
        # the sampling the captioner used: the paper's, its folder's or the run's (recorded by each shard)
        "settings": {**settings.provenance(), "sampling": markers[0]["sampling"] if markers else None},
        "shards": {"selected": selected_shards, "done": len(markers), "errors": list(shard_errors)},
        **totals,
        "outputs": {kind: f"{kind}/*.parquet" for kind in (KEPT, REJECTED, FAILED)},
    }


def write_summary(layout: OutputLayout, settings: BootstrapSettings, selected_shards: int,
                  shard_errors: list[dict] = (), report: bool = True) -> dict:
    """Write ``stats.json`` (and ``report.html``) from the markers under ``layout``; returns the stats."""
    markers = layout.read_markers()
    stats = build_stats(markers, settings, selected_shards, shard_errors)
    write_text(layout.stats_file, json.dumps(stats, indent=2) + "\n")
    if report:
        write_text(layout.report_file, render_report(stats, markers))
    return stats


def read_stats(layout: OutputLayout) -> dict:
    return json.loads(read_text(layout.stats_file))


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def histogram_svg(histogram: dict[str, list[int]], threshold: float, width: int = 640, height: int = 240) -> str:
    """Grouped bars of ITM match probability per source, the threshold as a dashed line."""
    colours = {"web": "#d9822b", "synthetic": "#2b7bd9"}
    left, bottom, top = 40, 30, 24  # the legend sits above the bars
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max(1, *(max(counts) for counts in histogram.values()))
    bin_w = plot_w / HISTOGRAM_BINS
    bar_w = bin_w / (len(SOURCES) + 0.5)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="ITM score histogram">',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>']
    for s, source in enumerate(SOURCES):
        for b, count in enumerate(histogram[source]):
            h = plot_h * count / peak
            x = left + b * bin_w + s * bar_w + bar_w / 4
            parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                         f'fill="{colours[source]}"><title>{source} {b / HISTOGRAM_BINS:.2f}–'
                         f'{(b + 1) / HISTOGRAM_BINS:.2f}: {count}</title></rect>')
    for tick in range(0, 11, 2):
        x = left + plot_w * tick / 10
        parts.append(f'<text x="{x:.1f}" y="{height - 12}" font-size="11" text-anchor="middle">{tick / 10:.1f}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + 10}" font-size="11" text-anchor="end">{peak}</text>')
    x = left + plot_w * threshold
    parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#c00" '
                 f'stroke-dasharray="4 3"><title>threshold {threshold}</title></line>')
    for s, source in enumerate(SOURCES):
        parts.append(f'<rect x="{left + 10 + 90 * s}" y="4" width="10" height="10" fill="{colours[source]}"/>'
                     f'<text x="{left + 24 + 90 * s}" y="13" font-size="11">{source}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 1}" font-size="11" text-anchor="middle">'
                 "ITM match probability</text></svg>")
    return "".join(parts)


def _examples(markers: list[dict], kept: bool) -> list[dict]:
    found = []
    for marker in markers:
        found += [s for s in marker.get("samples", []) if s["kept"] == kept]
        if len(found) >= EXAMPLES_PER_OUTCOME:
            break
    return found[:EXAMPLES_PER_OUTCOME]


def _example_cards(examples: list[dict]) -> str:
    if not examples:
        return "<p>none</p>"
    cards = [
        f'<figure><img src="{e["thumbnail"]}" alt="{html.escape(e["key"])}">'
        f'<figcaption><b>{html.escape(e["source"])}</b> · ITM {e["itm"]:.3f}<br>{html.escape(e["text"])}'
        f'<br><small>{html.escape(e["key"])}</small></figcaption></figure>'
        for e in examples
    ]
    return '<div class="cards">' + "".join(cards) + "</div>"


def render_report(stats: dict, markers: list[dict]) -> str:
    """The report page for ``stats`` (from ``build_stats``) and the markers' examples."""
    settings = stats["settings"]
    sampling = settings["sampling"] or {"method": "–", "top_p": "–"}
    rows = "".join(
        f"<tr><td>{source}</td><td>{stats['texts'][source]}</td><td>{stats['kept'][source]}</td>"
        f"<td>{stats['rejected'][source]}</td><td>{_percent(stats['noise_ratio'][source])}</td></tr>"
        for source in SOURCES
    )
    failed = "".join(f"<tr><td>{stage}</td><td>{stats['failed'][stage]}</td></tr>" for stage in STAGES)
    errors = stats["shards"]["errors"]
    error_list = "".join(f"<li>{html.escape(e['shard'])}: {html.escape(e['error'])}</li>" for e in errors)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CapFilt report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.75em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ width: 180px; margin: 0; font-size: 12px; }}
figure img {{ width: 96px; height: 96px; object-fit: contain; background: #eee; }}
</style></head><body>
<h1>CapFilt report</h1>
<p>Captioner <code>{html.escape(settings['captioner'])}</code>, filter <code>{html.escape(settings['filter'])}</code>;
K = {settings['num_captions']} synthetic caption(s) per image by {html.escape(sampling['method'])}
(top_p {sampling['top_p']}); a text is removed when its ITM match probability is below {settings['threshold']}.
Schema version {stats['schema_version']}, capfilt {html.escape(stats['capfilt_version'])}.</p>
<h2>Rows</h2>
<p>{stats['rows']} input rows in {stats['shards']['done']} shard(s):
{stats['images']} images judged, {sum(stats['failed'].values())} failed.
Texts before CapFilt: {stats['texts_before']} web texts; after: {stats['texts_after']} texts.</p>
<table><tr><th>failed at</th><th>rows</th></tr>{failed}</table>
<h2>Texts and noise ratio</h2>
<table><tr><th>source</th><th>texts</th><th>kept</th><th>removed</th><th>noise ratio</th></tr>{rows}</table>
<h2>ITM score histogram</h2>
{histogram_svg(stats['itm_histogram'], settings['threshold'])}
<h2>Kept pairs (examples)</h2>
{_example_cards(_examples(markers, kept=True))}
<h2>Removed texts (examples)</h2>
{_example_cards(_examples(markers, kept=False))}
{f'<h2>Unfinished shards</h2><p>Rerun the same command to retry them.</p><ul>{error_list}</ul>' if errors else ''}
</body></html>
"""
