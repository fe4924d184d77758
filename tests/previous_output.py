"""A previous output laid where a command that fails will write, and the check that it is still
there byte for byte afterwards with nothing beside it (issue #20: a test that only looks for an
empty folder after a failure is passed by a command that deleted its target too)."""
from __future__ import annotations

from pathlib import Path

PREVIOUS = b"the previous output\n"


def tree(root: Path) -> dict[str, bytes | None]:
    """Everything in a folder: relative name -> bytes (None for a folder), hidden files too (a
    leftover .tmp-, .lock or .old- shows up as an entry)."""
    return {p.relative_to(root).as_posix(): (None if p.is_dir() and not p.is_symlink() else p.read_bytes())
            for p in sorted(Path(root).rglob("*"))}


def lay_previous(out: Path, kind: str = "file") -> dict[str, bytes | None]:
    """Put a distinctive previous output at `out` (a file of PREVIOUS, or for kind "dir" a folder
    holding one) and return `tree` of its folder, to compare with after the failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "dir":
        out.mkdir()
        (out / "previous").write_bytes(PREVIOUS)
    else:
        out.write_bytes(PREVIOUS)
    return tree(out.parent)
