"""A local HTTP server on 127.0.0.1 for the download tests (never another address)."""
from __future__ import annotations

import contextlib
import http.server
import threading
from typing import Callable, Iterator

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@contextlib.contextmanager
def serving(handler: Callable[..., http.server.BaseHTTPRequestHandler],
            monkeypatch) -> Iterator[http.server.ThreadingHTTPServer]:
    """Serve `handler` on a free loopback port while the body runs (no proxy in between);
    the server's ``url`` attribute is its base URL."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    # a 10 ms poll: shutdown() waits for the loop's next poll, 0.5 s by default, at every test's end
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


class RangeFiles(http.server.BaseHTTPRequestHandler):
    """Static files of ``server.root`` with what real object servers do and SimpleHTTPRequestHandler
    does not: ``Range: bytes=N-`` (206), ETag with If-Range / If-Match, Last-Modified; path-style
    ``/<bucket>/<key>`` works as an S3 endpoint for GET and HEAD. For the tests it counts and
    breaks: ``server.sent`` (Counter: body bytes sent per path), ``server.ranges`` (list of
    (path, Range header)), ``server.cut`` ({path: n}: the next response to that path stops after
    n body bytes and closes), ``server.stall`` ({path: n}: every response to that path sends n
    bytes, sets ``server.stalled``, waits for ``server.release`` and closes), ``server.gets``
    (Counter of GETs as they arrive; ``server.arrived`` is notified) and ``server.hold`` (an Event:
    when set to one, every GET waits for it before it is answered), ``server.fail`` ({path: [status, ...]}: answer these first)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _file(self):
        import urllib.parse

        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        f = self.server.root.joinpath(*[p for p in path.split("/") if p])
        return path, f

    def do_HEAD(self):  # noqa: N802
        self._answer(head=True)

    def do_GET(self):  # noqa: N802
        path, _ = self._file()
        with self.server.lock:
            self.server.gets[path] += 1
            self.server.arrived.notify_all()
        if self.server.hold is not None:
            self.server.hold.wait()
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        import email.utils
        import hashlib

        path, f = self._file()
        fails = self.server.fail.get(path)
        if fails:
            status = fails.pop(0)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not f.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = f.read_bytes()
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        start = 0
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if_match = self.headers.get("If-Match")
        if if_match and if_match != etag:
            self.send_response(412)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if rng and (not if_range or if_range == etag):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.server.ranges.append((path, rng))
        if start >= len(data) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", email.utils.formatdate(f.stat().st_mtime, usegmt=True))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if head:
            return
        body = data[start:]
        cut = self.server.cut.pop(path, None)
        stall = self.server.stall.get(path)
        if stall is not None:
            self._send(path, body[:stall])
            self.server.stalled.set()
            self.server.release.wait()
            self.close_connection = True
            return
        if cut is not None:
            self._send(path, body[:cut])
            self.close_connection = True
            return
        self._send(path, body)

    def _send(self, path: str, body: bytes) -> None:
        self.server.sent[path] += len(body)  # counted first: the client may be done before write() returns
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            pass


@contextlib.contextmanager
def range_server(root, monkeypatch) -> Iterator[http.server.ThreadingHTTPServer]:
    """`serving` a RangeFiles server of the folder `root`."""
    import collections
    from pathlib import Path

    with serving(RangeFiles, monkeypatch) as httpd:
        httpd.root = Path(root)
        httpd.sent = collections.Counter()
        httpd.ranges = []
        httpd.cut, httpd.stall, httpd.fail = {}, {}, {}
        httpd.stalled, httpd.release = threading.Event(), threading.Event()
        httpd.gets, httpd.lock, httpd.hold = collections.Counter(), threading.Lock(), None
        httpd.arrived = threading.Condition(httpd.lock)
        try:
            yield httpd
        finally:
            httpd.release.set()
            if httpd.hold is not None:
                httpd.hold.set()
