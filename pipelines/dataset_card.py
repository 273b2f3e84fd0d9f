"""The output folder's dataset card: ``OUT/README.md``, so that ``datasets.load_dataset(OUT)`` opens the kept set.

Hugging Face ``datasets`` reads the YAML block at the top of a folder's ``README.md``: its ``configs`` say which
files make which dataset, and the one marked ``default`` is what ``load_dataset(OUT)`` gives. Without it, datasets
globs every file under OUT into one split, kept/, rejected/ and failed/ together, and stops on their different
columns. The card's configs:

- ``kept`` (the default): ``kept/*.parquet``, one split ``train``;
- ``rejected`` and ``failed``: ``rejected/*.parquet``, ``failed/*.parquet``, each only where it has rows (a config
  whose files hold no row makes datasets raise "corresponds to no data"); kept/ and rejected/ cannot be two splits
  of one config, as their columns differ (the image; ``reason``).

The card's body, for a person: what made the data (the models, the threshold, K, the seed, the sampling, the
capfilt version and a command with these settings), the counts and the paper's noise ratio per source, each
column's meaning (``capfilt.pipelines.schema.DESCRIPTIONS``) and the licence caveat of web data. It is written
with ``stats.json`` from the same stats (``capfilt.pipelines.report.write_summary``, so ``capfilt refilter``
writes its own), through a temporary name, by Beam's filesystems (``gs://`` outputs too).
"""

from __future__ import annotations

import json
import posixpath
import shlex

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from capfilt.columns import IMAGE_COLUMNS
from capfilt.pipelines.layout import FAILED, KEPT, REJECTED, OutputLayout
from capfilt.pipelines.paths import glob_in
from capfilt.pipelines.schema import DESCRIPTIONS, SOURCES, STAGES

CARD_FILE = "README.md"  # the name datasets reads a folder's card from
DEFAULT_CONFIG = KEPT
SPLIT = "train"  # datasets' usual name for a config's one split


def rows_of(stats: dict) -> dict[str, int]:
    """The rows of kept/, rejected/ and failed/ as the run's stats count them."""
    return {KEPT: sum(stats["kept"].values()), REJECTED: sum(stats["rejected"].values()),
            FAILED: sum(stats["failed"].values())}


def configs(stats: dict) -> list[dict]:
    """The card's ``configs``: kept/ (the default), then rejected/ and failed/ where they have rows."""
    rows = rows_of(stats)
    found = []
    for kind in (KEPT, REJECTED, FAILED):
        if kind != DEFAULT_CONFIG and not rows[kind]:
            continue
        config = {"config_name": kind, "data_files": [{"split": SPLIT, "path": f"{kind}/*.parquet"}]}
        if kind == DEFAULT_CONFIG:
            config["default"] = True
        found.append(config)
    return found


def _yaml(stats: dict) -> str:
    """The card's YAML block. Strings are written as JSON strings, which YAML reads as they are."""
    lines = ["---", "license: unknown", "tags:", "- capfilt", "- image-text", "configs:"]
    for config in configs(stats):
        lines.append(f"- config_name: {config['config_name']}")
        if config.get("default"):
            lines.append("  default: true")
        lines.append("  data_files:")
        for files in config["data_files"]:
            lines += [f"  - split: {files['split']}", f"    path: {json.dumps(files['path'])}"]
    return "\n".join(lines + ["---"])


def command(stats: dict, root: str, inputs: list[str]) -> str:
    """A command line with the run's settings: ``capfilt refilter`` for a split made by it, else ``bootstrap``."""
    settings = stats["settings"]
    if settings.get("refiltered_from"):
        how = (["--keep-fraction", str(settings["keep_fraction"])] if settings.get("keep_fraction") is not None
               else ["--threshold", f"{settings['threshold']:.6g}"])
        parts = ["capfilt", "refilter", "--from", settings["refiltered_from"], "--out", root, *how,
                 "--by", settings["by"], "--select", settings["select"],
                 "--dedup-images" if settings["dedup_images"] else "--no-dedup-images"]
    else:
        folders = sorted({posixpath.dirname(path) for path in inputs if path})
        data = folders[0] if len(folders) == 1 else "SHARDS"
        parts = ["capfilt", "bootstrap", "--data", data, "--out", root, "--captioner", settings["captioner"],
                 "--filter", settings["filter"], "-k", str(settings["num_captions"]),
                 *(["--threshold", f"{settings['threshold']:g}"] if settings["threshold"] is not None else []),
                 "--by", settings.get("by", "itm"), "--select", settings["select"],
                 "--seed", str(settings["seed"]), "--batch-size", str(settings["batch_size"])]
        for flag, key in (("--captioner-tokenizer", "captioner_tokenizer"), ("--filter-tokenizer", "filter_tokenizer")):
            if settings.get(key):
                parts += [flag, settings[key]]
        for key, value in sorted((settings.get("sampling_overrides") or {}).items()):  # --top-p, --instruction ...
            parts += [f"--{key.replace('_', '-')}", value]
        if "min_image_size" in settings:
            parts += ["--min-image-size", settings["min_image_size"]]
        if settings["dedup_images"]:
            parts.append("--dedup-images")
    return " ".join(shlex.quote(str(part)) for part in parts)


def threshold_text(settings: dict) -> str:
    """The threshold and the score it was on; a top-N run without threshold ranks by the score alone."""
    by = settings.get("by", "itm").upper()
    if settings["threshold"] is None:
        return f"none: each image's texts ranked by {by} ({settings['select']})"
    return f"{settings['threshold']:.6g} on {by}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _columns(layout: OutputLayout, kind: str) -> list[tuple[str, str]]:
    """(name, type) of a kind's columns, from its first file's footer (none when it has no file)."""
    files = glob_in(layout.root, kind, "*.parquet")
    if not files:
        return []
    with FileSystems.open(files[0]) as f:
        schema = pq.read_schema(f)
    return [(field.name, str(field.type)) for field in schema]


