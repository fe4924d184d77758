"""Property tests: one flipped byte anywhere in a small frame store (directory or zip) or
events.h5. `verify` never raises; what it calls intact the readers read in full, and what it
lists as a problem every reader refuses with a dvsprep error (one line at the CLI). Re-signed
stores (only the content checks can tell) run in every form, over http too (store_forms.py)."""
from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

from dvsprep.errors import DvsprepError  # noqa: E402
from dvsprep.events.store import EventsFile  # noqa: E402
from dvsprep.frames.store import open_frame_store  # noqa: E402
from dvsprep.verify import verify_path  # noqa: E402
from hostile_fixtures import tiny_events, tiny_store  # noqa: E402
from store_forms import FORMS  # noqa: E402
from fuzz_settings import fuzz  # noqa: E402

FUZZ = fuzz(40)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    tiny_store(root / "s.zarr", n_train=4, n_test=2)
    with zipfile.ZipFile(root / "s.zip", "w", zipfile.ZIP_STORED) as zf:
        for p in sorted((root / "s.zarr").rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(root / "s.zarr").as_posix())
    tiny_events(root / "events.h5", sizes=(4, 2))
    files = sorted(p.relative_to(root / "s.zarr").as_posix() for p in (root / "s.zarr").rglob("*") if p.is_file())
    return root, files


def _flip(path: Path, fraction: float, xor: int) -> None:
    data = bytearray(path.read_bytes())
    data[min(len(data) - 1, int(fraction * len(data)))] ^= xor
    path.write_bytes(bytes(data))


def _read_all_frames(path: Path | str) -> None:
    store = open_frame_store(path)
    for name in store.splits:
        sp = store.split(name)
        sp.load_all()


def _read_all_events(path: Path) -> None:
    with EventsFile(path) as ef:
        for s in ("train", "test"):
            sp = ef.split(s)
            for i in range(len(sp)):
                sp.sample(i)


def _consistent(path: Path | str, read) -> None:
    report = verify_path(path)              # must not raise
    if report.ok:
        read(path)                           # intact: readable in full
    else:
        assert report.problems and all(p.line() for p in report.problems)
        with pytest.raises(DvsprepError):
            read(path)


fraction = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
xor = st.integers(min_value=1, max_value=255)


@FUZZ
@given(data=st.data(), at=fraction, x=xor)
def test_flipped_byte_in_a_store_directory(originals, data, at, x):
    root, files = originals
    name = data.draw(st.sampled_from(files))
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "s.zarr"
        shutil.copytree(root / "s.zarr", store)
        _flip(store / name, at, x)
        report = verify_path(store)
        assert not report.ok                 # every byte of a store directory is covered by a hash
        with pytest.raises(DvsprepError):
            _read_all_frames(store)


@FUZZ
@given(at=fraction, x=xor)
def test_flipped_byte_in_a_store_zip(originals, at, x):
    root, _ = originals
    with tempfile.TemporaryDirectory() as tmp:
        z = Path(tmp) / "s.zip"
        shutil.copy(root / "s.zip", z)
        _flip(z, at, x)                      # zip headers hold bytes no hash covers (times, comments)
        _consistent(z, _read_all_frames)


@FUZZ
@given(at=fraction, x=xor)
def test_flipped_byte_in_events(originals, at, x):
    root, _ = originals
    with tempfile.TemporaryDirectory() as tmp:
        ev = Path(tmp) / "events.h5"
        shutil.copy(root / "events.h5", ev)
        _flip(ev, at, x)                     # HDF5 files hold unused and free space no hash covers
        _consistent(ev, _read_all_events)


@pytest.mark.parametrize("form", FORMS)
@FUZZ
@given(data=st.data(), at=fraction, x=xor)
def test_resigned_store_verify_and_readers_agree(originals, store_forms, form, data, at, x):
    """A changed file with the manifest made to match again: only content checks can tell.
    Whatever verify decides, the readers decide the same (and nothing raises but dvsprep errors),
    in every form: the http forms' downloads match the manifest, so they too meet only the
    content checks."""
    from hostile_fixtures import resign

    root, files = originals
    name = data.draw(st.sampled_from([f for f in files if f != "manifest.json"]))
    store = store_forms.place(form)
    shutil.copytree(root / "s.zarr", store)
    _flip(store / name, at, x)
    resign(store)
    _consistent(store_forms.target(form, store), _read_all_frames)
