"""s3:// stores against a real S3 endpoint on loopback (moto's server, tests/s3_fixtures.py):
push -> pull on another machine -> train, tampering refused, every failure one line."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from dvsprep.cli import main
from dvsprep.frames.pack import pack_store
from dvsprep.frames.remote import cache_entry
from previous_output import lay_previous, tree
from s3_fixtures import moto_server, s3  # noqa: F401 - fixtures
from store_fixtures import make_multishard_store

STORE = "frames_T64_number.zarr"


def _cli(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args])


def _one_error_line(r) -> str:
    assert r.exit_code == 1, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def _left_in(cache: Path) -> list[str]:
    stores = cache / "stores"
    return sorted(p.name for p in stores.iterdir() if not p.name.endswith(".lock")) if stores.exists() else []


@pytest.fixture()
def local(tmp_path):
    """(folder store, zip store, fingerprint) on the first 'machine'."""
    src = tmp_path / "machine1"
    src.mkdir()
    fp, _ = make_multishard_store(src / STORE)
    pack_store(src / STORE, src / f"{STORE}.zip")
    return src / STORE, src / f"{STORE}.zip", fp


def test_push_then_pull_and_read_on_another_machine(s3, local, tmp_path):
    folder, zipped, fp = local
    bucket, client = s3["bucket"], s3["client"]
    r = _cli("push", zipped, f"s3://{bucket}/lab/")
    assert r.exit_code == 0, r.output
    url = f"s3://{bucket}/lab/{STORE}.zip"
    assert r.output.splitlines()[0].startswith(f"pushed {zipped} -> {url}: 1 files, 0.3 MB in ")
    assert r.output.splitlines()[1:] == [f"  fingerprint {fp}", f"  share it as: {url}#fingerprint={fp}"]
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [f"lab/{STORE}.zip"]                                   # the upload's temporary is gone
    assert client.get_object(Bucket=bucket, Key=f"lab/{STORE}.zip")["Body"].read() == zipped.read_bytes()
    r = _cli("push", folder, f"s3://{bucket}/lab/{STORE}")
    assert r.exit_code == 0 and r.output.splitlines()[0].split(": ")[1].startswith("34 files"), r.output
    # machine 2: its own cache; verify, info and pull by URL
    cache2 = tmp_path / "machine2-cache"
    for u in (f"{url}#fingerprint={fp[:12]}", f"s3://{bucket}/lab/{STORE}"):
        r = _cli("verify", u, "--cache-dir", cache2)
        assert r.exit_code == 0 and f"intact: 33 files match, fingerprint {fp}" in r.output, r.output
    r = _cli("info", url, "--json", env={"DVSPREP_CACHE": str(cache2)})
    assert r.exit_code == 0 and json.loads(r.output)["fingerprint"] == fp
    r = _cli("pull", f"s3://{bucket}/lab/{STORE}#fingerprint={fp}", "-o", tmp_path / "pulled.zarr")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].startswith(f"pulled s3://{bucket}/lab/{STORE} -> {tmp_path / 'pulled.zarr'}: 34 files")
    assert sorted(p.relative_to(tmp_path / "pulled.zarr") for p in (tmp_path / "pulled.zarr").rglob("*")) == \
        sorted(p.relative_to(folder) for p in folder.rglob("*"))
    assert all(p.read_bytes() == (folder / p.relative_to(tmp_path / "pulled.zarr")).read_bytes()
               for p in (tmp_path / "pulled.zarr").rglob("*") if p.is_file())
    r = _cli("pull", url, "-o", tmp_path / "pulled.zarr.zip")
    assert r.exit_code == 0 and (tmp_path / "pulled.zarr.zip").read_bytes() == zipped.read_bytes()
    r = _cli("pull", url, "-o", tmp_path / "pulled.zarr.zip")   # the output protocol: no silent replace
    assert _one_error_line(r) == f"error: {tmp_path / 'pulled.zarr.zip'}: already exists (use --force to replace it)"


def test_train_from_an_s3_url(s3, tmp_path):
    """The issue's 'done when': a store pushed to S3 is trained from on another machine with one command."""
    from dvsg_train.cli import train_main
    from train_fixtures import make_learnable_store

    fp = make_learnable_store(tmp_path / "frames_T4_number.zarr", T=4, n_train=12, n_test=11)
    r = _cli("push", tmp_path / "frames_T4_number.zarr", f"s3://{s3['bucket']}/stores/frames_T4_number.zarr")
    assert r.exit_code == 0, r.output
    url = r.output.splitlines()[-1].removeprefix("  share it as: ")
    assert url == f"s3://{s3['bucket']}/stores/frames_T4_number.zarr#fingerprint={fp}"
    env = {"DVSPREP_CACHE": str(tmp_path / "node2")}
    tiny = ["-T", "4", "-b", "6", "--epochs", "1", "--channels", "4", "--device", "cpu", "-j", "0"]
    res = CliRunner(env=env).invoke(train_main, ["--data", url, "--out-dir", str(tmp_path / "runs"), "-q", *tiny])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "T4_b6_adam_lr0.001_c4"
    assert json.loads((run / "config.json").read_text())["data"] == url
    # the credentials are nowhere in what the run wrote
    for f in run.rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            assert s3["secret"].encode() not in blob and s3["key"].encode() not in blob, f


