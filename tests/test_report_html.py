"""report.html of a real run (``process_shard`` on the shipped demo models, a shard of the shapes world's web split
and one with failed rows), checked against its own output files, parsed, and rendered in headless Chromium."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.pipelines import histogram
from capfilt.pipelines.layout import FAILED, KEPT, REJECTED, OutputLayout
from capfilt.pipelines.process import process_shard
from capfilt.pipelines.refilter import RefilterSettings, refilter
from capfilt.pipelines.report import read_stats, write_summary
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.shards import list_shards
from capfilt.pipelines.worker_models import Models
from capfilt.shapes import write_split

ROWS = 110  # demo rows: over keep_share_warnings' 100 judged texts per source
BROKEN_URL = "http://127.0.0.1/broken/404.jpg"
UNDECODABLE_URL = "http://127.0.0.1/broken/not-an-image.jpg"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Element:
    def __init__(self, tag: str, attrs: dict):
        self.tag, self.attrs, self.text = tag, attrs, ""


class Page(HTMLParser):
    """Every element of a page with its attributes and all the text inside it."""

    VOID = {"meta", "img", "br", "hr", "input", "link"}  # HTML elements without an end tag

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = Element(tag, dict(attrs))
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_startendtag(self, tag, attrs):
        self.elements.append(Element(tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not any(e.tag == tag for e in self._open):  # a stray end tag closes nothing
            return
        while self._open:
            if self._open.pop().tag == tag:
                break

    def handle_data(self, data):
        for element in self._open:
            element.text += data

    def find(self, tag: str | None = None, **attrs) -> list[Element]:
        return [e for e in self.elements if (tag is None or e.tag == tag)
                and all(e.attrs.get(k.rstrip("_")) == v for k, v in attrs.items())]


def failing_shard(folder: Path, demo_rows: list[dict]) -> None:
    """Demo rows, two of them failing: a download error with its URL, bytes that are not an image."""
    rows = [dict(r) for r in demo_rows[:6]]
    for i, row in enumerate(rows):
        row["key"] = f"9{i:08d}"
    rows[1].update(jpg=None, status="failed_to_download", error_message="HTTP Error 404: Not Found", url=BROKEN_URL)
    rows[3].update(jpg=b"this is not an image", url=UNDECODABLE_URL)
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(folder / "00000.parquet")),
                   folder / "00001.parquet")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    shards = root / "shards"
    write_split("web", ROWS, 5, shards, shard_size=ROWS)
    failing_shard(shards, pq.read_table(shards / "00000.parquet").to_pylist())
    settings = BootstrapSettings(captioner="demo", filter="demo", batch_size=16, torch_threads=1)
    models = Models.load(settings)
    layout = OutputLayout(str(root / "out"))
    layout.claim(settings.provenance())
    layout = layout.start_run(local=True)
    for shard in list_shards(str(shards)):
        process_shard(shard, models, settings, layout)
    write_summary(layout, settings, 2)
    layout.end_run()
    return layout


def table(layout: OutputLayout, kind: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(Path(layout.root, kind).glob("*.parquet")))


def judged(layout: OutputLayout) -> list[dict]:
    columns = ["source", "itm_score"]
    return (table(layout, KEPT).select(columns).to_pylist()
            + table(layout, REJECTED).select(columns + ["reason"]).to_pylist())


@pytest.fixture(scope="module")
def page(run) -> Page:
    return Page(Path(run.report_file).read_text())


def test_the_histogram_has_a_panel_per_source_with_ticks_and_a_labelled_threshold(run, page):
    texts = judged(run)
    for source in ("web", "synthetic"):
        (panel,) = page.find("g", **{"class": "panel", "data-source": source})
        inside = page.elements[page.elements.index(panel):]
        inside = inside[:next((i for i, e in enumerate(inside[1:], 1) if e.tag == "g"), len(inside))]  # to the next
        xticks = [e.text for e in inside if e.attrs.get("class") == "xtick"]
        assert xticks == [f"{t / 10:.1f}" for t in range(11)]
        yticks = [int(e.text) for e in inside if e.attrs.get("class") == "ytick"]
        # independent truth: the scores in kept/ and rejected/, binned as the histogram's 20 bins of 0.05
        scores = np.array([t["itm_score"] for t in texts if t["source"] == source])
        counts = np.bincount(np.minimum((scores * 20).astype(int), 19), minlength=20)
        assert len(yticks) >= 3 and yticks == sorted(yticks) and yticks[0] == 0 and yticks[-1] >= counts.max()
        bars = [int(e.text.rsplit(": ", 1)[1]) for e in inside if e.tag == "title"]
        assert bars == counts.tolist()
        (label,) = [e for e in inside if e.attrs.get("class") == "threshold-label"]
        assert label.text.startswith("threshold 0.5")
        (line,) = [e for e in inside if e.attrs.get("class") == "threshold"]
        plot_w = histogram.WIDTH - histogram.LEFT - histogram.RIGHT
        assert float(line.attrs["x1"]) == pytest.approx(histogram.LEFT + 0.5 * plot_w, abs=0.1)
        (title,) = [e for e in inside if e.tag == "text" and e.text == "ITM match probability"]
        panel_bottom = ("web", "synthetic").index(source) * histogram.PANEL_HEIGHT + histogram.PANEL_HEIGHT
        assert float(title.attrs["y"]) + 4 <= panel_bottom  # the x-axis title's descenders stay inside the panel


def test_the_report_shows_failed_rows_with_their_url_and_error(run, page):
    failed = table(run, FAILED).to_pylist()
    assert {(r["stage"], r["url"]) for r in failed} == {("download", BROKEN_URL), ("decode", UNDECODABLE_URL)}
    (examples,) = page.find("table", **{"class": "failed"})
    for row in failed:
        assert row["url"] in examples.text and row["error"] in examples.text and row["stage"] in examples.text
    assert read_stats(run)["failed_examples"]["download"][0]["error"] == "HTTP Error 404: Not Found"


def test_the_report_shows_the_noise_ratio_of_each_source_at_a_glance(run, page):
    texts = judged(run)
    for source in ("web", "synthetic"):
        mine = [t for t in texts if t["source"] == source]
        noise = sum(1 for t in mine if t.get("reason") == "below threshold") / len(mine)
        (card,) = page.find("div", **{"class": "glance-card", "data-source": source})
        assert f"{100 * noise:.1f}%" in card.text and f"{len(mine)} judged" in card.text
    assert not page.find("div", **{"class": "warn"})  # the demo models keep a plausible share


def test_the_report_states_the_run_time_and_images_per_second(run, page):
    stats = read_stats(run)
    markers = run.read_markers()
    this = stats["timing"]["this_run"]
    assert this["run"] == run.run and this["shards"] == 2 and this["images"] == sum(m["images"] for m in markers)
    start = min(m["timing"]["started"] for m in markers)
    end = max(m["timing"]["started"] + m["seconds"] for m in markers)
    assert this["wall_seconds"] == pytest.approx(end - start, abs=0.01)
    assert this["images_per_second"] == pytest.approx(this["images"] / (end - start), rel=0.01)
    seconds = sum(m["seconds"] for m in markers)
    assert stats["timing"]["images_per_shard_second"] == pytest.approx(this["images"] / seconds, rel=0.01)
    text = " ".join(page.find("body")[0].text.split())
    assert f"{this['images']} images judged in" in text and f"{this['images_per_second']:.1f} images/s" in text
    assert "images/s per worker" in text and "model loading and this summary are not included" in text


def test_a_refilter_that_keeps_nothing_warns_in_its_report(run, tmp_path):
    out = tmp_path / "none"
    stats = refilter(RefilterSettings(threshold=1.0), run.root, str(out))
    assert stats["kept"] == {"web": 0, "synthetic": 0}
    warnings = Page((out / "report.html").read_text()).find("div", **{"class": "warn"})
    assert len(warnings) == 2 and all("the filter kept 0.0% of the" in w.text for w in warnings)
    assert stats["keep_share_warnings"] == [" ".join(w.text.split()).removeprefix("Warning: ") for w in warnings]


def test_the_report_is_one_file_with_no_scripts_or_remote_resources(run):
    text = Path(run.report_file).read_text()
    page = Page(text)
    assert not page.find("script") and not page.find("link")
    assert all(e.attrs["src"].startswith("data:image/") for e in page.find("img"))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium); the "
                                             "report's rendering is not checked")
def test_headless_chromium_renders_the_report(run, tmp_path):
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    url = Path(run.report_file).resolve().as_uri()
    dom = subprocess.run(command + ["--dump-dom", url], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "HOME": str(tmp_path)}).stdout
    rendered = Page(dom)
    assert {e.attrs.get("id") for e in rendered.find("h2")} >= {"glance", "histogram", "rows", "run-time", "settings"}
    assert len(rendered.find("g", **{"class": "panel"})) == 2
    png = tmp_path / "report.png"
    subprocess.run(command + [f"--screenshot={png}", "--window-size=1200,1400", url], capture_output=True,
                   timeout=120, check=True, env={**os.environ, "HOME": str(tmp_path)})
    pixels = np.asarray(Image.open(io.BytesIO(png.read_bytes())).convert("RGB")).reshape(-1, 3).astype(int)
    colours = Counter()
    for source, hex_colour in histogram.COLOURS.items():  # the bars of both panels were drawn
        rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
        colours[source] = int((np.abs(pixels - rgb).sum(axis=1) < 30).sum())
    assert min(colours.values()) > 500, colours
