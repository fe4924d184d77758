"""The README documents every console command and every option.

How the README documents a command: one row of the table under "## Commands" (its synopsis:
`dvsprep frames -T 16 [--split-by ...] ...`), and its section (or sections) further down, where
the options the synopsis leaves out are explained (`dvsg-train ... --preset ...`, then "Training"
with its subsections). Options shared by every command (`--debug`, `-j`, `--force`) are explained
once, in the prose above the table. So a command's options fall into the groups the README uses:

* the `dvsprep` group's own options (`dvsprep --debug`, `-v`, `--version`): the prose above the table;
* each command's options: its table row, its section(s) in `SECTIONS`, or the prose above the table.

An option counts as documented when one of its flags appears there as a whole word (`--amp`,
and for an on/off pair also its off flag: `--no-amp`). A new command needs a table row and an
entry in `SECTIONS`; a new option needs a word in one of those places.
"""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# Where each command's options are explained besides its table row (README headings; a section
# runs to the next heading of its level or above, so it includes its subsections).
SECTIONS: dict[str, tuple[str, ...]] = {
    "dvsprep synth": ("The synthetic release",),
    "dvsprep convert": ("convert",),
    "dvsprep frames": ("frames",),
    "dvsprep info": (),
    "dvsprep verify": ("Sharing a store",),
    "dvsprep pack": ("Sharing a store",),
    "dvsprep unpack": ("Sharing a store",),
    "dvsprep push": ("Sharing a store",),
    "dvsprep pull": ("Sharing a store",),
    "dvsprep show": ("Looking at the data",),
    "dvsg-train": ("Training", "One GPU: `--cupy`", "Several GPUs and machines: torchrun"),
    "dvsg-eval": ("Training",),
    "dvsg-export": ("Exporting trained networks",),
    "dvsg-report": ("Comparing runs and seeds",),
}


def console_scripts() -> dict[str, click.Command]:
    """{script name: click command} from pyproject.toml's [project.scripts]."""
    import importlib

    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10: the table's `name = "module:attr"` lines
        table = text.split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
        scripts = dict(re.findall(r'^([\w.-]+)\s*=\s*"([^"]+)"', table, re.M))
    else:
        scripts = tomllib.loads(text)["project"]["scripts"]
    out = {}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        script = getattr(importlib.import_module(module), attr)
        out[name] = getattr(script, "click_command", script)   # dvsprep.interrupts.ConsoleScript
    return out


def commands() -> dict[str, click.Command]:
    """Every command a user types: `dvsprep <sub>` for the group's subcommands, the other scripts."""
    out = {}
    for name, cmd in console_scripts().items():
        if isinstance(cmd, click.Group):
            out.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        else:
            out[name] = cmd
    return out


def sections(text: str) -> dict[str, str]:
    """{heading title: its text, subsections included} for every `#`-heading outside code blocks."""
    lines = text.splitlines()
    heads, fenced = [], False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"(#+) (.*)", line)
        if m:
            heads.append((i, len(m.group(1)), m.group(2).strip()))
    out = {}
    for k, (i, level, title) in enumerate(heads):
        end = next((j for j, lv, _ in heads[k + 1:] if lv <= level), len(lines))
        out[title] = "\n".join(lines[i + 1:end])
    return out


SECTION_TEXT = sections(README)
COMMANDS_TEXT = SECTION_TEXT["Commands"].split("\n### ")[0]
TABLE = [ln for ln in COMMANDS_TEXT.splitlines() if ln.startswith("| `")]
PREAMBLE = "\n".join(ln for ln in COMMANDS_TEXT.splitlines() if not ln.startswith("|"))


def table_rows(scripts: list[str]) -> dict[str, list[str]]:
    """{command: the first cells of its table rows}; a command is the start of a code span in a
    first cell that begins with a console script (`dvsprep pack`, `dvsg-train`)."""
    out: dict[str, list[str]] = {}
    for row in TABLE:
        cell = row.split(" | ")[0].lstrip("| ").replace("\\|", "|")
        for span in re.findall(r"`([^`]+)`", cell):
            words = span.split()
            if words[0] in scripts:
                name = " ".join(words[:2]) if words[0] == "dvsprep" else words[0]
                out.setdefault(name, []).append(cell)
    return out


def mentioned(flag: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def undocumented(cmd: click.Command, text: str) -> list[str]:
    """The options of `cmd` of which no flag (and, for an on/off pair, no off flag) is in `text`."""
    missing = []
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.hidden:
            continue
        for flags in (p.opts, p.secondary_opts):
            if flags and not any(mentioned(f, text) for f in flags):
                missing.append("/".join(flags))
    return missing


def test_the_table_has_a_row_for_every_console_script_and_dvsprep_subcommand():
    scripts = list(console_scripts())
    rows = table_rows(scripts)
    assert set(scripts) == {"dvsprep", "dvsg-train", "dvsg-eval", "dvsg-export", "dvsg-report"}
    assert sorted(set(commands()) - set(rows)) == []
    assert sorted(set(rows) - set(commands())) == []          # no row for a command that is gone


def test_every_command_has_its_sections_and_they_exist():
    assert sorted(SECTIONS) == sorted(commands())
    assert [s for ss in SECTIONS.values() for s in ss if s not in SECTION_TEXT] == []


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_option_of_a_command_is_documented(name):
    cmd = commands()[name]
    rows = table_rows(list(console_scripts()))[name]
    text = "\n".join([*rows, PREAMBLE, *(SECTION_TEXT[s] for s in SECTIONS[name])])
    assert undocumented(cmd, text) == []


def test_the_dvsprep_group_options_are_documented_above_the_table():
    assert undocumented(console_scripts()["dvsprep"], PREAMBLE) == []


def test_the_check_catches_an_undocumented_option():
    cmd = click.Command("x", params=[click.Option(["--json"]), click.Option(["-Q", "--quux-level"]),
                                     click.Option(["--amp/--no-amp"]), click.Option(["--zzz/--no-zzz"])])
    assert undocumented(cmd, "`--json`, `--amp` (`--no-amp` turns it off), --zzz") == ["-Q/--quux-level",
                                                                                       "--no-zzz"]
    assert not mentioned("--amp", "--amp-dtype") and not mentioned("-T", "--T-max") and mentioned("-T", "(-T 16)")
