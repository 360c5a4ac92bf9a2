"""The shape of the package: no import cycles, imports that point down the layers, and no code outside
the kind modules that branches on a kind's name (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

from lossgraph.kinds import loss_kinds, source_kinds

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"lossgraph": ROOT / "lossgraph", "lossgraph.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(module: str) -> set[str]:
    """The package modules `module` imports (at its top or inside functions; not for type checkers)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from package import module` imports the module; `from module import name`, the module
            names = [
                f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in MODULES else origin for alias in node.names
            ]
        else:
            continue
        found.update(name for name in names if name in MODULES and name != module)
    return found


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    for module in MODULES:
        graph.add_edges_from((module, imported) for imported in imports_of(module))
    return graph


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert ("lossgraph.compiler.plan", "lossgraph.kinds") in graph.edges
    assert ("lossgraph.kinds.losses.jsd", "lossgraph.kernels.fragments") in graph.edges
    assert ("lossgraph.compiler.pipeline", "lossgraph.compiler.passes") in graph.edges  # `from . import passes`


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles)


# Which layers a layer may import (besides itself, errors and the package root). The kinds are vertical
# slices: each holds its spec model, its kernel fragments and its math, so it sits on the spec and the
# kernels and under everything else.
ALLOWED = {
    "lossgraph.kernels": set(),
    "lossgraph.spec": {"lossgraph.kinds"},
    "lossgraph.kinds": {"lossgraph.spec", "lossgraph.kernels"},
    "lossgraph.compiler": {"lossgraph.spec", "lossgraph.kinds", "lossgraph.kernels"},
    "lossgraph.runtime": {
        "lossgraph.spec",
        "lossgraph.kinds",
        "lossgraph.kernels",
        "lossgraph.compiler",
        "lossgraph.document",  # compile() of a path or text loads it through the front door
    },
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_down_the_layers(layer):
    graph = import_graph()
    shared = {"lossgraph", "lossgraph.errors", layer}
    wrong = [
        f"{module} imports {imported}"
        for module, imported in graph.edges
        if _layer(module) == layer and _layer(imported) not in shared | ALLOWED[layer]
    ]
    assert not wrong, "\n".join(wrong)


def _names_a_kind(node: ast.AST) -> bool:
    """`source.type`, `term.kind`, `kind`: an expression holding the name of a loss or source kind."""
    if isinstance(node, ast.Attribute):
        return node.attr in ("type", "kind")
    return isinstance(node, ast.Name) and node.id == "kind"


def _kind_name_comparisons(path: Path, kind_names: set[str]) -> list[str]:
    """`x.type == "jsd"`, `term.kind in ("teacher", ...)` and the like: code that branches on a kind's name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare) or not any(_names_a_kind(side) for side in [node.left, *node.comparators]):
            continue
        constants = [
            element.value
            for side in [node.left, *node.comparators]
            for element in ([side] if isinstance(side, ast.Constant) else getattr(side, "elts", []))
            if isinstance(element, ast.Constant)
        ]
        if any(value in kind_names for value in constants):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_the_kind_modules_branch_on_a_kind_name():
    """The core (everything but the kinds and the applications, whose benchmark peers spell out their
    own cases) never compares a loss's or a source's type with a kind's name."""
    names = {kind.name for kind in (*loss_kinds(), *source_kinds())}
    core = [path for module, path in MODULES.items() if not module.startswith(("lossgraph.kinds", "lossgraph.apps"))]
    found = [line for path in core for line in _kind_name_comparisons(path, names)]
    assert not found, "\n".join(found)
