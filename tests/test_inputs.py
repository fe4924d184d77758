"""dvsprep.inputs.kind_of: the one answer to "what is this PATH?" for every command and dvsg_train."""
from __future__ import annotations

import os
import shutil
import tarfile

import pytest

from aedat_fixtures import small_release
from dvsprep.errors import MissingFileError, ReleaseError, StoreError
from dvsprep.inputs import (
    FRAME_STORE,
    HDF5_SIGNATURE,
    RAW_RELEASE,
    STORE_OR_DATA_ROOT,
    InputKind,
    check_url,
    is_tar_path,
    is_url,
    is_zip_path,
    kind_of,
    url_scheme,
)

K = InputKind
FRAMES_WORDS = "a frame store (.zarr folder, .zip or http(s)/s3:// URL)"
EVENTS_WORDS = "an events.h5 file"
ROOT_WORDS = "a DATA_ROOT (a folder holding events.h5 or frames_T<T>_<split_by>.zarr)"
RAW_WORDS = "a DvsGesture release (trials_to_train.txt here or in DvsGesture/, or a .tar.gz)"
ALL_WORDS = f"not {EVENTS_WORDS}, {FRAMES_WORDS}, {ROOT_WORDS} or {RAW_WORDS}"


def _file(path, data=b"not anything"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name, kind", [
    ("s.zip", K.STORE_ZIP), ("s.ZIP", K.STORE_ZIP), ("frames_T16_number.zarr.Zip", K.STORE_ZIP),
    ("DvsGesture.tar.gz", K.RAW_TAR), ("DvsGesture.TAR.GZ", K.RAW_TAR), ("r.Tar.Gz", K.RAW_TAR),
    ("r.tgz", K.RAW_TAR), ("r.TGZ", K.RAW_TAR), ("r.tar", K.RAW_TAR), ("r.TAR", K.RAW_TAR),
    ("events.h5", K.EVENTS), ("events.H5", K.EVENTS), ("e.hdf5", K.EVENTS), ("e.HDF5", K.EVENTS),
])
def test_files_by_suffix_in_any_case(tmp_path, name, kind):
    # the content is not looked at when the suffix says what it is (a bad one fails later, naming it)
    assert kind_of(_file(tmp_path / name)) is kind
    assert kind_of(str(tmp_path / name)) is kind


def test_hdf5_by_signature_whatever_the_name(tmp_path):
    assert kind_of(_file(tmp_path / "events.data", HDF5_SIGNATURE + b"rest")) is K.EVENTS
    assert kind_of(_file(tmp_path / "noext", HDF5_SIGNATURE)) is K.EVENTS
    # the signature must be whole and at the start
    with pytest.raises(StoreError) as e:
        kind_of(_file(tmp_path / "short.bin", HDF5_SIGNATURE[:7]))
    assert str(e.value) == f"{tmp_path / 'short.bin'}: {ALL_WORDS}"
    with pytest.raises(StoreError):
        kind_of(_file(tmp_path / "late.bin", b"x" + HDF5_SIGNATURE))
    # suffixes are checked first: an HDF5 file named .zip is a (broken) packed store
    assert kind_of(_file(tmp_path / "odd.zip", HDF5_SIGNATURE)) is K.STORE_ZIP


def test_folders(tmp_path):
    store = tmp_path / "frames_T4_number.zarr"
    _file(store / "zarr.json", b"{}")
    assert kind_of(store) is K.STORE_DIR
    half = tmp_path / "half.zarr"  # a store that lost its zarr.json is still a (broken) store
    _file(half / "manifest.json", b"{}")
    assert kind_of(half) is K.STORE_DIR
    # a folder named like a zip is a folder
    dir_zip = tmp_path / "packed.zip"
    _file(dir_zip / "zarr.json", b"{}")
    assert kind_of(dir_zip) is K.STORE_DIR
    (tmp_path / "empty.zip").mkdir()
    with pytest.raises(StoreError) as e:
        kind_of(tmp_path / "empty.zip")
    assert str(e.value) == f"{tmp_path / 'empty.zip'}: {ALL_WORDS}"
    # a folder named like events.h5 is a folder
    (tmp_path / "x.h5").mkdir()
    _file(tmp_path / "x.h5" / "events.h5")
    assert kind_of(tmp_path / "x.h5") is K.DATA_ROOT


