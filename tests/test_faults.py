"""The fault suite: a URL list of everything the web does wrong, end to end, with nothing lost.

A fault-injecting HTTP server on 127.0.0.1 answers each path with one fault
(404, 500, a reset connection, a timeout, a slow drip, a redirect loop, the
wrong content type, a truncated JPEG, random bytes, an HTML page, a 1x1
image, a decompression bomb, an EXIF-rotated JPEG, a 16-bit PNG, an animated
GIF), and good images carry hostile captions (empty, whitespace, 10,000
characters, bytes that are not UTF-8, NUL and control characters, emoji,
right-to-left text, HTML and script). ``capfilt bootstrap`` downloads the list
with img2dataset and runs the pipeline; every input line must end in exactly
one of kept/rejected (judged) or failed, with its stage and reason.

Traffic goes to loopback only (127.0.0.1): the refusal of private, link-local
and metadata addresses is tested on the URL check itself (``test_urls.py``),
never by sending anything there. Time is bounded: img2dataset's timeout is
2 s, the slowest fault answers within 4 s.
"""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import struct
import time
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt import cli
from loopback import Handler, LoopbackHTTP, keep_proxies_away

TIMEOUT_S = 2  # img2dataset's --timeout for these runs
BOMB_SIDE = 12_000  # a PNG of 144 M pixels in a few hundred KB: above max_image_pixels (50 M)


