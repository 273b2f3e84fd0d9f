"""A CapFilt run's ``stats.json`` and ``report.html``, built from its shards' completion markers.

The markers (``.capfilt/done/{shard}.json``) hold each shard's counts, the histogram
of the score that judged it and a few example pairs with thumbnails, so the run's summary
needs no second pass over the data and includes shards finished by earlier
(interrupted) runs. The report shows the counts per source, the paper's
noise ratio (the share of web texts and of synthetic captions the filter
removes; §4.2), why texts were removed (below the threshold, duplicate text,
not in the top n, duplicate image), duplicate keys and images, a histogram of the
score that judged (inline SVG: the ITM match probability, or the ITC cosine similarity
for a run by ITC) and examples of kept and removed pairs. With
``--dedup-images`` a shard's counts include the rows the cross-shard step moved
(``capfilt.pipelines.image_dedup``). A split made by ``capfilt refilter``
(``capfilt.pipelines.refilter``) is summed the same way; its report says so.
The page and ``stats.json`` (``by``) name the score that judged. A shard's examples are made here
(``example``, with its ``thumbnail``), by the pipeline and by refilter alike.

For someone deciding whether to train on the output, the page opens with the
noise ratio per source and the keep-share warnings
(``capfilt.pipelines.keep_share.keep_share_warnings``), then shows a few failed
rows per stage with their URL and error (read back from failed/), the run
time (``capfilt.pipelines.stats.run_timing``: summed per-shard processing
seconds over every run, and this job's wall time) and every setting. It is
one self-contained file: inline CSS and SVG (``capfilt.pipelines.histogram``),
thumbnails as ``data:`` URIs, no scripts.
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import timedelta
from typing import Protocol

from PIL import Image

import capfilt
from capfilt.pipelines.histogram import COLOURS, TITLES, histogram_svg
from capfilt.pipelines.image_dedup import apply_record, read_record
from capfilt.pipelines.layout import FAILED, KEPT, REJECTED, OutputLayout, read_text
from capfilt.pipelines.schema import BELOW_THRESHOLD, DUPLICATE_IMAGE, REASONS, SCHEMA_VERSION, SOURCES, STAGES
from capfilt.pipelines.stats import (
    MAX_KEY_EXAMPLES, duplicates_across, image_hash, judged_histogram, key_hash, merge, run_timing,
)

EXAMPLES_PER_OUTCOME = 12  # example cards per outcome (kept, removed) on the report, from the first shards' samples
FAILED_EXAMPLES_PER_STAGE = 3  # failed rows (key, URL, error) shown per stage, from the first shards with any
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


def example(key: str, text: str, source: str, score: float, reason: str | None, image: bytes,
            exif: str | None, by: str = "itm") -> dict:
    """A judged text as an example of the report (a shard's ``samples``, chosen by ``ShardStats.wanted_samples``):
    kept when ``reason`` is None, with a thumbnail of its image; ``score`` is the one it was judged by (``by``),
    stored under that name (``itm`` or ``itc``)."""
    return {"key": key, "text": text, "source": source, by: round(float(score), 4), "kept": reason is None,
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
                shard_errors: list[dict] = (), duplicates: dict | None = None, images: dict | None = None,
                failed: dict | None = None, run: str = "") -> dict:
    """The run's stats: every finished shard's counts summed, the settings, what is unfinished and damaged.

    ``shards.errors``: shards left unfinished (a rerun retries them). ``shards.damaged``: finished shards whose
    input file is damaged (a rerun will not change them: replace the file and delete the shard's marker).
    ``failed_examples``: a few failed rows per stage (``failed_examples``). ``timing``: ``stats.run_timing`` for
    the job ``run``. ``keep_share_warnings``: a source the filter kept under 1% or over 99% of
    (``capfilt.pipelines.keep_share.keep_share_warnings``).
    """
    from capfilt.pipelines.keep_share import keep_share_warnings  # the rule the command line exits by (--strict)

    provenance = settings.provenance()
    totals = merge(markers, provenance.get("by", "itm"))  # a run (or source) of an older capfilt judged by ITM
    totals.pop("shards")
    return {
        "schema_version": SCHEMA_VERSION,
        "capfilt_version": capfilt.__version__,
        # the sampling the captioner used: the paper's, its folder's or the run's (recorded by each shard)
        "settings": {**provenance, "sampling": markers[0]["sampling"] if markers else None},
        "shards": {"selected": selected_shards, "done": len(markers), "errors": list(shard_errors),
                   "damaged": damaged_shards(markers)},
        **totals,
        "duplicate_keys": duplicates,
        "duplicate_images": images,
        "outputs": {kind: f"{kind}/*.parquet" for kind in (KEPT, REJECTED, FAILED)},
        "failed_examples": failed if failed is not None else {stage: [] for stage in STAGES},
        "timing": run_timing(markers, run),
        "keep_share_warnings": keep_share_warnings(totals, _Judged(provenance)),
    }


class _Judged:
    """The settings ``keep_share_warnings`` names (threshold, by, captioner, filter), from a run's provenance."""

    def __init__(self, provenance: dict):
        self.threshold, self.captioner, self.filter = (provenance.get(k) for k in ("threshold", "captioner", "filter"))
        self.by = provenance.get("by") or "itm"


def failed_examples(layout: OutputLayout, markers: list[dict], per_stage: int = FAILED_EXAMPLES_PER_STAGE) -> dict:
    """Up to ``per_stage`` failed rows per stage (shard, key, URL, error), read from failed/ of the first shards
    whose markers count failures at a stage still short of examples; only those shards' files are opened."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    found: dict[str, list[dict]] = {stage: [] for stage in STAGES}
    for marker in markers:
        short = {stage for stage, n in marker["failed"].items() if n and len(found.get(stage, ())) < per_stage}
        path = layout.output(FAILED, marker["shard"])
        if not short or not FileSystems.exists(path):
            continue
        with FileSystems.open(path) as f:
            table = pq.read_table(f, columns=["key", "url", "stage", "error"])
        for row in table.to_pylist():
            stage = row["stage"]
            if stage in short and len(found[stage]) < per_stage:
                found[stage].append({"shard": marker["shard"], "key": row["key"], "url": row["url"],
                                     "error": row["error"]})
    return found


def write_summary(layout: OutputLayout, settings: SummarySettings, selected_shards: int,
                  shard_errors: list[dict] = (), report: bool = True) -> dict:
    """Write ``stats.json`` (and ``report.html``) from the markers under ``layout`` (with the cross-shard image
    dedup's records applied); returns the stats."""
    markers = [apply_record(m, read_record(layout, m["shard"])) for m in layout.read_markers()]
    stats = build_stats(markers, settings, selected_shards, shard_errors, duplicate_keys(layout, markers),
                        duplicate_images(layout, markers, settings.dedup_images), failed_examples(layout, markers),
                        run=layout.run)
    layout.write_atomically(layout.stats_file, json.dumps(stats, indent=2) + "\n")  # jobs on one OUT may race
    from capfilt.pipelines.dataset_card import write_dataset_card  # OUT/README.md: what load_dataset(OUT) opens
    write_dataset_card(layout, stats, markers)
    if report:
        layout.write_atomically(layout.report_file, render_report(stats, markers))
    return stats


def read_stats(layout: OutputLayout) -> dict:
    return json.loads(read_text(layout.stats_file))


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


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
        f'<figcaption><b>{html.escape(e["source"])}</b> · {_score_label(e)}<br>{html.escape(e["text"])}'
        f'<br><small>{html.escape(e["key"])}{_reason_note(e.get("reason"))}</small></figcaption></figure>'
        for e in examples
    ]
    return '<div class="cards">' + "".join(cards) + "</div>"


def _score_label(example_: dict) -> str:
    """An example's score, named: ``ITM 0.912`` or ``ITC 0.305`` (the one it was judged by)."""
    by = "itc" if "itc" in example_ else "itm"
    return f"{by.upper()} {example_[by]:.3f}"


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
            "Rerunning will not change them: replace the file, delete <code>.capfilt/done/SHARD.json</code> "
            f"and rerun.</p><ul>{''.join(items)}</ul>")


def _criterion(settings: dict) -> str:
    """What removes a text: the threshold on the score it was judged by (ITM, or ITC: a CLIP or SigLIP filter, or
    a run or refilter by ITC); none with select top-N alone."""
    by_itc = settings.get("by") == "itc"  # settings of an older capfilt: its bootstrap runs judged by ITM
    score = "ITC cosine similarity (DataComp's CLIP score, on the filter's ITC head)" if by_itc else \
        "ITM match probability"
    if settings.get("threshold") is None:
        return (f"no threshold: no text is removed as noise; the {settings.get('select')} texts of each image by "
                f"{score} are kept")
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


def _glance(stats: dict) -> str:
    """The noise ratio of each source as a number and a bar (kept, removed as noise, removed for another reason)."""
    cards = []
    for source in SOURCES:
        judged = stats["texts"][source]
        noise = stats["rejected_reasons"][BELOW_THRESHOLD][source]
        kept = stats["kept"][source]
        other = judged - noise - kept
        shares = [(kept, COLOURS[source], "kept"), (noise, "#c44", "removed as noise"),
                  (other, "#aaa", "removed for another reason")]
        bar = "".join(f'<span style="width:{100 * n / judged:.2f}%;background:{colour}" title="{what}: {n}"></span>'
                      for n, colour, what in shares if judged and n)
        cards.append(
            f'<div class="glance-card" data-source="{source}"><div class="label">{TITLES[source]}: noise ratio</div>'
            f'<div class="big" style="color:{COLOURS[source]}">{_percent(stats["noise_ratio"][source])}</div>'
            f'<div class="bar">{bar}</div><div class="small">{judged} judged · {kept} kept · {noise} removed as noise'
            f' · {other} removed for another reason</div></div>')
    failed = sum(stats["failed"].values())
    cards.append(f'<div class="glance-card"><div class="label">rows</div><div class="big">{stats["images"]}</div>'
                 f'<div class="small">images judged of {stats["rows"]} input rows; {failed} failed '
                 f'({_percent(failed / stats["rows"] if stats["rows"] else None)}); {stats["texts_after"]} texts '
                 f'kept</div></div>')
    return '<div class="glance">' + "".join(cards) + "</div>"


def _warnings(warnings: list[str]) -> str:
    if not warnings:
        return ('<p class="ok">Keep share: the filter kept between 1% and 99% of each source\'s judged texts (or too '
                "few were judged to tell).</p>")
    return "".join(f'<div class="warn"><b>Warning:</b> {html.escape(w)}</div>' for w in warnings)


def _failed_examples_table(examples: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(stage)}</td><td><code>{html.escape(str(e['key']))}</code></td>"
        f'<td class="url"><code>{html.escape(str(e["url"]) if e["url"] is not None else "–")}</code></td>'
        f'<td class="err">{html.escape(str(e["error"]))}</td></tr>'
        for stage in STAGES for e in examples.get(stage, []))
    if not rows:
        return "<p>No failed rows.</p>"
    return (f"<p>A few failed rows per stage (up to {FAILED_EXAMPLES_PER_STAGE}, from the first shards with any); "
            "all of them are in <code>failed/*.parquet</code>.</p>"
            '<table class="failed"><tr><th>stage</th><th>key</th><th>URL</th><th>error</th></tr>'
            f"{rows}</table>")


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _timing_section(stats: dict) -> str:
    timing = stats.get("timing") or {}
    this = timing.get("this_run")
    if this:
        rate = "–" if this["images_per_second"] is None else f"{this['images_per_second']:.1f}"
        job = (f"<p><b>This job</b> (<code>{html.escape(this['run'])}</code>): {this['shards']} shard(s), "
               f"{this['images']} images judged in <b>{_duration(this['wall_seconds'])}</b> → <b>{rate} images/s</b> "
               "with all its workers. Wall clock from its first shard's start to its last shard's commit: model "
               "loading and this summary are not included.</p>")
    else:
        job = ("<p><b>This job</b> finished no shard of its own (they were done by earlier runs or another job, "
               "or its shards do not record timing).</p>")
    seconds = timing.get("shard_seconds", stats.get("shard_seconds", 0.0))
    per_worker = timing.get("images_per_shard_second")
    untimed = timing.get("shards_untimed", 0)
    every = (f"<p><b>Processing time of every finished shard</b> ({stats['shards']['done']} shard(s), by "
             f"{timing.get('runs', '?')} job(s): resumed and concurrent runs included): "
             f"<b>{_duration(seconds)}</b> ({seconds:.1f} s), summed per shard from reading its rows to committing "
             f"its files → <b>{'–' if per_worker is None else f'{per_worker:.1f}'} images/s per worker</b>. "
             "Shards run side by side, so a job with W workers is up to W times faster than that; a shard counts "
             "once, for the attempt that committed it."
             f"{f' {untimed} shard(s) were made before capfilt recorded when: they count here only.' if untimed else ''}"
             "</p>")
    return job + every


