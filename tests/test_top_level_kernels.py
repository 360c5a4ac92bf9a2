"""The repository's `kernels/` folder is `lossgraph.kernels`, never the top-level `kernels` package.

Hugging Face's `kernels` package (which transformers 5 imports) owns that name. Python finds the folder
as a top-level package whenever the repository root is on `sys.path`, as under `python -m pytest` or
`python -c` run there; the folder must then hand the name on instead of hiding the real package.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_in_root(code: str, *, pythonpath: Path | None = None, no_site: bool = False) -> subprocess.CompletedProcess:
    """Run `code` with the repository root first on sys.path, as `python -c` does there."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    flags = ["-S"] if no_site else []
    return subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_another_kernels_package_wins_over_the_folder(tmp_path):
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("WHO = 'the other package'\n")
    (other / "sub.py").write_text("VALUE = 7\n")
    found = python_in_root(
        "import sys, kernels, kernels.sub; print(kernels.WHO, kernels.sub.VALUE, sys.modules['kernels'] is kernels)",
        pythonpath=tmp_path,
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["the", "other", "package", "7", "True"]


def test_without_another_package_the_name_is_not_found():
    found = python_in_root(
        "import sys; sys.path.insert(0, '')\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as exc:\n    print('missing', exc.name)\n"
        "print('kernels' in sys.modules)",
        no_site=True,
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["missing", "kernels", "False"]


def test_the_folder_is_lossgraph_kernels_from_the_root():
    found = python_in_root("import lossgraph.kernels.codegen as codegen; print(codegen.__name__)")
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "lossgraph.kernels.codegen"


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the transformers extra")
def test_transformers_imports_from_the_repository_root():
    found = python_in_root(
        "from transformers import GPT2LMHeadModel\n"
        "import sys\n"
        "print(getattr(sys.modules.get('kernels'), '__file__', None))"
    )
    assert found.returncode == 0, found.stderr
    # Hugging Face's package where transformers imported it, never this folder
    assert found.stdout.strip() != str(ROOT / "kernels" / "__init__.py")


def test_no_code_of_the_project_imports_the_top_level_name():
    importers = []
    for folder in ("lossgraph", "kernels", "tests", "benchmarks", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                if any(name == "kernels" or name.startswith("kernels.") for name in names):
                    importers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not importers, f"import lossgraph.kernels instead of kernels: {importers}"
