"""Package faces whose names are imported on first use (PEP 562), for `dvsprep` and `dvsg_train`:
importing the package (which every submodule import and every command does) stays cheap."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


def lazy_face(package: str, public: Mapping[str, tuple[str, str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of `package`, whose public names map to
    (module, attribute); a name resolved once is stored in the package (later lookups skip it)."""

    def __getattr__(name: str) -> Any:
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = public[name]
        value = getattr(importlib.import_module(module), attr)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:  # what tab completion offers: the public face
        return sorted({*public, "__version__"})

    return __getattr__, __dir__
