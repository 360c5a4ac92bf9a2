"""The shape of the package: no import cycles, imports that point down the layers, and no code outside
the kind modules that branches on a kind's name (docs/architecture.md)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import networkx as nx
import pytest

from lossgraph.kinds import kind_origin, loss_kind, loss_kinds, source_kinds
from lossgraph.kinds.plugins import BUILT_IN

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


def _lazy_exports(tree: ast.Module, module: str) -> set[str]:
    """The modules a lazy `_EXPORTS = {name: "module"}` table names (the package root's `__getattr__`
    imports them by string, which no import statement shows)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return {value.value for value in node.value.values if isinstance(value, ast.Constant)}
    return set()


def imports_of(module: str) -> set[str]:
    """The package modules `module` imports: at its top, inside functions (a lazy import is an import all
    the same: it runs, and it ties the layers as much) and through a lazy `_EXPORTS` table; not the
    imports only a type checker reads (`if TYPE_CHECKING:`)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = _lazy_exports(tree, module)
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
        found.update(names)
    return {name for name in found if name in MODULES and name != module}


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
    assert ("lossgraph.spec.docgen", "lossgraph.kinds.plugins") in graph.edges  # inside a function
    assert ("lossgraph", "lossgraph.runtime.compiled") in graph.edges  # the root's lazy `_EXPORTS`


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles)


# The layers, from the bottom up, as docs/architecture.md draws them: a module imports its own layer and
# the layers below, never one above; the layers of one rank (a tuple) do not import each other. A module
# is in the layer of the longest prefix that names it. The spec package holds two layers: the building
# blocks a kind's model is made of, under the kinds, and the document model that gathers the registered
# kinds (the unions of `LossGraphSpec`, the loader, the descriptions, the generated docs), over them.
LAYERS: tuple[dict[str, tuple[str, ...]], ...] = (
    # the kernels import nothing from lossgraph, not even its errors
    {"kernels": ("lossgraph.kernels",), "errors": ("lossgraph.errors",)},
    {"spec building blocks": ("lossgraph.spec",)},  # nodes, schedules, sourcemap, suggest
    {"kinds": ("lossgraph.kinds",)},
    {
        "document model": (
            "lossgraph.spec.models",
            "lossgraph.spec.loader",
            "lossgraph.spec.describe",
            "lossgraph.spec.docgen",
        )
    },
    {"compiler": ("lossgraph.compiler",)},
    {"front door": ("lossgraph.document",)},  # load, loads, check_text, check_file
    {"runtime": ("lossgraph.runtime",)},
    {"integrations": ("lossgraph.integrations",), "package root": ("lossgraph",)},  # the root re-exports the runtime
    {"apps": ("lossgraph.apps",)},
    {"cli": ("lossgraph.cli", "lossgraph.__main__")},
)
# Folders of lossgraph/ that hold no Python (nothing to place): package data.
WITHOUT_CODE = {"data"}


def _layers() -> dict[str, tuple[int, str]]:
    """module prefix -> (rank, layer)."""
    return {
        prefix: (rank, layer)
        for rank, layers in enumerate(LAYERS)
        for layer, prefixes in layers.items()
        for prefix in prefixes
    }


def layer_of(module: str) -> tuple[int, str]:
    prefixes = _layers()
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in prefixes:
            return prefixes[".".join(parts[:end])]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py")


def test_every_module_and_folder_has_a_layer():
    for module in MODULES:
        layer_of(module)
    folders = {path.name for path in (ROOT / "lossgraph").iterdir() if path.is_dir() and path.name != "__pycache__"}
    placed = {prefix.split(".")[1] for prefix in _layers() if prefix.count(".") >= 1}
    unplaced = sorted(folders - placed - WITHOUT_CODE)
    assert not unplaced, f"lossgraph/{unplaced[0]}/ is in no layer: add it to LAYERS in tests/test_architecture.py"
    for folder in WITHOUT_CODE:
        assert not list((ROOT / "lossgraph" / folder).rglob("*.py")), f"lossgraph/{folder}/ holds Python now"


def test_imports_point_down_the_layers():
    wrong = []
    for module, imported in import_graph().edges:
        (rank, layer), (imported_rank, imported_layer) = layer_of(module), layer_of(imported)
        if imported_rank > rank or (imported_rank == rank and imported_layer != layer):
            wrong.append(f"{module} ({layer}) imports {imported} ({imported_layer}), which is not below it")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_kernels_import_nothing_from_lossgraph():
    """Held by the layers too; said on its own because the kernels package is installed apart in spirit
    (lossgraph.kernels) and must run without the rest."""
    graph = import_graph()
    wrong = [
        f"{module} imports {imported}"
        for module, imported in graph.edges
        if module.startswith("lossgraph.kernels") and not imported.startswith("lossgraph.kernels")
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


# --------------------------------------------------------------------------------------------------
# What a new kind or form touches, measured: the modules that name it (docs/architecture.md).
# --------------------------------------------------------------------------------------------------


@functools.cache
def _nodes(path: Path) -> list[ast.AST]:
    return list(ast.walk(ast.parse(path.read_text(encoding="utf-8"))))


def _names(path: Path, identifiers: set[str], strings: set[str]) -> bool:
    """Whether the code of `path` names one of `identifiers` (a name, an attribute, an imported module or
    name) or holds one of `strings` as a whole string constant; comments and prose do not count."""
    for node in _nodes(path):
        if isinstance(node, ast.Constant) and node.value in strings:
            return True
        named = {
            ast.Name: lambda n: n.id,
            ast.Attribute: lambda n: n.attr,
            ast.alias: lambda n: n.name.rsplit(".", 1)[-1],
            ast.ImportFrom: lambda n: (n.module or "").rsplit(".", 1)[-1],
        }.get(type(node))
        if named and named(node) in identifiers:
            return True
    return False


def modules_naming(identifiers: set[str], strings: set[str], *, besides: set[str]) -> set[str]:
    """The modules of lossgraph/ and kernels/ that name the identifiers or strings, leaving out `besides`
    and the applications (programs built on the public API that spell out their own cases, as a user's
    script would; no kind needs them)."""
    return {
        module
        for module, path in MODULES.items()
        if module not in besides and not module.startswith("lossgraph.apps") and _names(path, identifiers, strings)
    }


# A new loss kind is its module plus this many other modules of code (docs/architecture.md, "How to add
# a loss kind"): the registration in lossgraph/kinds/__init__.py.
LOSS_KIND_OTHER_MODULES = 1


@pytest.mark.parametrize("kind", [kind.name for kind in loss_kinds() if kind_origin("loss", kind.name) == BUILT_IN])
def test_a_loss_kind_is_named_only_by_its_module_and_the_registration(kind):
    """Every built-in loss kind (its `type`, its module, its classes) is named by its own module, the
    registration and nothing else. Other kind modules may name it (jsd hands its endpoints to forward_kl
    and reverse_kl): a kind may build on another, which no new kind needs."""
    loss = loss_kind(kind)
    module = type(loss).__module__
    identifiers = {module.rsplit(".", 1)[1], type(loss).__name__, loss.model.__name__, type(loss.fragments).__name__}
    kind_modules = {
        name for name in MODULES if name.startswith(("lossgraph.kinds.losses.", "lossgraph.kinds.sources."))
    }
    found = modules_naming(identifiers, {kind}, besides=kind_modules)
    assert found == {"lossgraph.kinds"}, f"{kind} is named by {sorted(found)}"
    assert len(found) == LOSS_KIND_OTHER_MODULES


# A leaf target form (labels, dense logits, top-k pairs: a kind of run-time tensor) as the code names it
# today: its form string, the constant holding it, the plan's target and the kernel's target.
LEAF_FORMS = {
    "labels": {"LABELS", "LabelsTarget", "KLabels"},
    "dense": {"DENSE", "DenseTarget", "KDense"},
    "topk": {"TOPK", "TopKTarget", "KTopK"},
}
# The most modules of code besides its own source module that name a built-in leaf form
# (docs/architecture.md, "How to add a leaf form"): top-k, whose vectors the plan, the fusion and the
# generator's modules handle. A new form is named by none of them: it is one module behind
# `kinds.form.LeafForm` (tests/leaf_form_plugin.py, run end to end by tests/test_leaf_form.py).
LEAF_FORM_OTHER_MODULES = 12


@pytest.mark.parametrize("form", LEAF_FORMS)
def test_a_leaf_form_is_named_by_few_modules(form):
    own = {kind.model.__module__ for kind in source_kinds()}  # the source kinds' modules (labels, teacher, ...)
    found = modules_naming(LEAF_FORMS[form], {form}, besides=own)
    assert len(found) <= LEAF_FORM_OTHER_MODULES, f"the {form} form is named by {len(found)}: {sorted(found)}"


def test_the_leaf_forms_are_measured_at_the_documented_count():
    """The bound is tight: the widest form reaches it (lower LEAF_FORM_OTHER_MODULES when it shrinks)."""
    own = {kind.model.__module__ for kind in source_kinds()}
    widest = max(len(modules_naming(names, {form}, besides=own)) for form, names in LEAF_FORMS.items())
    assert widest == LEAF_FORM_OTHER_MODULES