def test_data_roots(tmp_path):
    with_events = tmp_path / "a"
    _file(with_events / "events.h5")
    assert kind_of(with_events) is K.DATA_ROOT
    with_store = tmp_path / "b"
    (with_store / "frames_T16_time.zarr").mkdir(parents=True)
    assert kind_of(with_store) is K.DATA_ROOT
    # a file named like a store does not make a DATA_ROOT
    not_root = tmp_path / "c"
    _file(not_root / "frames_T16_number.zarr")
    with pytest.raises(StoreError):
        kind_of(not_root)


def test_raw_releases(tmp_path):
    rel = small_release(tmp_path / "raw")
    assert kind_of(tmp_path / "raw") is K.RAW_DIR     # the folder holding DvsGesture/
    assert kind_of(rel) is K.RAW_DIR                  # DvsGesture/ itself
    holder = tmp_path / "holder"
    holder.mkdir()
    with tarfile.open(holder / "DvsGesture.tar.gz", "w:gz") as tf:
        tf.add(rel, arcname="DvsGesture")
    assert kind_of(holder) is K.RAW_DIR               # a folder holding DvsGesture.tar.gz
    assert kind_of(holder / "DvsGesture.tar.gz") is K.RAW_TAR


def test_a_folder_that_is_a_release_and_a_data_root_is_what_the_caller_takes(tmp_path):
    small_release(tmp_path / "raw")
    _file(tmp_path / "raw" / "events.h5")      # dvsprep convert raw -o raw
    assert kind_of(tmp_path / "raw") is K.RAW_DIR
    assert kind_of(tmp_path / "raw", RAW_RELEASE) is K.RAW_DIR
    assert kind_of(tmp_path / "raw", STORE_OR_DATA_ROOT) is K.DATA_ROOT


@pytest.mark.parametrize("url", [
    "http://host/frames_T16_number.zarr.zip", "https://host/s/frames_T16_number.zarr/",
    "HTTPS://HOST/S.ZIP", "Http://127.0.0.1:8000/x.zip",
    "https://host/x.zip#fingerprint=" + "ab" * 32, "http://[::1]:8080/x.zip",
])
def test_urls(url):
    assert url_scheme(url) in ("http", "https") and is_url(url)
    assert kind_of(url) is K.URL
    assert kind_of(url, FRAME_STORE) is K.URL


@pytest.mark.parametrize("url, scheme", [
    ("gs://bucket/x.zip", "gs"), ("ftp://host/x.zip", "ftp"), ("file:///tmp/x.zip", "file"),
])
def test_other_schemes_are_one_clear_line(url, scheme):
    assert url_scheme(url) == scheme and not is_url(url)
    for accept in (None, FRAME_STORE, RAW_RELEASE):
        with pytest.raises(StoreError) as e:
            kind_of(url, accept)
        assert str(e.value) == f"{url}: {scheme}:// URLs are not supported (use an http://, https:// or s3:// URL)"


@pytest.mark.parametrize("url", ["s3://bucket/frames_T16_number.zarr.zip", "S3://bucket/p/x.zarr/",
                                 "s3://bucket/x.zip#fingerprint=" + "ab" * 6])
def test_s3_urls(url):
    assert url_scheme(url) == "s3" and is_url(url) and kind_of(url, FRAME_STORE) is K.URL


