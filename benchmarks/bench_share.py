"""Transfer rates of the store-sharing paths on loopback, and the two S3 clients compared.

    python benchmarks/bench_share.py [--mb 128]

Starts moto's S3 server and a range-capable http server (tests/http_fixtures.py) on 127.0.0.1,
puts one random object of --mb MB on each, then times (best of 2):
  http download   dvsprep.frames.remote.download_file (urllib, sha256, written to disk)
  s3 download     the same through obstore (the s3 extra)
  s3fs download   fsspec/s3fs reading the same object (the alternative client), if installed
  s3 4 parts      four range requests in threads into one file (parallel part downloads)
  s3 upload       obstore.put of the file (what dvsprep push does for a zip)
Loopback measures the client and the server, not a network: moto (Python) is the bottleneck
for S3, so the numbers compare clients and paths, not links.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _best(fn, n: int = 2) -> float:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=128)
    args = ap.parse_args()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(var, None)
    import boto3
    import obstore

    from dvsprep.frames import transport
    from dvsprep.frames.remote import download_file
    from http_fixtures import range_server

    n = args.mb << 20
    rates = {}
    with tempfile.TemporaryDirectory() as tmp, pytest_monkeypatch() as mp:
        tmp = Path(tmp)
        (tmp / "www" / "bkt").mkdir(parents=True)
        src = tmp / "www" / "bkt" / "obj.zip"
        src.write_bytes(os.urandom(n))
        boto3.client("s3").create_bucket(Bucket="bkt")
        store = transport.s3_store("bkt")
        rates["s3 upload (obstore.put)"] = n / _best(lambda: obstore.put(store, "obj.zip", src))
        out = tmp / "out"

        def fetch(url):
            out.unlink(missing_ok=True)
            download_file(url, out, n + 1, limit_name="x")

        with range_server(tmp / "www", mp) as httpd:
            rates["http download (urllib)"] = n / _best(lambda: fetch(f"{httpd.url}/bkt/obj.zip"))
        rates["s3 download (obstore)"] = n / _best(lambda: fetch("s3://bkt/obj.zip"))

        def parts(k: int = 4):
            step = -(-n // k)
            with open(out, "wb") as f:
                f.truncate(n)

            def one(i):
                data = obstore.get_range(store, "obj.zip", start=i * step, end=min(n, (i + 1) * step))
                with open(out, "r+b") as f:
                    f.seek(i * step)
                    f.write(memoryview(data))
            with concurrent.futures.ThreadPoolExecutor(k) as ex:
                list(ex.map(one, range(k)))
        rates["s3 4 parts in parallel (obstore)"] = n / _best(parts)
        try:
            import s3fs
        except ImportError:
            s3fs = None
        if s3fs is not None:
            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})

            def fs_read():
                with fs.open("bkt/obj.zip", "rb", block_size=8 << 20) as f, open(out, "wb") as o:
                    while chunk := f.read(1 << 20):
                        o.write(chunk)
            rates["s3 download (s3fs)"] = n / _best(fs_read)
    server.stop()
    print(f"{args.mb} MB object, loopback, best of 2:")
    for k, v in rates.items():
        print(f"  {k:34s} {v / 1e6:7.0f} MB/s")


@contextlib.contextmanager
def pytest_monkeypatch():
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        yield mp


if __name__ == "__main__":
    main()
