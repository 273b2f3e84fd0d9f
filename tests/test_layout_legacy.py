"""An output of schema version 4 (markers in ``_done/``, kept/ and rejected/ without ``status`` and ``error_message``):
``capfilt refilter`` reads it where it is and writes version 5; a bootstrap rerun into it is refused with a message
that names both versions and the way out."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from capfilt import cli
from capfilt.pipelines.bootstrap import claim_output
from capfilt.pipelines.layout import DONE, LEGACY_DONE, SettingsMismatchError
from capfilt.pipelines.schema import METADATA_KEY, SCHEMA_VERSION
from capfilt.pipelines.settings import BootstrapSettings
from test_dataset_clients import out  # noqa: F401 - the module's fixture: a small finished OUT


@pytest.fixture
def old_out(out, tmp_path):  # noqa: F811
    """``out`` as capfilt of schema version 4 wrote it."""
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / DONE).rename(old / LEGACY_DONE)
    shutil.rmtree(old / ".capfilt")
    (old / "README.md").unlink()
    for kind in ("kept", "rejected"):
        for path in (old / kind).glob("*.parquet"):
            table = pq.read_table(path).drop_columns(["status", "error_message"])
            metadata = dict(table.schema.metadata)
            metadata[METADATA_KEY] = json.dumps({**json.loads(metadata[METADATA_KEY]), "schema_version": 4})
            pq.write_table(table.replace_schema_metadata(metadata), path)
    run = json.loads((old / "_run.json").read_text())
    (old / "_run.json").write_text(json.dumps({**run, "schema_version": 4}))
    return old


def test_refilter_reads_a_version_4_output_and_writes_version_5(old_out, out, tmp_path):  # noqa: F811
    from datasets import load_dataset

    new = tmp_path / "new"
    assert cli.main(["refilter", "--from", str(old_out), "--out", str(new), "--threshold", "0"]) == 0
    assert sorted(p.name for p in (new / DONE).glob("*.json")) == ["00000.json", "00001.json"]
    assert not (new / LEGACY_DONE).exists()
    assert json.loads((new / "_run.json").read_text())["schema_version"] == SCHEMA_VERSION
    kept = load_dataset(str(new), split="train", cache_dir=str(tmp_path / "cache"))
    assert kept["sample_id"] == pq.read_table(out / "kept").column("sample_id").to_pylist()
    assert set(kept["status"]) == {"success"} and set(kept["error_message"]) == {None}
    assert pq.read_table(new / "rejected").column_names == pq.read_table(out / "rejected").column_names
    assert all(json.loads(c)["schema_version"] == SCHEMA_VERSION for c in kept["capfilt_config"])


def test_a_bootstrap_rerun_into_a_version_4_output_is_refused(old_out):
    run = json.loads((old_out / "_run.json").read_text())
    settings = BootstrapSettings(**{k: v for k, v in run.items() if k != "schema_version"})
    with pytest.raises(SettingsMismatchError, match=r"schema version 4, this capfilt writes version 5.*refilter"):
        claim_output(str(old_out), settings)