@pytest.mark.parametrize("url, shown", [
    ("https://alice:hunter22@host/x.zip", "https://***@host/x.zip"),
    ("s3://AKIAXX:secretkey@bucket/x.zip#fingerprint=" + "ab" * 6, "s3://***@bucket/x.zip"),
    ("ftp://bob:pw@host/x.zip", "ftp://***@host/x.zip"),
    ("http://token@host:8080/s.zarr/", "http://***@host:8080/s.zarr/"),
])
def test_credentials_inside_a_url_are_refused_without_repeating_them(url, shown):
    for check in (kind_of, check_url):
        with pytest.raises(StoreError) as e:
            check(url)
        assert str(e.value) == (f"{shown}: credentials inside a URL are refused (set them in the environment, "
                                f"e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")


def test_s3_urls_need_a_bucket_and_a_key():
    with pytest.raises(StoreError) as e:
        kind_of("s3:///x.zip")
    assert str(e.value) == "s3:///x.zip: not a valid URL (no bucket)"
    with pytest.raises(StoreError) as e:
        kind_of("s3://bucket/")
    assert str(e.value) == "s3://bucket/: not a valid URL (no key after the bucket)"


def test_malformed_urls_and_url_lookalikes(tmp_path):
    with pytest.raises(StoreError) as e:
        kind_of("http://[::1/x.zip")
    assert str(e.value) == "http://[::1/x.zip: not a valid URL (Invalid IPv6 URL)"
    with pytest.raises(StoreError) as e:
        kind_of("https:///x.zip")
    assert str(e.value) == "https:///x.zip: not a valid URL (no host)"
    with pytest.raises(StoreError, match="not a valid URL"):
        check_url("http://host:port/x.zip")
    # one slash, or no scheme: a local path
    for text in ("http:/host/x.zip", "host/http://x", "://x"):
        assert url_scheme(text) is None and not is_url(text)
    assert not is_url(tmp_path) and url_scheme(tmp_path) is None
    with pytest.raises(MissingFileError):
        kind_of("http:/host/x.zip")


def test_missing_and_unusable_paths(tmp_path):
    with pytest.raises(MissingFileError) as e:
        kind_of(tmp_path / "absent")
    assert str(e.value) == f"{tmp_path / 'absent'}: no such file or directory"
    with pytest.raises(MissingFileError) as e:
        kind_of(tmp_path / "absent.zarr", FRAME_STORE, noun="frame store")
    assert str(e.value) == f"{tmp_path / 'absent.zarr'}: no such frame store"
    _file(tmp_path / "f")
    with pytest.raises(MissingFileError):           # ENOTDIR: a path through a file
        kind_of(tmp_path / "f" / "x")
    with pytest.raises(StoreError) as e:
        kind_of("a\x00b.zip")
    assert str(e.value) == "'a\\x00b.zip': not a usable path (it holds a NUL byte)"
    long = "x" * 5000
    with pytest.raises(StoreError) as e:
        kind_of(long)
    assert str(e.value) == f"{'x' * 120!r}... (5000 characters): not a usable path (File name too long)"
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(StoreError) as e:
        kind_of(tmp_path / "loop")
    assert str(e.value) == f"{str(tmp_path / 'loop')!r}: not a usable path (Too many levels of symbolic links)"


def test_a_fifo_is_refused_without_reading_it(tmp_path):
    os.mkfifo(tmp_path / "pipe")  # opening it to read a signature would block forever
    with pytest.raises(StoreError) as e:
        kind_of(tmp_path / "pipe")
    assert str(e.value) == f"{tmp_path / 'pipe'}: {ALL_WORDS}"


