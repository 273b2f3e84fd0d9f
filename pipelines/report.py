"""A CapFilt run's ``stats.json`` and ``report.html``, built from its shards' completion markers.

The markers (``_done/{shard}.json``) hold each shard's counts, its ITM score
histogram and a few example pairs with thumbnails, so the run's summary
needs no second pass over the data and includes shards finished by earlier
(interrupted) runs. The report shows the counts per source, the paper's
noise ratio (the share of web texts and of synthetic captions the filter
removes; §4.2), why texts were removed (below the threshold, duplicate text,
not in the top n, duplicate image), duplicate keys and images, an ITM score
histogram (inline SVG) and examples of kept and removed pairs. With
``--dedup-images`` a shard's counts include the rows the cross-shard step moved
(``capfilt.pipelines.image_dedup``). A split made by ``capfilt refilter``
(``capfilt.pipelines.refilter``) is summed the same way; its report says so,
and names the score that judged (ITM, or ITC: then the histogram, of ITM
scores, has no threshold line). A shard's examples are made here
(``example``, with its ``thumbnail``), by the pipeline and by refilter alike.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Protocol

from PIL import Image

import capfilt
from capfilt.pipelines.image_dedup import apply_record, read_record
from capfilt.pipelines.layout import FAILED, KEPT, REJECTED, OutputLayout, read_text
from capfilt.pipelines.schema import DUPLICATE_IMAGE, REASONS, SCHEMA_VERSION, SOURCES, STAGES
from capfilt.pipelines.stats import (
    HISTOGRAM_BINS, MAX_KEY_EXAMPLES, duplicates_across, image_hash, key_hash, merge,
)

EXAMPLES_PER_OUTCOME = 12  # example cards per outcome (kept, removed) on the report, from the first shards' samples
THUMBNAIL_SIZE = 96  # px, the longer side of an example's thumbnail (the page shows it in a 96 px square)


class SummarySettings(Protocol):
    """What the summary reads of a run's settings: ``BootstrapSettings`` and a refilter's ``Plan``
    (``capfilt.pipelines.refilter``) both have it."""

    @property
    def dedup_images(self) -> bool: ...

    def provenance(self) -> dict: ...


def thumbnail(data: bytes, exif: str | None = None) -> str:
    """A small JPEG of the image in ``data`` as a ``data:`` URI, upright by the EXIF orientation img2dataset
    recorded (its ``exif`` column), as the models saw it; decoded again: only a few rows need one."""
    from capfilt.images import recorded_orientation, upright_rgb  # torch and transformers: only when one is made

    orientation = recorded_orientation(exif) if isinstance(exif, str) else None
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE))  # JPEG: decode at a fraction of the size
        image.load()
        small = upright_rgb(image, orientation)  # as the models see it: 8-bit, composited, upright
    small.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def example(key: str, text: str, source: str, itm: float, reason: str | None, image: bytes,
            exif: str | None) -> dict:
    """A judged text as an example of the report (a shard's ``samples``, chosen by ``ShardStats.wanted_samples``):
    kept when ``reason`` is None, with a thumbnail of its image."""
    return {"key": key, "text": text, "source": source, "itm": round(itm, 4), "kept": reason is None,
            "reason": reason, "thumbnail": thumbnail(image, exif)}


def damaged_shards(markers: list[dict]) -> list[dict]:
    """The finished shards whose input is damaged: path, what was broken, the rows read and failed at ``read``."""
    return [{"shard": m["shard"], "input": m["input"], "rows_read": m["rows"], "rows_failed_read": m["failed"]["read"],
             **m["damaged"]} for m in markers if m.get("damaged")]


def duplicate_keys(layout: OutputLayout, markers: list[dict]) -> dict:
    """Rows whose input key repeats one seen before, within a shard and across shards, with a few of those keys."""
    within = sum(m["duplicate_keys"]["rows"] for m in markers)
    examples = [{"key": key, "shards": [m["shard"]]} for m in markers for key in m["duplicate_keys"]["examples"]]
    across, found = duplicates_across(layout.read_key_hashes([m["shard"] for m in markers]))
    examples = examples[:MAX_KEY_EXAMPLES] + [
        {"key": _value_with_hash(layout, shards[0], digest, "key", key_hash, (FAILED, REJECTED, KEPT)),
         "shards": shards} for digest, shards in found]
    return {"rows": within + across, "within_shards": within, "across_shards": across, "examples": examples}


def duplicate_images(layout: OutputLayout, markers: list[dict], dropped: bool) -> dict:
    """Images with a kept text whose bytes (SHA-256) an earlier row had, within a shard and across shards, a few
    of them, and whether they were dropped (``--dedup-images``: their texts are in rejected/, reason
    ``duplicate image``) or are still in kept/."""
    within = sum(m["duplicate_images"]["images"] for m in markers)
    examples = [{"sha256": sha, "shards": [m["shard"]]} for m in markers for sha in m["duplicate_images"]["examples"]]
    across, found = duplicates_across(layout.read_image_hashes([m["shard"] for m in markers]))
    examples = examples[:MAX_KEY_EXAMPLES] + [
        {"sha256": _value_with_hash(layout, shards[0], digest, "image_sha256", image_hash, (KEPT, REJECTED)),
         "shards": shards} for digest, shards in found]
    return {"images": within + across, "within_shards": within, "across_shards": across, "dropped": dropped,
            "examples": examples}


def _value_with_hash(layout: OutputLayout, shard_id: str, digest: int, column: str, hash_of,
                     kinds: tuple[str, ...]) -> str | None:
    """The value of ``column`` in a shard's output rows whose hash (``hash_of``) is ``digest``."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    for kind in kinds:
        path = layout.output(kind, shard_id)
        if not FileSystems.exists(path):
            continue
        with FileSystems.open(path) as f:
            for value in pq.read_table(f, columns=[column]).column(column).to_pylist():
                if value is not None and hash_of(value) == digest:
                    return value
    return None


def build_stats(markers: list[dict], settings: SummarySettings, selected_shards: int,
                shard_errors: list[dict] = (), duplicates: dict | None = None, images: dict | None = None) -> dict:
    """The run's stats: every finished shard's counts summed, the settings, what is unfinished and damaged.

    ``shards.errors``: shards left unfinished (a rerun retries them). ``shards.damaged``: finished shards whose
    input file is damaged (a rerun will not change them: replace the file and delete the shard's marker).
    """
    totals = merge(markers)
    totals.pop("shards")
    return {
        "schema_version": SCHEMA_VERSION,
        "capfilt_version": capfilt.__version__,
        # the sampling the captioner used: the paper's, its folder's or the run's (recorded by each shard)
        "settings": {**settings.provenance(), "sampling": markers[0]["sampling"] if markers else None},
        "shards": {"selected": selected_shards, "done": len(markers), "errors": list(shard_errors),
                   "damaged": damaged_shards(markers)},
        **totals,
        "duplicate_keys": duplicates,
        "duplicate_images": images,
        "outputs": {kind: f"{kind}/*.parquet" for kind in (KEPT, REJECTED, FAILED)},
    }


def write_summary(layout: OutputLayout, settings: SummarySettings, selected_shards: int,
                  shard_errors: list[dict] = (), report: bool = True) -> dict:
    """Write ``stats.json`` (and ``report.html``) from the markers under ``layout`` (with the cross-shard image
    dedup's records applied); returns the stats."""
    markers = [apply_record(m, read_record(layout, m["shard"])) for m in layout.read_markers()]
    stats = build_stats(markers, settings, selected_shards, shard_errors, duplicate_keys(layout, markers),
                        duplicate_images(layout, markers, settings.dedup_images))
    layout.write_atomically(layout.stats_file, json.dumps(stats, indent=2) + "\n")  # jobs on one OUT may race
    if report:
        layout.write_atomically(layout.report_file, render_report(stats, markers))
    return stats


def read_stats(layout: OutputLayout) -> dict:
    return json.loads(read_text(layout.stats_file))


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def histogram_svg(histogram: dict[str, list[int]], threshold: float | None, width: int = 640,
                  height: int = 240) -> str:
    """Grouped bars of ITM match probability per source, the threshold (when it is one on ITM) as a dashed line."""
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
    if threshold is not None:
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
        f'<br><small>{html.escape(e["key"])}{_reason_note(e.get("reason"))}</small></figcaption></figure>'
        for e in examples
    ]
    return '<div class="cards">' + "".join(cards) + "</div>"


