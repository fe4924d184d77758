"""Shared test configuration: the `cuda` marker skips without a CUDA device, caches stay in the
test session, and `store_forms` serves a test's stores over loopback HTTP (see store_forms.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

try:
    from hypothesis import settings as _hyp_settings
except ImportError:  # the property tests skip themselves without hypothesis
    _hyp_settings = None

if _hyp_settings is not None:
    import os as _os

    # "ci" (the default, what `make test` runs): the same examples every run, nothing replayed
    # from a local example database, so a failure reproduces on any machine. "random": random
    # examples, many more (see tests/fuzz_settings.py; pick it with DVSPREP_HYPOTHESIS=random
    # or --hypothesis-profile random).
    _hyp_settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
    _hyp_settings.register_profile("random", derandomize=False, deadline=None, print_blob=True,
                                   max_examples=int(_os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "1000")))
    _hyp_settings.load_profile(_os.environ.get("DVSPREP_HYPOTHESIS", "ci"))


# The tests of Ctrl-C expect a terminal's SIGINT: a suite started in the background of a
# non-interactive shell (`make test &`, nohup) inherits SIGINT ignored, which every command it
# runs would inherit too. Tests of "ignored at start" set it themselves.
import signal as _signal

if _signal.getsignal(_signal.SIGINT) is _signal.SIG_IGN:
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verified-markers and downloads go to a cache of the test session, never ~/.cache."""
    import os

    if "DVSPREP_CACHE" not in os.environ or not os.environ["DVSPREP_CACHE"].startswith(str(tmp_path_factory.getbasetemp())):
        monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path_factory.getbasetemp() / "dvsprep-cache"))
    # Downloads retry once, at once: the retry path runs everywhere and no test ever sleeps.
    monkeypatch.setenv("DVSPREP_RETRY_DELAYS", "0")


@pytest.fixture(scope="module")
def store_server(tmp_path_factory: pytest.TempPathFactory):
    """(base URL, served folder): a loopback HTTP server of static files, one per test module."""
    import functools

    from http_fixtures import serving
    from store_forms import QuietHandler

    served = tmp_path_factory.mktemp("served")
    handler = functools.partial(QuietHandler, directory=str(served))
    with pytest.MonkeyPatch.context() as mp, serving(handler, mp) as httpd:
        yield httpd.url, served


@pytest.fixture()
def store_forms(store_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`store_forms.StoreForms` for this test: its stores, served or local, and its own download cache."""
    from store_forms import StoreForms

    forms = StoreForms(store_server[0], store_server[1], tmp_path)
    monkeypatch.setenv("DVSPREP_CACHE", str(forms.cache))
    return forms
