"""A local file server for download tests (127.0.0.1 only) and a guard that refuses every other connection.

``FileServer(files)`` serves ``{"/name": Path}`` with ``Range: bytes=N-`` support (206), records every request
(``server.requests``: ``(path, range header or None)``), can cut a connection after N bytes for the next K
requests of a path (``server.cut(path, after=N, times=K)``) and answer 404 for paths it does not know.
"""

from __future__ import annotations

import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

__all__ = ["FileServer", "guard_network"]


class FileServer:
    def __init__(self, files: dict[str, Path]) -> None:
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.cuts: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                owner._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def cut(self, path: str, after: int, times: int = 1) -> None:
        """The next ``times`` responses for ``path`` stop (connection closed) after ``after`` body bytes."""
        self.cuts[path] = [after] * times

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        with self.lock:
            self.requests.append((h.path, rng))
            cut = self.cuts[h.path].pop(0) if self.cuts.get(h.path) else None
        if h.path not in self.files:
            h.send_error(404)
            return
        data = self.files[h.path].read_bytes()
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m:
            start = int(m.group(1))
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        body = data[start:]
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if cut is not None:
            h.wfile.write(body[:cut])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(body)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def guard_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every connection to anything but 127.0.0.1 fail (and drop proxy settings that would reroute)."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost"):
            raise OSError(f"test guard: connection to {address!r} refused (tests stay offline)")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