def _settings_table(settings: dict) -> str:
    rows = []
    for key, value in settings.items():
        if key == "sampling" and isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
        rows.append(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>")
    return '<table class="settings">' + "".join(rows) + "</table>"


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
    warnings = stats.get("keep_share_warnings")
    if warnings is None:  # stats of an older capfilt
        from capfilt.pipelines.keep_share import keep_share_warnings

        warnings = keep_share_warnings(stats, _Judged(settings))
    score, score_range, counts = judged_histogram(stats)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CapFilt report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.75em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
table.failed td, table.failed th, table.settings td {{ text-align: left; }}
table.failed td.url {{ max-width: 380px; overflow-wrap: anywhere; }}
table.failed td.err {{ max-width: 420px; overflow-wrap: anywhere; }}
.glance {{ display: flex; flex-wrap: wrap; gap: 16px; margin: 1em 0; }}
.glance-card {{ border: 1px solid #ddd; border-radius: 6px; padding: 0.75em 1em; width: 300px; }}
.glance-card .label {{ font-size: 13px; color: #555; }}
.glance-card .big {{ font-size: 32px; font-weight: bold; margin: 0.1em 0; }}
.glance-card .small {{ font-size: 12px; color: #555; }}
.bar {{ display: flex; height: 10px; background: #eee; border-radius: 3px; overflow: hidden; margin: 0.3em 0; }}
.bar span {{ display: block; height: 100%; }}
.warn {{ background: #fff4e5; border-left: 4px solid #d9822b; padding: 0.6em 1em; margin: 0.5em 0; }}
.ok {{ color: #2a6b2a; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ width: 180px; margin: 0; font-size: 12px; }}
figure img {{ width: 96px; height: 96px; object-fit: contain; background: #eee; }}
</style></head><body>
<h1>CapFilt report</h1>
{_refiltered_note(settings)}
<h2 id="glance">At a glance</h2>
{_glance(stats)}
<p>The noise ratio is the share of a source's judged texts the filter removed as below the threshold (BLIP §4.2);
{html.escape(_criterion(settings))}.</p>
{_warnings(warnings)}
<h2 id="histogram">{score.upper()} score histogram</h2>
{histogram_svg(counts, settings['threshold'], score, score_range)}
<h2>Texts and noise ratio</h2>
<table><tr><th>source</th><th>texts</th><th>kept</th><th>removed</th><th>noise ratio</th></tr>{rows}</table>
{_reasons_table(stats)}
{_duplicate_images_paragraph(stats.get('duplicate_images'), stats)}
<h2 id="rows">Rows</h2>
<p>{stats['rows']} input rows in {stats['shards']['done']} shard(s):
{stats['images']} images judged, {sum(stats['failed'].values())} failed.
Texts before CapFilt: {stats['texts_before']} web texts; after: {stats['texts_after']} texts.</p>
<table><tr><th>failed at</th><th>rows</th></tr>{failed}</table>
<h3 id="failed-examples">Failed rows (examples)</h3>
{_failed_examples_table(stats.get('failed_examples') or {})}
{_duplicates_paragraph(stats.get('duplicate_keys'))}
<h2 id="run-time">Run time</h2>
{_timing_section(stats)}
<h2 id="settings">Models and settings</h2>
<p>Captioner <code>{html.escape(settings['captioner'])}</code>, filter <code>{html.escape(settings['filter'])}</code>;
K = {settings['num_captions']} synthetic caption(s) per image by {html.escape(str(sampling['method']))}
(top_p {sampling['top_p']}); {html.escape(_criterion(settings))};
of the texts of an image that pass, {html.escape(settings['select'])} are kept, each distinct text once{
'' if not settings['dedup_images'] else '; duplicate images are dropped'}.
Schema version {stats['schema_version']}, capfilt {html.escape(stats['capfilt_version'])}.</p>
{_settings_table(settings)}
<h2>Kept pairs (examples)</h2>
{_example_cards(_examples(markers, kept=True))}
<h2>Removed texts (examples)</h2>
{_example_cards(_examples(markers, kept=False))}
{f'<h2>Unfinished shards</h2><p>Rerun the same command to retry them.</p><ul>{error_list}</ul>' if errors else ''}
{_damaged_section(damaged)}
</body></html>
"""
