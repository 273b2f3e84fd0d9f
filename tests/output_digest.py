"""A digest of what a CapFilt output folder holds: the rows and values of its Parquet files, file by file.

Scores are rounded to 5 decimals (the last float bits of a matrix product may differ between CPUs); image bytes
enter as their SHA-256; paths under the run's own folder are written relative to it (a test's tmp_path differs
between runs); Parquet's key-value metadata (where the same paths and settings sit) is left out, the same
settings being in every row's ``capfilt_config``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq

KINDS = ("kept", "rejected", "failed")
DECIMALS = 5


def _value(value, root: str):
    if isinstance(value, float):
        return round(value, DECIMALS)
    if isinstance(value, bytes):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    if isinstance(value, str):
        return value.replace(root, "<ROOT>")
    if isinstance(value, dict):
        return {k: _value(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_value(v, root) for v in value]
    return value


def _normalised_config(text: str, root: str) -> str:
    config = json.loads(text.replace(root, "<ROOT>"))
    return json.dumps(config, sort_keys=True)


def rows(out: Path, root: Path) -> dict[str, list[dict]]:
    """Every row of ``out``'s kept/, rejected/ and failed/ files, in file order, values normalised."""
    prefix = str(root)
    found = {}
    for kind in KINDS:
        for path in sorted((out / kind).glob("*.parquet")):
            table = pq.read_table(path)
            found[f"{kind}/{path.name}"] = [
                {k: (_normalised_config(v, prefix) if k == "capfilt_config" and v else _value(v, prefix))
                 for k, v in row.items()} for row in table.to_pylist()]
    return found


def digest(out: Path, root: Path) -> dict[str, str]:
    """File -> SHA-256 of its normalised rows, and the row count of each file."""
    result = {}
    for name, file_rows in rows(out, root).items():
        text = json.dumps(file_rows, sort_keys=True, ensure_ascii=True)
        result[name] = f"{len(file_rows)} rows sha256:{hashlib.sha256(text.encode()).hexdigest()}"
    return result
