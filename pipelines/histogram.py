"""The report's score histogram as inline SVG: one panel per source (web texts, synthetic captions).

The score is the one that judged the run: the ITM match probability (0 to 1) or, for a run by ITC (a CLIP or
SigLIP filter, ``capfilt refilter --by itc``), the ITC cosine similarity (-1 to 1); the x axis spans its range.

Each panel has its own y scale (a run judges K synthetic captions per web
text, so one shared scale would flatten the web panel), ticks and a title on
both axes and the threshold as a labelled dashed line. The page stays a single
file with no scripts: each bar's count is in its ``<title>`` (a hover tip).
"""

from __future__ import annotations

import html
import math

from capfilt.pipelines.schema import SOURCES

COLOURS = {"web": "#d9822b", "synthetic": "#2b7bd9"}  # also the report's legend colours
TITLES = {"web": "web texts", "synthetic": "synthetic captions"}
WIDTH, PANEL_HEIGHT = 720, 210  # px of one panel (the SVG scales down to the page's width)
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 34, 46  # margins: y tick labels and title; threshold label; x ticks and title
X_TICKS = 10  # x ticks at 0.0, 0.1, ... 1.0 (ITC: -1.0, -0.8, ... 1.0)
AXIS_TITLES = {"itm": "ITM match probability", "itc": "ITC cosine similarity"}
Y_TICKS = 4  # about this many y ticks above zero


def nice_ticks(peak: int, about: int = Y_TICKS) -> list[int]:
    """Tick values from 0 to at least ``peak`` in steps of 1, 2 or 5 times a power of ten, about ``about`` steps."""
    peak = max(1, peak)
    raw = peak / about
    power = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    step = max(1, int(step))
    top = math.ceil(peak / step) * step
    return list(range(0, top + 1, step))


def _panel(source: str, counts: list[int], threshold: float | None, y0: float, score: str = "itm",
           low: float = 0.0, high: float = 1.0) -> list[str]:
    """One source's panel, its plot area's top at ``y0`` + TOP; the x axis from ``low`` to ``high``."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, PANEL_HEIGHT - TOP - BOTTOM
    top, base = y0 + TOP, y0 + TOP + plot_h
    ticks = nice_ticks(max(counts) if counts else 0)
    scale = plot_h / ticks[-1]
    title = f"{TITLES[source]}: {sum(counts)} judged"
    parts = [f'<g class="panel" data-source="{source}">',
             f'<text x="{LEFT}" y="{y0 + 14}" font-size="13" font-weight="bold" fill="{COLOURS[source]}">'
             f'{html.escape(title)}</text>']
    for value in ticks:  # y: gridline, tick mark and label
        y = base - value * scale
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#e4e4e4"/>'
                     f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{LEFT}" y2="{y:.1f}" stroke="#333"/>'
                     f'<text class="ytick" x="{LEFT - 7}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
                     f'{value}</text>')
    bins = len(counts)
    bin_w = plot_w / bins
    span = high - low
    for b, count in enumerate(counts):
        h = count * scale
        parts.append(f'<rect x="{LEFT + b * bin_w + 1:.1f}" y="{base - h:.1f}" width="{bin_w - 2:.1f}" '
                     f'height="{h:.1f}" fill="{COLOURS[source]}"><title>{TITLES[source]} with a score in '
                     f'{low + span * b / bins:.2f}–{low + span * (b + 1) / bins:.2f}: {count}</title></rect>')
    for t in range(X_TICKS + 1):  # x: tick mark and label
        x = LEFT + plot_w * t / X_TICKS
        parts.append(f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" stroke="#333"/>'
                     f'<text class="xtick" x="{x:.1f}" y="{base + 16}" font-size="11" text-anchor="middle">'
                     f'{low + span * t / X_TICKS + 0.0:.1f}</text>')
    parts.append(f'<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{base}" stroke="#333"/>'
                 f'<line x1="{LEFT}" y1="{base}" x2="{LEFT + plot_w}" y2="{base}" stroke="#333"/>'
                 f'<text x="{LEFT + plot_w / 2:.1f}" y="{base + 34}" font-size="12" text-anchor="middle">'
                 f'{AXIS_TITLES.get(score, html.escape(score))}</text>'
                 f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">texts</text>')
    if threshold is not None:
        at = min(max((threshold - low) / span, 0.0), 1.0)
        x = LEFT + plot_w * at
        anchor, dx = ("end", -4) if at > 0.8 else ("start", 4)  # the label stays inside the panel
        parts.append(f'<line class="threshold" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{base}" stroke="#c00" '
                     f'stroke-width="1.5" stroke-dasharray="5 3"/>'
                     f'<text class="threshold-label" x="{x + dx:.1f}" y="{top + 8}" font-size="11" fill="#c00" '
                     f'text-anchor="{anchor}">threshold {threshold:.3g}: removed ◀ ▶ kept</text>')
    parts.append("</g>")
    return parts


def histogram_svg(histogram: dict[str, list[int]], threshold: float | None, score: str = "itm",
                  score_range: tuple[float, float] = (0.0, 1.0)) -> str:
    """Both sources' histograms of ``score`` over ``score_range`` (``stats.json``'s ``itm_histogram``, or its
    ``score_histogram``: ``capfilt.pipelines.stats.judged_histogram``), one panel each, with the threshold (None:
    the run had none, so no line is drawn)."""
    low, high = score_range
    height = PANEL_HEIGHT * len(SOURCES)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
             f'height="{height}" style="max-width:100%;height:auto" role="img" '
             f'aria-label="{html.escape(score.upper())} score histogram, web texts and synthetic captions" '
             'font-family="sans-serif">']
    for i, source in enumerate(SOURCES):
        parts += _panel(source, histogram[source], threshold, i * PANEL_HEIGHT, score, low, high)
    parts.append("</svg>")
    return "".join(parts)
