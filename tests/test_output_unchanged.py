"""What CapFilt writes does not change unless a commit means it to: `make bootstrap`'s demo run, `capfilt refilter` at
three settings and `--dedup-images`, digested row by row (tests/output_digest.py) against tests/digests/output.json.

A change that is meant to change the output (a new schema version, another sampling rule) rewrites the stored
digest in the same commit, and says so: ``CAPFILT_WRITE_DIGEST=1 make test`` (this file only:
``CAPFILT_WRITE_DIGEST=1 .venv/bin/python -m pytest tests/test_output_unchanged.py``). A move or a redesign leaves
it as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from capfilt import cli
from output_digest import digest

STORED = Path(__file__).parent / "digests" / "output.json"
REFILTERS = {
    "threshold-0.7": ["--threshold", "0.7"],
    "itc-half": ["--keep-fraction", "0.5", "--by", "itc"],
    "top-1-dedup-images": ["--threshold", "0.5", "--select", "top-1", "--dedup-images"],
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("digest")
    runs = {"bootstrap": root / "bootstrap", "bootstrap-dedup-images": root / "bootstrap-dedup-images"}
    for name, extra in (("bootstrap", []), ("bootstrap-dedup-images", ["--dedup-images"])):
        code = cli.main(["bootstrap", "--data", "demo", "--out", str(runs[name]), "--shards-dir", str(root / "shards"),
                         "--captioner", "demo", "--filter", "demo", "--precision", "fp32", "--progress-interval",
                         "600", *extra])
        assert code == 0
    for name, args in REFILTERS.items():
        runs[name] = root / name
        assert cli.main(["refilter", "--from", str(runs["bootstrap"]), "--out", str(runs[name]), *args]) == 0
    return root, runs


def test_the_output_of_bootstrap_refilter_and_dedup_images_is_what_it_was(outputs):
    root, runs = outputs
    found = {name: digest(out, root) for name, out in runs.items()}
    if os.environ.get("CAPFILT_WRITE_DIGEST"):
        STORED.parent.mkdir(exist_ok=True)
        STORED.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    stored = json.loads(STORED.read_text())
    assert found.keys() == stored.keys()
    for name in found:
        assert found[name] == stored[name], name
