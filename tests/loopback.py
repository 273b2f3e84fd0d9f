"""An HTTP server on 127.0.0.1 in a thread, for tests that download: the only network the tests use."""

from __future__ import annotations

import http.server
import threading


class Handler(http.server.BaseHTTPRequestHandler):
    """A request handler that answers with ``answer`` and logs nothing."""

    def answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    """Handler threads never hold up shutdown; a client that resets or leaves is expected, not an error."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


class LoopbackHTTP:
    """``with LoopbackHTTP(Handler) as server:`` serves ``Handler`` at ``server.url`` (127.0.0.1, a free port)."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]):
        self.server = QuietServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def keep_proxies_away(monkeypatch) -> None:
    """A proxy configured in the environment must never see the tests' loopback requests."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