def test_an_object_changed_after_publishing_is_refused_before_use(s3, local, tmp_path):
    folder, zipped, fp = local
    bucket, client = s3["bucket"], s3["client"]
    url = f"s3://{bucket}/{STORE}.zip"
    assert _cli("push", zipped, url).exit_code == 0
    data = bytearray(zipped.read_bytes())
    data[1000] ^= 0x01                                       # one bit inside a member, after publishing
    client.put_object(Bucket=bucket, Key=f"{STORE}.zip", Body=bytes(data))
    r = _cli("verify", url, "--cache-dir", tmp_path / "c")
    assert r.exit_code == 1 and "1 file(s) differ from the store's manifest" in r.output + r.stderr
    assert _left_in(tmp_path / "c") == []
    other = tmp_path / "other"
    other.mkdir()
    fp2, _ = make_multishard_store(other / STORE, n_train=2, n_test=1)  # a whole other (intact) store
    pack_store(other / STORE, other / f"{STORE}.zip")
    client.put_object(Bucket=bucket, Key=f"{STORE}.zip", Body=(other / f"{STORE}.zip").read_bytes())
    r = _cli("info", f"{url}#fingerprint={fp}", env={"DVSPREP_CACHE": str(tmp_path / "d")})
    assert _one_error_line(r) == f"error: {url}#fingerprint={fp}: fingerprint {fp2[:16]}... differs from the expected {fp[:16]}..."


@pytest.mark.parametrize("case", ["wrong secret", "unknown key", "missing bucket", "missing key"])
def test_access_errors_are_one_line_and_leave_nothing(s3, local, tmp_path, monkeypatch, case):
    folder, zipped, fp = local
    assert _cli("push", zipped, f"s3://{s3['bucket']}/{STORE}.zip").exit_code == 0
    url = f"s3://{s3['bucket']}/{STORE}.zip"
    if case == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123")
    elif case == "unknown key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKEY000000000")
    elif case == "missing bucket":
        url = f"s3://no-such-bucket-{s3['bucket']}/{STORE}.zip"
    else:
        url = f"s3://{s3['bucket']}/absent/{STORE}.zip"
    want = {"missing bucket": "no such bucket", "missing key": "no such object"}.get(
        case, "access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    for cmd in (["verify", url, "--cache-dir", tmp_path / "c"], ["pull", url, "-o", tmp_path / "out.zip"]):
        line = _one_error_line(_cli(*cmd))
        assert line == f"error: {url}: {want}"
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in line
    assert _left_in(tmp_path / "c") == [] and not (tmp_path / "out.zip").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "machine1"]   # no pull temporary either
    # over a previous output that --force would replace: the same line, and it stays byte for byte
    before = lay_previous(tmp_path / "kept" / "out.zip")
    line = _one_error_line(_cli("pull", url, "-o", tmp_path / "kept" / "out.zip", "--force"))
    assert line == f"error: {url}: {want}"
    assert tree(tmp_path / "kept") == before


def test_without_the_client_an_s3_url_says_how_to_get_it(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "obstore", None)   # as if the s3 extra were not installed
    for cmd in (["verify", "s3://bucket/x.zarr.zip", "--cache-dir", tmp_path], ["push", tmp_path, "s3://b/x.zarr"]):
        r = _cli(*cmd)
        if cmd[0] == "push":  # push first checks the store it sends
            assert r.exit_code == 1
            continue
        assert _one_error_line(r) == "error: s3:// URLs need the s3 extra: pip install 'dvsgesture-kit[s3]'"


