"""No import cycles inside dvsprep and dvsg_train, and dvsprep's layers (house style), counting
every import of a module: top-level and inside functions, absolute and relative.

dvsprep's layers, lowest first: the shared helpers at the top of the package, then the wings
integrity < raw < events < frames, then the commands that span wings (cli, info, show, verify).
A module imports only from its own layer or lower ones; a wing is entered through its face
(`dvsprep.<wing>`, its __init__), never through one of its modules."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dvsprep", "dvsg_train")


def _modules() -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package __init__)} for every .py of PACKAGES."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _imported(node: ast.AST, package: str) -> list[str]:
    """Dotted names an import statement may load (a `from X import y` may load X or X.y)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [mod] + [f"{mod}.{a.name}" for a in node.names]


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {module it imports: line of the first such import}} within PACKAGES."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, (path, is_pkg) in mods.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for name in _imported(node, package):
                parts = name.split(".")
                # the longest prefix that is one of our modules (`from .x import func` loads .x)
                target = next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                               if ".".join(parts[:i]) in mods), None)
                # a package's own ancestors are always loaded before it: `from . import sibling`
                # names the parent package, but is no edge to it
                if target is not None and target != mod and not mod.startswith(target + "."):
                    graph[mod][target] = min(graph[mod].get(target, node.lineno), node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "dvsprep.integrity" in graph["dvsprep.verify"]         # `from .integrity import trust`
    assert "dvsprep.integrity.trust" in graph["dvsprep.verify"]   # ... which may load the module trust
    assert "dvsprep.errors" in graph["dvsprep.verify"]            # `from .errors import ...` at the top
    assert "dvsprep.frames.remote" in graph["dvsprep.verify"]     # `from .frames import remote` in a function
    assert "dvsprep.frames" in graph["dvsg_train.data"]           # absolute import across packages
    assert "dvsprep.raw" in graph["dvsprep.events.convert"]       # `from ..raw import ...`
    assert "dvsg_train.export.network" in graph["dvsg_train.export"]
    toy = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}, "e": {"e": 1}}
    assert cycles(toy) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    lines = [f"{' <-> '.join(comp)}: " + ", ".join(f"{a}:{graph[a][b]} -> {b}" for a in comp for b in sorted(graph[a])
                                               if b in comp) for comp in found]
    assert not found, "import cycles:\n" + "\n".join(lines)


HELPERS = {"constants", "errors", "atomic", "workers", "resources", "cache", "inputs", "lazy", "interrupts"}
WINGS = ("integrity", "raw", "events", "frames")     # lowest first
COMMANDS = {"cli", "entry", "info", "show", "verify"}
THIRD_PARTY_TORCH = ("torch", "spikingjelly", "cupy", "dvsg_train")


def layer(mod: str) -> int:
    """0 = helpers, 1..4 = the wings in WINGS order, 5 = commands, 6 = the package face `dvsprep`
    (the public names of wings and commands; lazy: it imports them only when one is used)."""
    parts = mod.split(".")
    assert parts[0] == "dvsprep", mod
    if len(parts) == 1:
        return 6
    if parts[1] in HELPERS:
        return 0
    if parts[1] in WINGS:
        return 1 + WINGS.index(parts[1])
    assert parts[1] in COMMANDS, f"{mod}: a new dvsprep module must be placed in a layer (test_import_graph)"
    return 5


def test_every_dvsprep_module_has_a_layer():
    for mod in import_graph():
        if mod.startswith("dvsprep"):
            layer(mod)


def test_dvsprep_layers_point_down():
    graph = import_graph()
    bad = [f"{a}:{line} -> {b}" for a, edges in graph.items() if a.startswith("dvsprep")
           for b, line in edges.items() if b.startswith("dvsprep") and layer(b) > layer(a)]
    assert not bad, "imports from a lower layer up to a higher one:\n" + "\n".join(bad)


def _reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_raw_and_integrity_never_reach_events_or_frames():
    graph = import_graph()
    for mod in graph:
        if mod.split(".")[:2] in (["dvsprep", "raw"], ["dvsprep", "integrity"]):
            reached = {m for m in _reachable(graph, mod) if m.split(".")[:2] in (["dvsprep", "events"], ["dvsprep", "frames"])}
            assert not reached, f"{mod} reaches {sorted(reached)}"


def test_wings_are_entered_through_their_faces():
    graph = import_graph()
    bad = []
    for a, edges in graph.items():
        for b in edges:
            pb = b.split(".")
            if pb[0] != "dvsprep" or len(pb) < 3 or pb[1] not in WINGS:
                continue
            pa = a.split(".")
            own_wing = pa[0] == "dvsprep" and len(pa) > 1 and pa[1] == pb[1]
            # `from ..raw import x` also names dvsprep.raw.x as a candidate: only flag modules
            # that were named as modules (the face is imported too in that case)
            if not own_wing and f"dvsprep.{pb[1]}" not in edges:
                bad.append(f"{a}:{edges[b]} -> {b}")
    assert not bad, "imports past a wing's face (import from dvsprep.<wing> instead):\n" + "\n".join(bad)


def test_dvsprep_never_imports_torch_or_the_trainer():
    hits = []
    for f in sorted((ROOT / "dvsprep").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), str(f))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            hits += [f"{f.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                     if n.split(".")[0] in THIRD_PARTY_TORCH]
    assert not hits, "\n".join(hits)


def test_the_layer_checks_would_see_a_violation():
    """The rules above fire on a graph that breaks them (so a silent pass means something)."""
    assert layer("dvsprep.raw.aedat") < layer("dvsprep.events.store") < layer("dvsprep.frames.build") < layer("dvsprep.cli")
    toy = {"dvsprep.raw.aedat": {"dvsprep.frames": 3, "dvsprep.frames.store": 3}, "dvsprep.frames": {}, "dvsprep.frames.store": {}}
    assert "dvsprep.frames.store" in _reachable(toy, "dvsprep.raw.aedat")
