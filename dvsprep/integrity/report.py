"""What `dvsprep verify` reports: a `VerifyReport` per store, events file or raw release, listing
every `Problem` found (corrupt, missing, extra, mismatch, invalid)."""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_LISTED = 8     # problems shown per kind unless verbose
KINDS = ("corrupt", "missing", "extra", "mismatch", "invalid")


@dataclass
class Problem:
    kind: str        # corrupt | missing | extra | mismatch | invalid
    name: str        # file, dataset or recording
    detail: str
    holds: str = ""  # what a frame-store file holds (split and samples)

    def line(self) -> str:
        return f"  {self.kind:<8} {self.name}: {self.detail}" + (f"; holds {self.holds}" if self.holds else "")


@dataclass
class VerifyReport:
    """Outcome of a verification: `ok` when nothing differs."""

    path: str
    kind: str                          # frames | events | raw
    checked: int                       # files, datasets or recordings compared
    problems: list[Problem] = field(default_factory=list)
    fingerprint: str = ""
    notes: list[str] = field(default_factory=list)
    title: str = ""                    # what was checked, in place of the kind's name

    @property
    def ok(self) -> bool:
        return not self.problems

    def headline(self) -> str:
        what = self.title or {"frames": "frame store", "events": "events file", "raw": "raw release"}[self.kind]
        sep = ":" if self.title else ""
        unit = {"frames": "files", "events": "datasets", "raw": "files"}[self.kind]
        if self.ok:
            fp = f", fingerprint {self.fingerprint}" if self.fingerprint else ""
            return f"{what}{sep} intact: {self.checked} {unit} match{fp}"
        counts = {k: n for k in KINDS if (n := sum(p.kind == k for p in self.problems))}
        return f"{what}{sep} NOT intact: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + \
            f" (of {self.checked} {unit})"

    def lines(self, verbose: bool = False) -> list[str]:
        """Human-readable report; without `verbose`, at most MAX_LISTED problems per kind."""
        out = [f"{self.path}: {self.headline()}"]
        for kind in KINDS:
            items = [p for p in self.problems if p.kind == kind]
            shown = items if verbose else items[:MAX_LISTED]
            out.extend(p.line() for p in shown)
            if len(items) > len(shown):
                out.append(f"  ... and {len(items) - len(shown)} more {kind} (-v lists all)")
        out.extend(f"  {n}" for n in self.notes)
        return out
