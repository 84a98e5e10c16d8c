"""The house plan, checked: imports point down the layers of docs/ARCHITECTURE.md, and no two
files (or packages) import each other, directly or around a loop.

Every import counts: at the top of a file, inside a function (the lazy imports that keep
`virtkit run` fast), and under TYPE_CHECKING. A package's ``__init__`` may import its own
submodules (a facade); importing ``pkg.sub`` is an edge to ``pkg.sub``, not to ``pkg``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "virtkit"

#: bottom first: a module may import modules of its own layer and of any layer below it
LAYERS: list[set[str]] = [
    {"virtkit", "virtkit.errors", "virtkit.units", "virtkit.records"},
    {"virtkit.host"},
    {"virtkit.kvm", "virtkit.memory", "virtkit.iothread", "virtkit.stop", "virtkit.console"},
    {"virtkit.arch"},
    {"virtkit.boot", "virtkit.devices"},
    {"virtkit.diagnose", "virtkit.cpl0"},
    {"virtkit.vcpu"},
    {"virtkit.vm", "virtkit.stats"},
    {"virtkit.api", "virtkit.doctor", "virtkit.guests"},
    {"virtkit.snapshot", "virtkit.migration"},
    {"virtkit.container", "virtkit.jail", "virtkit.sandbox"},
    {"virtkit.service"},
    {"virtkit.demo", "virtkit.cli", "virtkit.__main__"},
]

#: exceptions to the rules, each an edge "importer -> imported" or a cycle: none is left (issue 10
#: untangled the last ones). The test fails when a listed one disappears, so a list only shrinks.
KNOWN_UPWARD: set[str] = set()
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [mod, *subs]
        for t in targets:
            while t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known and t.startswith("virtkit") and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    g = {name: imports(name, path, known) for name, path in known.items()}
    for name in g:  # a package's __init__ importing its own submodules is a facade, not a layer edge
        if known[name].name == "__init__.py":
            g[name] = {t for t in g[name] if not t.startswith(name + ".")}
    return g


def layer_of(name: str) -> int:
    best, rank = "", -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, i
    return rank


def test_every_module_has_a_layer() -> None:
    assert [m for m in modules() if layer_of(m) < 0] == []


def test_imports_point_down() -> None:
    upward = {f"{a} -> {b}" for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a)}
    assert upward - KNOWN_UPWARD == set(), "upward imports (see docs/ARCHITECTURE.md for the layers)"
    assert KNOWN_UPWARD - upward == set(), "fixed: remove these from KNOWN_UPWARD"


def strongly_connected(g: dict[str, set[str]]) -> list[set[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    counter = 0

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred nodes
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in list(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_files() -> None:
    cycles = {frozenset(c) for c in strongly_connected(graph())}
    assert cycles - KNOWN_CYCLES == set()
    assert KNOWN_CYCLES - cycles == set(), "fixed: remove these from KNOWN_CYCLES"


def test_no_import_cycle_between_packages() -> None:
    def package(m: str) -> str:
        return m if (PACKAGE.parent / m.replace(".", "/")).is_dir() else m.rsplit(".", 1)[0]

    g: dict[str, set[str]] = defaultdict(set)
    for a, targets in graph().items():
        for b in targets:
            pa, pb = package(a), package(b)
            # an edge into an ancestor package's own modules is inside that package, not across
            if pa != pb and not pa.startswith(pb + ".") and not pb.startswith(pa + "."):
                g[pa].add(pb)
    cycles = {frozenset(c) for c in strongly_connected(g)}
    assert cycles == set()
