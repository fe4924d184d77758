"""Shared test configuration: the `cuda` marker skips without a CUDA device."""
from __future__ import annotations

import importlib.util

import pytest


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
