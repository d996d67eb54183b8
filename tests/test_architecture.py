"""The package's import graph follows the layers that docs/ARCHITECTURE.md names.

Each module of `minigemma` belongs to one layer of the table under "## Layers" in docs/ARCHITECTURE.md,
and may import only from its own layer or below; the graph, lazy imports inside functions included, has
no circle. The graph is read from the source (`ast`), so an import inside a function counts as much as
one at the top: a reader following a name meets it either way. `from minigemma import X` and
`minigemma.X` resolve through the package's lazy table (`minigemma._LAZY`) to the module that defines X;
a package that imports its modules by name (`pkgutil.iter_modules(__path__)`) imports each of them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minigemma"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def lazy_table() -> dict[str, str]:
    """The package root's name -> module table, read from its source."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def imports_of(name: str, path: Path, known: set[str], lazy: dict[str, str]) -> set[str]:
    """Every module of the package that `name` imports, anywhere in its source."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # `a.b.c` may be a module, or a name inside module `a.b`: take the longest known module
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if target == "minigemma" and alias.name in lazy:
                    add(lazy[alias.name])
                elif f"{target}.{alias.name}" in known:
                    add(f"{target}.{alias.name}")
                else:
                    add(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name != "minigemma":  # the root alone holds only the lazy table
                    add(alias.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "minigemma":
            if node.attr in lazy:
                add(lazy[node.attr])
    if path.name == "__init__.py" and "iter_modules(__path__)" in path.read_text():
        # a package that imports its own modules by name (grading.checks, bench): an edge to each
        found |= {m for m in known if m.rpartition(".")[0] == name}
    return found


def layers_from_doc() -> list[tuple[str, list[str]]]:
    """[(layer title, [module patterns])] from the table under "## Layers"."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.match(r"^\d", cells[0]):
            rows.append((cells[0], re.findall(r"`([^`]+)`", cells[1])))
    return rows


def layer_of(name: str, layers: list[tuple[str, list[str]]]) -> int | None:
    short = name.removeprefix("minigemma.") if name != "minigemma" else "minigemma"
    for i, (_, patterns) in enumerate(layers):
        for p in patterns:
            if short == p or (p.endswith(".*") and (short == p[:-2] or short.startswith(p[:-1]))):
                return i
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    lazy = lazy_table()
    assert lazy, "minigemma/__init__.py has no _LAZY table"
    return {name: imports_of(name, path, set(mods), lazy) for name, path in mods.items()}


def test_every_module_has_a_layer(graph):
    layers = layers_from_doc()
    assert len(layers) >= 4, "docs/ARCHITECTURE.md's ## Layers table is missing or unreadable"
    orphans = sorted(m for m in graph if layer_of(m, layers) is None)
    assert not orphans, f"modules in no layer of docs/ARCHITECTURE.md: {orphans}"


def climbs(graph: dict[str, set[str]], layers) -> list[str]:
    """Every edge from a module to one of a higher layer."""
    out = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            la, lb = layer_of(a, layers), layer_of(b, layers)
            if la is not None and lb is not None and lb > la:
                out.append(f"{a} ({layers[la][0]}) imports {b} ({layers[lb][0]})")
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import circles, by depth-first search: a module met again while still on the path closes one."""
    colour: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(m: str) -> None:
        colour[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if colour.get(n) == 1:
                found.append(stack[stack.index(n):] + [n])
            elif n not in colour:
                visit(n)
        stack.pop()
        colour[m] = 2

    for m in sorted(graph):
        if m not in colour:
            visit(m)
    return found


def test_no_import_climbs_a_layer(graph):
    bad = climbs(graph, layers_from_doc())
    assert not bad, "imports that climb a layer:\n" + "\n".join(bad)


def test_no_import_circle(graph):
    bad = circles(graph)
    assert not bad, "import circles:\n" + "\n".join(" -> ".join(c) for c in bad)


def test_the_checker_sees_what_it_must(tmp_path):
    """The graph reader itself: a lazy import inside a function, a relative import and a lazy-table
    name are all edges; a circle and a climb built from them are found."""
    known = {"minigemma.a", "minigemma.b", "minigemma.pretrained"}
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from .b import g\n    from minigemma import load_pretrained\n")
    found = imports_of("minigemma.a", a, known, {"load_pretrained": "minigemma.pretrained"})
    assert found == {"minigemma.b", "minigemma.pretrained"}
    b = tmp_path / "b.py"
    b.write_text("import minigemma\nx = minigemma.load_pretrained\nfrom . import a\n")
    assert imports_of("minigemma.b", b, known, {"load_pretrained": "minigemma.pretrained"}) == \
        {"minigemma.a", "minigemma.pretrained"}
    layers = [("0 low", ["a"]), ("1 high", ["b", "kernels.*"])]
    graph = {"minigemma.a": {"minigemma.b"}, "minigemma.b": {"minigemma.a"}, "minigemma.kernels.x": set()}
    assert circles(graph) == [["minigemma.a", "minigemma.b", "minigemma.a"]]
    assert climbs(graph, layers) == ["minigemma.a (0 low) imports minigemma.b (1 high)"]
    assert layer_of("minigemma.kernels.x", layers) == 1 and layer_of("minigemma.c", layers) is None


def private_uses(name: str, path: Path, known: set[str]) -> list[str]:
    """Names starting with one underscore that `name` takes from another module of the package:
    `from .x import _helper`, or `x._helper` where x is an imported module of the package."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    aliases: set[str] = set()
    out = []

    def private(n: str) -> bool:
        return n.startswith("_") and not n.startswith("__")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    aliases.add(alias.asname or alias.name)
                elif target in known and target != name and private(alias.name):
                    out.append(f"{name} imports {target}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known and alias.asname:
                    aliases.add(alias.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and private(node.attr)):
            out.append(f"{name} uses {node.value.id}.{node.attr}")
    return out


def test_no_private_helper_crosses_a_module():
    mods = modules()
    bad = [u for name, path in sorted(mods.items()) for u in private_uses(name, path, set(mods))]
    assert not bad, "private helpers used outside their module (make them public, or move them):\n" + "\n".join(bad)


def test_the_private_check_sees_both_forms(tmp_path):
    known = {"minigemma.a", "minigemma.quant"}
    a = tmp_path / "a.py"
    a.write_text("from .quant import _rows, fine\nfrom minigemma import quant as Q\nQ._scale(1)\nQ.__name__\n")
    assert private_uses("minigemma.a", a, known) == ["minigemma.a imports minigemma.quant._rows",
                                                     "minigemma.a uses Q._scale"]