def test_refusals_say_what_was_expected_and_what_the_path_is(tmp_path):
    events = _file(tmp_path / "events.h5")
    with pytest.raises(ReleaseError) as e:
        kind_of(events, RAW_RELEASE, error=ReleaseError)
    assert str(e.value) == f"{events}: not {RAW_WORDS}; it is an events.h5 file"
    with pytest.raises(StoreError) as e:
        kind_of(events, STORE_OR_DATA_ROOT)
    assert str(e.value) == f"{events}: neither {FRAMES_WORDS} nor {ROOT_WORDS}; it is an events.h5 file"
    with pytest.raises(StoreError) as e:
        kind_of(tmp_path, FRAME_STORE | {K.EVENTS})
    assert str(e.value) == f"{tmp_path}: neither {EVENTS_WORDS} nor {FRAMES_WORDS}; it is a DATA_ROOT"
    with pytest.raises(StoreError) as e:
        kind_of("https://host/x.zip", RAW_RELEASE)
    assert str(e.value) == f"https://host/x.zip: not {RAW_WORDS}; it is a URL"


def test_name_rules():
    assert is_zip_path("a/b.ZIP") and is_zip_path("b.zip") and not is_zip_path("b.zip.part")
    assert is_tar_path("DvsGesture.TAR.GZ") and is_tar_path("r.Tgz") and not is_tar_path("r.gz")
    # the frames wing and the commands use these very functions: one rule
    from dvsprep import frames
    from dvsprep.frames import files, remote

    assert files.is_zip_path is is_zip_path and frames.is_zip_path is is_zip_path
    assert remote.is_url is is_url and remote.check_url is check_url and frames.is_url is is_url


def test_every_command_takes_upper_case_suffixes(tmp_path):
    """The six places that decided the kind themselves disagreed (convert refused DvsGesture.TGZ,
    verify took it); now they all ask kind_of."""
    from dvsprep.info import describe
    from dvsprep.raw import open_release
    from dvsprep.verify import verify_path
    from train_fixtures import make_learnable_store

    rel = small_release(tmp_path / "raw")
    tgz = tmp_path / "DVSGESTURE.TGZ"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(rel, arcname="DvsGesture")
    with open_release(tgz, scratch=tmp_path) as r:
        assert sorted(p.name for p in r.glob("*.aedat")) == ["user01_lab.aedat", "user02_led.aedat",
                                                             "user03_natural.aedat"]
    assert verify_path(tgz).kind == "raw"
    store = tmp_path / "frames_T4_number.zarr"
    make_learnable_store(store, n_train=2, n_test=1)
    from dvsprep.frames import pack_store

    pack_store(store, tmp_path / "S.ZIP")
    assert describe(tmp_path / "S.ZIP")["kind"] == "frames"
    assert verify_path(tmp_path / "S.ZIP").ok
    shutil.copytree(store, tmp_path / "copy.Zip")   # a store folder named like a zip
    assert verify_path(tmp_path / "copy.Zip").ok


def test_the_trainer_asks_the_same_resolver(tmp_path):
    from dvsg_train.data import resolve_store_path
    from dvsg_train.distributed import DistEnv
    from dvsg_train.engine import resolve_run
    from dvsg_train.config import TrainConfig
    import torch

    with pytest.raises(StoreError, match=r"^gs://b/x\.zip: gs:// URLs are not supported"):
        resolve_store_path("gs://b/x.zip", 4)
    assert resolve_store_path("s3://b/x.zip", 4) == "s3://b/x.zip"
    with pytest.raises(MissingFileError) as e:
        resolve_store_path(tmp_path / "nope", 4)
    assert str(e.value) == f"{tmp_path / 'nope'}: no such frame store"
    assert resolve_store_path("HTTPS://host/x.zip", 4) == "HTTPS://host/x.zip"
    # a URL (any scheme) is saved as typed; a local path absolute
    for data in ("HTTPS://host/x.zip", "s3://b/x.zip"):
        assert resolve_run(TrainConfig(data=data), DistEnv(device=torch.device("cpu"))).config.data == data
    local = resolve_run(TrainConfig(data="rel/store.zarr"), DistEnv(device=torch.device("cpu")))
    assert local.config.data == os.path.abspath("rel/store.zarr")
