"""Paths are literal: ``[``, ``]``, ``*`` and ``?`` in OUT, ``--shards-dir`` or an input folder are characters of a
file name, never wildcards (Beam's match has no way to quote them; ``capfilt.pipelines.paths``)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from capfilt import cli
from capfilt.pipelines.paths import escape_for_beam, glob_in

DEMO = ["--demo-size", "24", "--demo-shard-size", "8", "--batch-size", "8", "--torch-threads", "1",
        "--progress-interval", "60"]


def rows(out, kind):
    return pq.read_table(out / kind).to_pylist()


@pytest.mark.parametrize("name", ["out[1]", "a*b?c", "[x]"])
def test_a_run_into_an_output_folder_with_wildcard_characters_is_whole_and_resumes(name, tmp_path, capsys):
    out = tmp_path / name / "run"
    args = ["bootstrap", "--data", "demo", "--out", str(out), "--captioner", "demo", "--filter", "demo", *DEMO]
    assert cli.main(args) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == 24 and stats["shards"]["done"] == 3
    assert sorted(p.name for p in (out / ".capfilt" / "done").glob("*.json")) == ["00000.json", "00001.json", "00002.json"]
    assert not list((out / ".capfilt" / "tmp").glob("*"))  # the job's temporary folder went with it
    judged = len(rows(out, "kept")) + len(rows(out, "rejected"))
    capsys.readouterr()
    assert cli.main(args) == 0  # the rerun finds every shard done
    assert "3 shard(s), 3 already done" in capsys.readouterr().err
    assert len(rows(out, "kept")) + len(rows(out, "rejected")) == judged


def test_refilter_and_export_read_and_write_folders_with_wildcard_characters(tmp_path):
    out = tmp_path / "src[2]"
    assert cli.main(["bootstrap", "--data", "demo", "--out", str(out), "--captioner", "demo", "--filter", "demo",
                     *DEMO]) == 0
    again = tmp_path / "re*fil[t]er"
    assert cli.main(["refilter", "--from", str(out), "--out", str(again), "--threshold", "0.7"]) == 0
    kept = rows(again, "kept")
    assert kept and all(row["itm_score"] >= 0.7 for row in kept)
    assert {row["sample_id"] for row in kept} <= {row["sample_id"] for row in rows(out, "kept")}


def test_glob_in_keeps_the_folder_literal(tmp_path):
    literal, decoy = tmp_path / "d[1]", tmp_path / "d1"
    for folder in (literal, decoy):
        folder.mkdir()
        (folder / "a.json").write_text("{}")
    assert glob_in(str(literal), "*.json") == [str(literal / "a.json")]
    assert glob_in(str(tmp_path / "d*"), "*.json") == []  # no folder is named d*
    assert escape_for_beam("gs://b/x[1]/*?") == "gs://b/x[][]1]/[*][?]"
