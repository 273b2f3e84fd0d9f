"""capfilt.recipes.loop_report: the round-against-round table from two fake CapFilt output folders."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.pipelines.schema import BELOW_THRESHOLD
from capfilt.pipelines.selection import CODES, KEPT_CODE
from capfilt.pipelines.stats import ShardStats, merge
from capfilt.recipes import loop_report
from capfilt.shapes import caption, iter_split, scene_to_json


def _write_out(folder, web: dict, synthetic: list[tuple[bool, bool]]) -> None:
    """A CapFilt output folder: ``web`` maps kind -> (kept, rejected) counts; ``synthetic`` lists (kept, correct)."""
    samples = iter(iter_split("web", 64, seed=3))
    rows = {True: [], False: []}
    for kind, (kept, rejected) in web.items():
        for is_kept in [True] * kept + [False] * rejected:
            sample = next(samples)
            rows[is_kept].append({"source": "web", "text": sample.text, "kind": kind,
                                  "scene": scene_to_json(sample.scene), "itm_score": 0.9 if is_kept else 0.1})
    for is_kept, correct in synthetic:
        sample = next(samples)
        text = caption(sample.scene) if correct else "a picture of nothing at all"
        rows[is_kept].append({"source": "synthetic", "text": text, "kind": sample.kind,
                              "scene": scene_to_json(sample.scene), "itm_score": 0.9 if is_kept else 0.1})
    for name, is_kept in (("kept", True), ("rejected", False)):
        (folder / name).mkdir(parents=True)
        # Two files per folder, as a run over two shards writes.
        half = len(rows[is_kept]) // 2
        for i, part in enumerate((rows[is_kept][:half], rows[is_kept][half:])):
            pq.write_table(pa.Table.from_pylist(part, schema=pa.schema(
                [("source", pa.string()), ("text", pa.string()), ("kind", pa.string()), ("scene", pa.string()),
                 ("itm_score", pa.float32())])), folder / name / f"{i:05d}.parquet")
    # stats.json as the pipeline writes it: the merge of its shards' counts.
    shard = ShardStats(shard="00000")
    for is_kept in (True, False):
        shard.add_texts([row["source"] for row in rows[is_kept]], [row["itm_score"] for row in rows[is_kept]],
                        [KEPT_CODE if is_kept else CODES[BELOW_THRESHOLD]] * len(rows[is_kept]))
    shard.images = shard.rows = len(synthetic)
    stats = merge([shard.to_dict()])
    (folder / "stats.json").write_text(json.dumps(stats))


@pytest.fixture
def outs(tmp_path):
    one, two = tmp_path / "round1", tmp_path / "round2"
    # Round 1: 10 web texts, 4 kept; 10 synthetic, 8 kept (6 of them correct), 2 rejected (1 correct).
    _write_out(one, {"clean": (3, 1), "mismatch": (0, 3), "partial": (1, 1), "alt": (0, 1)},
               [(True, True)] * 6 + [(True, False)] * 2 + [(False, True), (False, False)])
    # Round 2: 10 web texts, 5 kept; 10 synthetic, 5 kept, all correct, 5 rejected, none correct. No alt texts.
    _write_out(two, {"clean": (4, 0), "mismatch": (0, 4), "partial": (1, 1)},
               [(True, True)] * 5 + [(False, False)] * 5)
    return one, two


def test_summarize(outs):
    one, two = outs
    first, second = loop_report.summarize(one), loop_report.summarize(two)
    assert first["texts"] == {"web": 10, "synthetic": 10}
    assert first["kept"] == {"web": 0.4, "synthetic": 0.8}
    assert first["noise_ratio"] == {"web": 0.6, "synthetic": pytest.approx(0.2)}
    assert first["web_kept_by_kind"] == {"clean": 0.75, "mismatch": 0.0, "partial": 0.5, "alt": 0.0}
    assert first["synthetic_correct"] == pytest.approx(0.7)
    assert first["synthetic_correct_kept"] == pytest.approx(0.75)
    assert second["kept"] == {"web": 0.5, "synthetic": 0.5}
    assert second["web_kept_by_kind"] == {"clean": 1.0, "mismatch": 0.0, "partial": 0.5, "alt": None}
    assert second["synthetic_correct"] == 0.5 and second["synthetic_correct_kept"] == 1.0


def test_printed_table(outs):
    buffer = io.StringIO()
    loop_report.report(list(outs), file=buffer)
    lines = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
             for line in buffer.getvalue().splitlines() if line.startswith("| ") and line.split("|")[1].strip()}
    assert lines["web texts judged"] == ["10", "10"]
    assert lines["web texts kept"] == ["40.0%", "50.0%"]
    assert lines["synthetic captions kept"] == ["80.0%", "50.0%"]
    assert lines["noise ratio, web"] == ["60.0%", "50.0%"]
    assert lines["noise ratio, synthetic"] == ["20.0%", "50.0%"]
    assert lines["web kept: clean"] == ["75.0%", "100.0%"]
    assert lines["web kept: mismatch"] == ["0.0%", "0.0%"]
    assert lines["web kept: partial"] == ["50.0%", "50.0%"]
    assert lines["web kept: alt"] == ["0.0%", "-"]
    assert lines["synthetic correct"] == ["70.0%", "50.0%"]
    assert lines["synthetic correct, among kept"] == ["75.0%", "100.0%"]
    assert buffer.getvalue().splitlines()[0] == f"round 1: {outs[0]}"


def test_cli(outs, capsys):
    assert loop_report.main([str(outs[0]), str(outs[1]), "--labels", "before", "after"]) == 0
    printed = capsys.readouterr().out
    assert "| before |" in printed.splitlines()[2] and "after" in printed.splitlines()[2]
    with pytest.raises(SystemExit):
        loop_report.main([str(outs[0].parent / "missing")])
