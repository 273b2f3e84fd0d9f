"""img2dataset's webdataset layout, written by tests: each success's ``.jpg``, ``.txt`` and ``.json`` in a tar."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


def write_webdataset_tar(path: Path, rows: list[dict]) -> None:
    """The tar of ``rows`` (dicts with key, status, jpg, caption, url), in their order; failed rows have no sample."""
    with tarfile.open(path, "w") as tar:
        for row in rows:
            if row["status"] != "success":
                continue
            for extension, data in (("jpg", row["jpg"]), ("txt", row["caption"].encode()),
                                    ("json", json.dumps({"url": row["url"]}).encode())):
                info = tarfile.TarInfo(f"{row['key']}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
