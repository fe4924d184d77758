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
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
