"""No module of ``instructmole`` imports in a cycle, not even through an import inside a function.

A cycle makes the import order matter (the first module to load sees the other half-built) and
ties two concepts together so that neither can be read or changed alone; the usual dodge, moving
one import into a function, hides the cycle without removing it. So the graph here holds every
import a module can run: at module level and inside functions and classes. Only ``if
TYPE_CHECKING:`` blocks are left out, as they never run. The graph is read from the source with
``ast``: nothing is imported, so the test sees the code as written, not what happens to be loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "instructmole"

Edge = tuple[str, str, str]  # (importer, imported, "file:line" of the import)


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file for every ``.py`` below ``package`` (``__init__`` is the package)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = (package.name, *path.relative_to(package).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules one import statement loads (the longest known name of each target)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            anchor = importer.split(".") if is_package else importer.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, node.module] if node.module else anchor)
        else:
            base = node.module or ""
        # ``from pkg import name`` loads pkg.name when it is a module, else takes a name from pkg
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found = set()
    for target in targets:
        parts = target.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                found.add(".".join(parts[:end]))
                break
    return found


def runnable_imports(path: Path) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a file that can run: anywhere but under ``if TYPE_CHECKING:``."""
    todo: list[ast.stmt] = list(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body)
    found = []
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        todo.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
    return found


def import_graph(package: Path) -> list[Edge]:
    """Every import between the package's modules that can run, with where it is written."""
    files = module_names(package)
    edges: list[Edge] = []
    for name, path in files.items():
        for node in runnable_imports(path):
            for target in _imported(node, name, path.name == "__init__.py", set(files)):
                if target != name:
                    edges.append((name, target, f"{path.name}:{node.lineno}"))
    return edges


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One shortest cycle through each module that lies on any (breadth-first from each module)."""
    out: dict[frozenset[str], list[Edge]] = {}
    by_source: dict[str, list[Edge]] = {}
    for edge in edges:
        by_source.setdefault(edge[0], []).append(edge)
    for start in sorted(by_source):
        paths: dict[str, list[Edge]] = {start: []}
        frontier = [start]
        while frontier and start not in out:
            following = []
            for module in frontier:
                for edge in by_source.get(module, []):
                    if edge[1] == start:
                        cycle = [*paths[module], edge]
                        out.setdefault(frozenset(e[0] for e in cycle), cycle)
                    elif edge[1] not in paths:
                        paths[edge[1]] = [*paths[module], edge]
                        following.append(edge[1])
            frontier = following
    return list(out.values())


def _shown(cycle: list[Edge]) -> str:
    return " -> ".join(f"{a} ({where})" for a, _, where in cycle) + f" -> {cycle[0][0]}"


def test_no_module_of_instructmole_imports_in_a_cycle() -> None:
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles (break them, do not hide them in a function):\n" + "\n".join(map(_shown, found))


def test_the_core_imports_no_host() -> None:
    """The hosts (the ComfyUI nodes, the trainer) import the core, never the other way round, so the
    core runs, and is tested, without ComfyUI and without the trainer."""
    hosts = {"nodes", "training", "comfy", "comfy_api", "comfy_extras", "folder_paths"}
    found = [
        f"{path.name}:{node.lineno}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in runnable_imports(path)
        if not getattr(node, "level", 0)
        for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        if name.split(".")[0] in hosts
    ]
    assert not found, f"instructmole imports a host at {found}"


def test_the_graph_sees_the_imports_the_cycle_check_relies_on() -> None:
    """Guards the check itself: a parser that missed relative or package imports would find no cycle."""
    edges = {(a, b) for a, b, _ in import_graph(PACKAGE)}
    assert ("instructmole.formats", "instructmole.icedit") in edges  # from .icedit import ...
    assert ("instructmole.icedit", "instructmole.adapter") in edges
    assert ("instructmole", "instructmole.formats") in edges  # the package's __init__
    assert ("instructmole.demo", "instructmole") in edges  # from . import Adapter, ...
    imported_by_type_or_converter = {b for a, b in edges if a in ("instructmole.adapter", "instructmole.icedit")}
    assert "instructmole.formats" not in imported_by_type_or_converter


def test_a_cycle_hidden_in_a_function_is_found(tmp_path: Path) -> None:
    """a -> b only inside a function closes a cycle; c -> a only for type checkers does not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from . import c\n\n\ndef f():\n    from . import b\n    return b\n")
    (pkg / "b.py").write_text("import pkg.a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    found = cycles(import_graph(pkg))
    assert [sorted(e[0] for e in cycle) for cycle in found] == [["pkg.a", "pkg.b"]]
    assert _shown(found[0]) == "pkg.a (a.py:5) -> pkg.b (b.py:1) -> pkg.a"