def _reason_note(reason: str | None) -> str:
    return f" · {html.escape(reason)}" if reason else ""


def _reasons_table(stats: dict) -> str:
    """Removed texts per reason and source: only the first reason is the filter's judgement."""
    rows = "".join(f"<tr><td>{reason}</td>" + "".join(f"<td>{stats['rejected_reasons'][reason][source]}</td>"
                                                     for source in SOURCES) + "</tr>" for reason in REASONS)
    heads = "".join(f"<th>{source}</th>" for source in SOURCES)
    return (f"<table><tr><th>removed because</th>{heads}</tr>{rows}</table><p>Only texts below the threshold are "
            "noise (the noise ratio); a duplicate text of an image, a text outside the top n "
            "(<code>--select</code>) and the texts of a duplicate image (<code>--dedup-images</code>) passed the "
            "filter.</p>")


def _duplicate_images_paragraph(images: dict | None, stats: dict) -> str:
    if not images or not images["images"]:
        return ""
    examples = ", ".join(f"<code>{html.escape(str(e['sha256'])[:16])}…</code> ({html.escape(', '.join(e['shards']))})"
                         for e in images["examples"])
    moved = sum(stats["rejected_reasons"][DUPLICATE_IMAGE].values())
    if images["dropped"]:
        fate = (f"dropped (<code>--dedup-images</code>): their {moved} texts are in rejected/, reason "
                "<i>duplicate image</i>")
    else:
        fate = "still in kept/ (<code>--dedup-images</code> drops them)"
    return (f"<p>Duplicate images: {images['images']} images with a kept text repeat the bytes of one kept before "
            f"({images['within_shards']} within a shard, {images['across_shards']} across shards), e.g. {examples}; "
            f"{fate}.</p>")


