"""The package's imports point one way: no module of quill/ reaches itself again through its imports.

Imports are read from the source with `ast`, at module level and inside functions alike (a deferred import
is still a dependency, only a later one), plus modules loaded by name (`importlib.import_module` of a
string constant such as cli.COMMAND_MODULES). A circle is reported as the chain of modules that closes it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "quill"


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """quill's modules by dotted name ('quill', 'quill.server', 'quill.server.cli', ...)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The quill modules `name` imports (by statement anywhere in it, or by a module-name string constant)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    # a logger named after a module ("quill.store") is a name, not an import
    loggers = {id(n.args[0]) for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args
               and getattr(n.func, "attr", getattr(n.func, "id", None)) == "getLogger"}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:  # `from quill import kernels` imports the module quill.kernels
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("quill.")
              and id(node) not in loggers):
            found.add(node.value)  # loaded by name, e.g. importlib.import_module("quill.server.cli")
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` as [a, b, ..., a], or None (depth-first search, colouring the nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_circles_and_only_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_imports_are_read_at_every_level(tmp_path):
    pkg = tmp_path / "quill"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "a.py", "b.py", "sub/__init__.py", "sub/c.py"):
        (pkg / f).write_text("")
    (pkg / "a.py").write_text("import logging\nlog = logging.getLogger('quill.b')\n"
                              "def f():\n    from quill import b\n    from .sub import c\n")
    (pkg / "sub" / "c.py").write_text("import importlib\nNAMES = ('quill.a',)\nfrom .. import b\n")
    modules = module_names(pkg)
    assert set(modules) == {"quill", "quill.a", "quill.b", "quill.sub", "quill.sub.c"}
    assert imports_of("quill.a", modules["quill.a"], modules) == {"quill.b", "quill.sub.c"}
    assert imports_of("quill.sub.c", modules["quill.sub.c"], modules) == {"quill.a", "quill.b"}


def test_no_import_circle_inside_the_package():
    graph = import_graph()
    assert "quill.engine" in graph and "quill.server.cli" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_readme_layout_lists_every_module():
    """README's layout table has one row per module of quill/ (and no row for a module that is gone)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    table = table[:table.index("\n\n", table.index("| module |"))]
    listed = {name for row in table.splitlines() if row.startswith("| `")
              for name in row.split("|")[1].replace("`", "").replace(",", " ").split()}
    files = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert files - listed == set(), "modules missing from README's layout table"
    assert {n for n in listed if n.endswith(".py") and n.startswith("quill/")} - files == set(), \
        "README's layout table lists modules that do not exist"