def _column_table(columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| column | type | meaning |", "|---|---|---|"]
    for name, type_ in columns:
        meaning = DESCRIPTIONS.get("image" if name in IMAGE_COLUMNS else name,
                                   "the input's own column, passed through unchanged")
        lines.append(f"| `{name}` | {_cell(type_)} | {_cell(meaning)} |")
    return lines


def render(stats: dict, root: str, inputs: list[str], columns: dict[str, list[tuple[str, str]]]) -> str:
    """The card's text: the YAML block, then the body (``columns``: each kind's (name, type) list)."""
    settings, rows = stats["settings"], rows_of(stats)
    sampling = settings.get("sampling") or {}
    made = [
        ("captioner", settings["captioner"]), ("filter", settings["filter"]),
        ("synthetic captions per image (K)", settings["num_captions"]),
        ("threshold", threshold_text(settings)),
        ("select", settings["select"]), ("duplicate images dropped", settings["dedup_images"]),
        ("seed", settings["seed"]),
        ("sampling", ", ".join(f"{k} {json.dumps(v)}" for k, v in sorted(sampling.items())) or "–"),
        ("capfilt version", stats["capfilt_version"]), ("schema version", stats["schema_version"]),
    ]
    if settings.get("refiltered_from"):
        made.append(("split anew from", f"{settings['refiltered_from']} (capfilt refilter: no model ran)"))
    lines = [
        _yaml(stats), "",
        f"# CapFilt output: {posixpath.basename(root.rstrip('/')) or root}", "",
        "Image-text pairs bootstrapped with CapFilt (BLIP, Li et al. 2022): a captioner wrote synthetic captions "
        "for each web image, and a filter (its ITM head, or an ITC similarity) removed the texts, web or "
        "synthetic, that do not match their image. `kept/` is the dataset; `rejected/` holds every removed text "
        "with its scores and reason, `failed/` every input row that could not be judged. `stats.json` and "
        "`report.html` describe the run.", "",
        "## Load it", "",
        "```python",
        "from datasets import load_dataset",
        f'kept = load_dataset("{root}", split="train")  # the default config: kept/',
        *(f'{kind} = load_dataset("{root}", "{kind}", split="train")' for kind in (REJECTED, FAILED)
          if any(c["config_name"] == kind for c in configs(stats))),
        "```", "",
        f"DuckDB: `SELECT caption, url, itm_score FROM '{root}/kept/*.parquet'` (the image is `jpg.bytes`, "
        "or `png.bytes`, `webp.bytes`: the input's image column). webdataset tars for open_clip: "
        f"`capfilt export-dataset --from {root}/kept --out TARS`.", "",
        "## What made it", "",
        "| setting | value |", "|---|---|",
        *(f"| {name} | {_cell(value)} |" for name, value in made), "",
        "A command with these settings:", "",
        "```", command(stats, root, inputs), "```", "",
        "## Counts", "",
        f"{stats['rows']} input rows, {stats['images']} images judged, {rows[FAILED]} rows failed; "
        f"{stats['shards']['done']} of {stats['shards']['selected']} shards done.", "",
        "| source | texts | kept | removed | noise ratio |", "|---|---|---|---|---|",
        *(f"| {source} | {stats['texts'][source]} | {stats['kept'][source]} | {stats['rejected'][source]} | "
          f"{_percent(stats['noise_ratio'][source])} |" for source in SOURCES), "",
        "The noise ratio is the paper's: the share of a source's texts that the filter removed (below the "
        "threshold); texts removed as duplicates or by `--select` passed the filter.", "",
        "Removed texts by reason: " + "; ".join(
            f"{reason} {sum(counts.values())}" for reason, counts in stats["rejected_reasons"].items()) + ".",
        "Failed rows by stage: " + "; ".join(f"{stage} {stats['failed'].get(stage, 0)}" for stage in STAGES) + ".", "",
        "## Configs", "",
        "| config | files | rows |", "|---|---|---|",
        *(f"| {c['config_name']}{' (default)' if c.get('default') else ''} | `{c['config_name']}/*.parquet` | "
          f"{rows[c['config_name']]} |" for c in configs(stats)), "",
        "## Columns", "",
    ]
    for kind in (KEPT, REJECTED, FAILED):
        if columns.get(kind):
            lines += [f"### {kind}/", "", *_column_table(columns[kind]), ""]
    lines += [
        "The image column is Hugging Face datasets' `Image` storage, a struct `{bytes, path}` (img2dataset writes "
        "plain bytes): datasets decodes it to a PIL image, DuckDB and pyarrow read `jpg.bytes`.", "",
        "## Licence", "",
        "The images, URLs and web texts come from the web: they belong to their owners and carry their own terms, "
        "which this folder does not change; it grants no licence to them. Check the terms of the source the input "
        "came from before you redistribute or train on it. The synthetic captions were written by the captioner "
        f"({_cell(settings['captioner'])}); its own licence applies to its use.", "",
    ]
    return "\n".join(lines)


def write_dataset_card(layout: OutputLayout, stats: dict, markers: list[dict]) -> None:
    """Write ``OUT/README.md`` for ``stats`` (the run's, as in ``stats.json``) through a temporary name."""
    inputs = [marker.get("input", "") for marker in markers]
    columns = {kind: _columns(layout, kind) for kind in (KEPT, REJECTED, FAILED)}
    text = render(stats, layout.root.rstrip("/"), inputs, columns)
    layout.write_atomically(FileSystems.join(layout.root.rstrip("/"), CARD_FILE), text)