def _duplicates_paragraph(duplicates: dict | None) -> str:
    if not duplicates or not duplicates["rows"]:
        return ""
    examples = ", ".join(f"<code>{html.escape(str(e['key']))}</code> ({html.escape(', '.join(e['shards']))})"
                         for e in duplicates["examples"])
    return (f"<p>Duplicate input keys: {duplicates['rows']} rows repeat a key seen before "
            f"({duplicates['within_shards']} within a shard, {duplicates['across_shards']} across shards), "
            f"e.g. {examples}. Every output row has its own <code>sample_id</code>.</p>")


def _damaged_section(damaged: list[dict]) -> str:
    if not damaged:
        return ""
    items = []
    for d in damaged:
        expected = f" of {d['rows_expected']} img2dataset wrote" if d.get("rows_expected") is not None else ""
        lost = "" if d["all_rows_accounted"] else "; rows after the damage are not in the output"
        more = f" (and {d['more_errors']} more)" if d.get("more_errors") else ""
        items.append(f"<li><b>{html.escape(d['shard'])}</b> <code>{html.escape(d['input'])}</code>: "
                     f"{d['rows_read']} rows read{expected}, {d['rows_failed_read']} failed at read{lost}."
                     f"<ul>{''.join(f'<li>{html.escape(e)}</li>' for e in d['errors'])}</ul>{more}</li>")
    return ("<h2>Damaged input shards</h2><p>These input files are damaged; what could be read is in the output. "
            "Rerunning will not change them: replace the file, delete <code>_done/SHARD.json</code> "
            f"and rerun.</p><ul>{''.join(items)}</ul>")


def _criterion(settings: dict) -> str:
    """What removes a text: the threshold on the score it was judged by (a refiltered run's may be ITC's)."""
    by_itc = settings.get("by") == "itc"  # capfilt.pipelines.refilter; a bootstrap run judges by ITM
    score = "ITC cosine similarity (DataComp's CLIP score, on the filter's ITC head)" if by_itc else \
        "ITM match probability"
    text = f"a text is removed when its {score} is below {settings['threshold']:.6g}"
    if settings.get("keep_fraction") is not None:
        text += f" (the threshold at which {settings['keep_fraction']:.2%} of the web texts pass)"
    return text


def _refiltered_note(settings: dict) -> str:
    source = settings.get("refiltered_from")
    if not source:
        return ""
    return (f"<p>Refiltered from the scores stored in <code>{html.escape(str(source))}</code> "
            "(<code>capfilt refilter</code>): the models did not run again.</p>")


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
    damaged = stats["shards"]["damaged"]
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
(top_p {sampling['top_p']}); {html.escape(_criterion(settings))};
of the texts of an image that pass, {html.escape(settings['select'])} are kept, each distinct text once{
'' if not settings['dedup_images'] else '; duplicate images are dropped'}.
Schema version {stats['schema_version']}, capfilt {html.escape(stats['capfilt_version'])}.</p>
{_refiltered_note(settings)}
<h2>Rows</h2>
<p>{stats['rows']} input rows in {stats['shards']['done']} shard(s):
{stats['images']} images judged, {sum(stats['failed'].values())} failed.
Texts before CapFilt: {stats['texts_before']} web texts; after: {stats['texts_after']} texts.</p>
<table><tr><th>failed at</th><th>rows</th></tr>{failed}</table>
{_duplicates_paragraph(stats.get('duplicate_keys'))}
<h2>Texts and noise ratio</h2>
<table><tr><th>source</th><th>texts</th><th>kept</th><th>removed</th><th>noise ratio</th></tr>{rows}</table>
{_reasons_table(stats)}
{_duplicate_images_paragraph(stats.get('duplicate_images'), stats)}
<h2>ITM score histogram</h2>
{histogram_svg(stats['itm_histogram'], None if settings.get('by') == 'itc' else settings['threshold'])}
<h2>Kept pairs (examples)</h2>
{_example_cards(_examples(markers, kept=True))}
<h2>Removed texts (examples)</h2>
{_example_cards(_examples(markers, kept=False))}
{f'<h2>Unfinished shards</h2><p>Rerun the same command to retry them.</p><ul>{error_list}</ul>' if errors else ''}
{_damaged_section(damaged)}
</body></html>
"""