def jpeg(colour, size=(64, 48), **save) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def noise_jpeg(side=256) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(side: int) -> bytes:
    """A greyscale PNG of side x side zeros, written chunk by chunk (PIL would hold the pixels first)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, row = zlib.compressobj(9), b"\x00" * (side + 1)  # filter byte 0, then the row
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """Left half red, right half blue, stored unrotated with EXIF orientation 6 (display rotated 90 CW)."""
    image = Image.new("RGB", (64, 48), (220, 20, 20))
    image.paste((20, 20, 220), (32, 0, 64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def sixteen_bit_png() -> bytes:
    values = np.full((48, 64), 30_000, dtype=np.uint16)  # mid grey in 16 bits; clipped to 8 bits it is white
    return png(Image.fromarray(values))


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((230, 30, 30), (30, 30, 230))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


class FaultServer(LoopbackHTTP):
    """127.0.0.1: each path is a fault (or a good image); counts the requests it answered."""

    def __init__(self):
        good = {f"/good/{i}.jpg": ("image/jpeg", jpeg((30 * i, 200 - 20 * i, 90))) for i in range(4)}
        noise = noise_jpeg()
        bodies = {
            **good,
            "/wrong-type.jpg": ("text/html", jpeg((10, 180, 40))),  # an image served as a page
            "/truncated.jpg": ("image/jpeg", noise[: len(noise) // 3]),
            "/random.jpg": ("image/jpeg", random.Random(0).randbytes(3000)),
            "/page.jpg": ("image/jpeg", b"<!doctype html><html><body><img src=x></body></html>"),
            "/one-pixel.png": ("image/png", png(Image.new("RGB", (1, 1), (255, 0, 0)))),
            "/bomb.png": ("image/png", bomb_png(BOMB_SIDE)),
            "/exif-rotated.jpg": ("image/jpeg", exif_rotated_jpeg()),
            "/16-bit.png": ("image/png", sixteen_bit_png()),
            "/animated.gif": ("image/gif", animated_gif()),
        }
        requests = self.requests = []

        class Faults(Handler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                path = self.path.split("?")[0]
                requests.append(path)
                if path in bodies:
                    content_type, body = bodies[path]
                    self.answer(200, content_type, body)
                elif path == "/500":
                    self.send_error(500, "Internal Server Error")
                elif path == "/loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == "/reset":  # RST instead of an answer
                    self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.request.close()
                    self.close_connection = True
                elif path == "/timeout":  # answers after the client gave up
                    time.sleep(TIMEOUT_S + 2)
                    self.answer(200, "image/jpeg", good["/good/0.jpg"][1])
                elif path == "/drip":  # a promised 5,000 bytes, 10 of them sent slowly, then the connection ends
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", "5000")
                    self.end_headers()
                    for byte in good["/good/0.jpg"][1][:10]:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.2)
                    self.close_connection = True
                else:
                    self.send_error(404, "Not Found")

        super().__init__(Faults)


@pytest.fixture
def faults(monkeypatch):
    keep_proxies_away(monkeypatch)
    with FaultServer() as server:
        yield server


HOSTILE_CAPTIONS = {
    "empty": "",
    "whitespace": "   \u3000 \u00a0 ",
    "long": ("a red circle above a blue square " * 400)[:10_000],
    "control": "nul\x00byte, bell\x07, escape\x1b[31m red\x1b[0m, delete\x7f, form\x0cfeed",
    "emoji": "🐶🐱 a dog and a cat 👍🏽 🏳️‍🌈",
    "right-to-left": "\u202egnp.exe\u202c שלום עולם مرحبا بالعالم",
    "markup": "<script>alert('capfilt')</script><img src=x onerror=alert(1)> &amp; <b>bold</b>",
}


def url_list_lines(server: FaultServer, local_image) -> list[tuple[str, bytes, str]]:
    """(name, the TSV line's bytes, the outcome it must have): judged, or failed at a stage."""
    base = server.url
    lines = [(f"good {i}", f"{base}/good/{i}.jpg\ta picture number {i}".encode(), "judged") for i in range(2)]
    for i, (name, caption) in enumerate(HOSTILE_CAPTIONS.items()):
        lines.append((f"caption {name}", f"{base}/good/{i % 4}.jpg?caption={i}\t{caption}".encode(), "judged"))
    lines.append(("caption not utf-8", f"{base}/good/3.jpg?caption=latin1\tcaf".encode() + b"\xe9 cr\xe8me", "parse"))
    faults = {
        "404": ("/missing.jpg", "download"), "500": ("/500", "download"), "reset": ("/reset", "download"),
        "timeout": ("/timeout", "download"), "slow drip": ("/drip", "download"), "redirect loop": ("/loop", "download"),
        "wrong content type": ("/wrong-type.jpg", "judged"), "truncated jpeg": ("/truncated.jpg", "judged or failed"),
        "random bytes": ("/random.jpg", "download"), "html page": ("/page.jpg", "download"),
        "1x1": ("/one-pixel.png", "size"), "decompression bomb": ("/bomb.png", "download or size"),
        "exif rotated": ("/exif-rotated.jpg", "judged"), "16-bit png": ("/16-bit.png", "judged"),
        "animated gif": ("/animated.gif", "judged or failed"),
    }
    lines += [(name, f"{base}{path}\t{name}".encode(), outcome) for name, (path, outcome) in faults.items()]
    data = base64.b64encode(jpeg((1, 2, 3))).decode()
    refused = {
        "file url": f"file://{local_image}", "ftp url": f"ftp://127.0.0.1:9/{'x.jpg'}",
        "data url": f"data:image/jpeg;base64,{data}", "javascript url": "javascript:alert(1)",
    }
    lines += [(name, f"{url}\t{name}".encode(), "download refused") for name, url in refused.items()]
    return lines


def outcomes(out) -> dict[str, list[tuple[str, dict]]]:
    """Input caption -> [(where, row)] over kept, rejected and failed (one entry per input row when judged)."""
    found: dict[str, list[tuple[str, dict]]] = {}
    judged_keys = set()
    for kind in ("kept", "rejected"):
        for row in pq.read_table(out / kind).to_pylist():
            if row["key"] in judged_keys:
                continue  # one entry per judged image (its texts are checked below)
            judged_keys.add(row["key"])
            found.setdefault(row["web_text"], []).append(("judged", row))
    for row in pq.read_table(out / "failed").to_pylist():
        found.setdefault(row["web_text"], []).append(("failed", row))
    return found


def test_every_fault_ends_in_exactly_one_place_with_its_reason(faults, captioner_folder, filter_folder, tmp_path,
                                                               one_torch_thread):
    local_image = tmp_path / "local.jpg"
    local_image.write_bytes(jpeg((5, 5, 5)))
    lines = url_list_lines(faults, local_image)
    url_list = tmp_path / "faults.tsv"
    url_list.write_bytes(b"".join(line + b"\n" for _, line, _ in lines))
    out = tmp_path / "out"
    code = cli.main([
        "bootstrap", "--data", str(url_list), "--out", str(out), "--allow-private-addresses",
        "--captioner", str(captioner_folder), "--filter", str(filter_folder),
        "--processes", "1", "--threads", "8", "--samples-per-shard", "16", "--timeout", str(TIMEOUT_S),
        "--batch-size", "4", "--torch-threads", "1", "--progress-interval", "60",
    ])
    assert code == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == len(lines)
    found = outcomes(out)
    by_caption = {}
    for name, line, outcome in lines:
        caption = line.split(b"\t", 1)[1].decode("utf-8", errors="replace")
        if outcome == "parse":  # the whole line is the caption, bad bytes as U+FFFD
            caption = line.decode("utf-8", errors="replace")
        by_caption[name] = (caption, outcome)
    assert sum(len(v) for v in found.values()) == len(lines)  # nothing lost, nothing twice
    for name, (caption, outcome) in by_caption.items():
        places = found.get(caption, [])
        assert len(places) == 1, f"{name}: {places}"
        where, row = places[0]
        if outcome == "judged":
            assert where == "judged", f"{name}: {row}"
        elif outcome == "judged or failed":
            assert where == "judged" or row["error"], f"{name}: {row}"
        else:
            assert where == "failed", f"{name}: {row}"
            stages = outcome.replace(" refused", "").split(" or ")
            assert row["stage"] in stages and row["error"], f"{name}: {row}"
    failed = {name: found[caption][0][1] for name, (caption, _) in by_caption.items()
              if found[caption][0][0] == "failed"}
    assert "404" in failed["404"]["error"] and "500" in failed["500"]["error"]
    assert "timed out" in failed["timeout"]["error"].lower()
    assert "redirect" in failed["redirect loop"]["error"].lower()
    for name in ("file url", "ftp url", "data url", "javascript url"):
        assert failed[name]["error"].startswith("refused") and failed[name]["url"], failed[name]
    assert failed["caption not utf-8"]["error"].startswith("line ")
    # The refused URLs never reached img2dataset: the local file was not read into kept/ and nothing asked the server
    # for a path it does not serve except the faults themselves.
    assert set(faults.requests) <= {"/good/0.jpg", "/good/1.jpg", "/good/2.jpg", "/good/3.jpg", "/missing.jpg", "/500",
                                    "/reset", "/timeout", "/drip", "/loop", "/wrong-type.jpg", "/truncated.jpg",
                                    "/random.jpg", "/page.jpg", "/one-pixel.png", "/bomb.png", "/exif-rotated.jpg",
                                    "/16-bit.png", "/animated.gif"}
    # Judged images: the web text (when there is one) and K=1 caption each, in kept or rejected.
    texts = {}
    for kind in ("kept", "rejected"):
        for row in pq.read_table(out / kind).to_pylist():
            texts.setdefault(row["key"], []).append(row["source"])
    for name in ("empty", "whitespace"):
        key = found[HOSTILE_CAPTIONS[name]][0][1]["key"]
        assert sorted(texts[key]) == ["synthetic"], name  # no web text to judge, the synthetic caption is
    for name in ("long", "control", "emoji", "right-to-left", "markup"):
        key = found[HOSTILE_CAPTIONS[name]][0][1]["key"]
        assert sorted(texts[key]) == ["synthetic", "web"], name
    report = (out / "report.html").read_text()
    assert "<script>alert('capfilt')" not in report and "<img src=x onerror" not in report  # shown escaped


def test_without_the_flag_loopback_urls_are_refused_before_any_request(faults, captioner_folder, filter_folder,
                                                                       tmp_path, one_torch_thread):
    url_list = tmp_path / "loopback.tsv"
    url_list.write_text("".join(f"{faults.url}/good/{i}.jpg\tpicture {i}\n" for i in range(3)))
    out = tmp_path / "out"
    code = cli.main([
        "bootstrap", "--data", str(url_list), "--out", str(out), "--captioner", str(captioner_folder),
        "--filter", str(filter_folder), "--processes", "1", "--threads", "2", "--timeout", str(TIMEOUT_S),
        "--torch-threads", "1", "--progress-interval", "60",
    ])
    assert code == 0
    failed = pq.read_table(out / "failed").to_pylist()
    assert len(failed) == 3 and faults.requests == []
    assert all(r["stage"] == "download" and "loopback" in r["error"] and r["url"].startswith(faults.url)
               for r in failed)
    assert "--allow-private-addresses" in failed[0]["error"]