def test_an_interrupted_folder_push_is_never_taken_and_a_rerun_resumes(s3, local, tmp_path, monkeypatch):
    import obstore

    folder, zipped, fp = local
    bucket, client = s3["bucket"], s3["client"]
    url = f"s3://{bucket}/p/{STORE}"
    real_put, calls = obstore.put, []

    def dying_put(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 10:
            raise KeyboardInterrupt   # Ctrl-C after nine files
        return real_put(*args, **kwargs)

    monkeypatch.setattr(obstore, "put", dying_put)
    r = _cli("push", folder, url)
    assert r.exit_code == 1 and len(calls) == 10                  # click: "Aborted!"
    monkeypatch.setattr(obstore, "put", real_put)
    line = _one_error_line(_cli("verify", url, "--cache-dir", tmp_path / "c"))   # a reader takes nothing
    assert line == f"error: {url}/manifest.json: no such object"
    r = _cli("push", folder, url)
    assert r.exit_code == 0, r.output
    first_nine = sum((folder / k.removeprefix(f"p/{STORE}/")).stat().st_size for k in calls[:9])
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert f"{(total - first_nine) / 1e6:.1f} MB in" in r.output.splitlines()[0]      # the nine were skipped
    r = _cli("verify", url, "--cache-dir", tmp_path / "c")
    assert r.exit_code == 0 and fp in r.output


def test_an_interrupted_zip_push_leaves_no_object_and_a_rerun_restarts(s3, local, tmp_path, monkeypatch):
    import obstore

    folder, zipped, fp = local
    bucket, client = s3["bucket"], s3["client"]
    url = f"s3://{bucket}/{STORE}.zip"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt   # between the upload and the copy to its name

    real = obstore.copy, obstore.delete
    monkeypatch.setattr(obstore, "copy", killed)
    monkeypatch.setattr(obstore, "delete", lambda *a, **k: None)  # as if killed: the temporary stays
    assert _cli("push", zipped, url).exit_code == 1
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert len(keys) == 1 and keys[0].startswith(f"{STORE}.zip.dvsprep-upload-")
    assert _one_error_line(_cli("verify", url, "--cache-dir", tmp_path / "c")) == f"error: {url}: no such object"
    monkeypatch.setattr(obstore, "copy", real[0])
    monkeypatch.setattr(obstore, "delete", real[1])
    assert _cli("push", zipped, url).exit_code == 0
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == [f"{STORE}.zip"]
    line = _one_error_line(_cli("push", zipped, url))
    assert line == f"error: {url}: already exists (use --force to replace it)"
    assert _cli("push", zipped, url, "--force").exit_code == 0


def test_push_refusals(s3, local, tmp_path, monkeypatch):
    from dvsprep.frames import share

    folder, zipped, fp = local
    assert _one_error_line(_cli("push", zipped, f"s3://no-{s3['bucket']}/x/")) == \
        f"error: s3://no-{s3['bucket']}/x/{zipped.name}: no such bucket"
    monkeypatch.setattr(share, "MAX_COPY_BYTES", 1000)
    size = zipped.stat().st_size
    assert _one_error_line(_cli("push", zipped, f"s3://{s3['bucket']}/x/")) == \
        f"error: {zipped}: {size:,} bytes, more than one S3 copy takes (1,000); push the store folder instead " \
        f"(dvsprep unpack)"
    assert "Contents" not in s3["client"].list_objects_v2(Bucket=s3["bucket"])   # nothing sent
    assert _one_error_line(_cli("push", zipped, "https://host/x.zip")) == \
        "error: https://host/x.zip: dvsprep push writes to s3:// URLs (serve http(s) stores as static files)"
    assert _one_error_line(_cli("push", zipped, f"s3://{s3['bucket']}/x.zarr")) == \
        f"error: s3://{s3['bucket']}/x.zarr: {zipped} is a packed store; give a .zip name"
    assert _one_error_line(_cli("push", zipped, "s3://AKIA:secret@bucket/x.zip")) == \
        "error: s3://***@bucket/x.zip: credentials inside a URL are refused (set them in the environment, " \
        "e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"


# ----------------------------------------------------------- a flaky endpoint: loopback S3 that cuts and stalls

@pytest.fixture()
def flaky(local, tmp_path, monkeypatch):
    """(server, s3:// URL of the zip, zip bytes): a RangeFiles server as the S3 endpoint (path style)."""
    from http_fixtures import range_server

    pytest.importorskip("obstore", reason="the s3 extra (pip install 'dvsgesture-kit[s3]')")
    folder, zipped, fp = local
    root = tmp_path / "endpoint"
    (root / "bkt").mkdir(parents=True)
    (root / "bkt" / zipped.name).write_bytes(zipped.read_bytes())
    with range_server(root, monkeypatch) as httpd:
        for var, value in (("AWS_ENDPOINT_URL", httpd.url), ("AWS_ACCESS_KEY_ID", "k"),
                           ("AWS_SECRET_ACCESS_KEY", "secret-of-the-test"), ("AWS_REGION", "us-east-1")):
            monkeypatch.setenv(var, value)
        yield httpd, f"s3://bkt/{zipped.name}", zipped.read_bytes()


def test_an_s3_download_cut_short_resumes_with_a_range_request(flaky, tmp_path):
    from dvsprep.frames.remote import fetch_store

    httpd, url, data = flaky
    httpd.cut[f"/bkt/{STORE}.zip"] = 120_000
    local, _ = fetch_store(url, cache_dir=tmp_path / "c")
    assert local.read_bytes() == data
    # the retry asked for the rest only: every byte crossed the network once
    assert httpd.ranges == [(f"/bkt/{STORE}.zip", "bytes=120000-")] and httpd.sent[f"/bkt/{STORE}.zip"] == len(data)


def test_a_server_that_dies_mid_download_is_one_line(flaky, tmp_path, monkeypatch):
    httpd, url, data = flaky
    monkeypatch.setenv("DVSPREP_RETRY_DELAYS", "none")
    httpd.cut[f"/bkt/{STORE}.zip"] = 50_000
    line = _one_error_line(_cli("verify", url, "--cache-dir", tmp_path / "c"))
    assert re.fullmatch(rf"error: {url}: download failed after [0-9,]+ bytes \(connection cut short: .+\)", line), line
    assert "secret-of-the-test" not in line and _left_in(tmp_path / "c") == []
    assert [p.name for p in (tmp_path / "c" / "stores").iterdir() if p.name.startswith(".")] == []


def test_a_slow_server_is_bounded_by_the_timeout(flaky, tmp_path, monkeypatch):
    import dvsprep.frames.transport as transport

    httpd, url, data = flaky
    monkeypatch.setattr(transport, "TIMEOUT_S", 0.5)
    httpd.stall[f"/bkt/{STORE}.zip"] = 10_000        # 10 kB, then nothing until the test ends
    line = _one_error_line(_cli("verify", url, "--cache-dir", tmp_path / "c"))
    assert re.fullmatch(rf"error: {url}: download failed after [0-9,]+ bytes \(timed out: .+\) \(gave up after 2 tries\)",
                        line), line
    assert _left_in(tmp_path / "c") == []


# ----------------------------------------------------------- several machines: one download per node

def test_two_nodes_download_once_each_into_their_own_cache(flaky, tmp_path):
    """Two simulated nodes (two caches), two processes each, all started at once: each node's
    URL lock lets one process download while the other waits, then opens that copy (under
    torchrun, dvsg-train's local rank 0 fetches first: `distributed.local_main_first`)."""
    import subprocess
    import sys
    import threading

    httpd, url, data = flaky
    httpd.hold = threading.Event()        # no answer until the first GET of both nodes arrived
    code = ("import sys; from dvsprep.frames.store import open_frame_store; "
            "s = open_frame_store(sys.argv[1], verify=True); print(s.path, s.fingerprint)")
    procs = []
    for node in (0, 1):
        env = {**os.environ, "DVSPREP_CACHE": str(tmp_path / f"node{node}"),
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        procs += [subprocess.Popen([sys.executable, "-c", code, url], env=env, stdout=subprocess.PIPE, text=True)
                  for _ in range(2)]
    path = f"/bkt/{STORE}.zip"
    with httpd.arrived:
        assert httpd.arrived.wait_for(lambda: httpd.gets[path] >= 2, timeout=120)
    httpd.hold.set()
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    for i, (where, fp) in enumerate(outs):
        assert where == str(cache_entry(url, tmp_path / f"node{i // 2}") / f"{STORE}.zip")  # its node's copy
    assert len({fp for _, fp in outs}) == 1
    assert httpd.gets[path] == 2 and httpd.sent[path] == 2 * len(data)   # once per node, not per process


def test_an_s3_partial_of_an_object_that_changed_starts_over(flaky, tmp_path):
    """If-Match with the partial's ETag: the server refuses (412), the download starts from byte 0."""
    from dvsprep.frames.remote import fetch_store

    httpd, url, data = flaky
    entry = cache_entry(url, tmp_path / "c")
    part = entry.parent / f".{entry.name}.partial"
    part.mkdir(parents=True)
    (part / f"{STORE}.zip").write_bytes(b"x" * 5000)   # an older version's first bytes
    (part / "partial.json").write_text(json.dumps({"url": url, "validators": {f"{STORE}.zip": '"older"'}}))
    assert fetch_store(url, cache_dir=tmp_path / "c")[0].read_bytes() == data
    assert httpd.ranges == [] and httpd.gets[f"/bkt/{STORE}.zip"] == 2 and httpd.sent[f"/bkt/{STORE}.zip"] == len(data)
    assert not part.exists()
