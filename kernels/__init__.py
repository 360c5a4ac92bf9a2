"""Triton kernels of lossgraph and their host-side launchers (installed as `lossgraph.kernels`).

This folder sits at the top of the repository, so Python also finds it as a top-level package named
`kernels` whenever the repository root is on `sys.path` (`python -m pytest`, `python -c`, a REPL or a
notebook started there). That name belongs to Hugging Face's `kernels` package, which transformers imports.
Imported under that name, this file hands it on: the name becomes the next `kernels` that Python would find
without this folder, or fails to import as it would without it. Under `lossgraph.kernels` it does nothing.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _spec_elsewhere() -> importlib.machinery.ModuleSpec | None:
        """The spec Python's finders give `kernels` when the folder holding this package is not searched."""
        own_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        other_paths = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != own_root]
        for finder in sys.meta_path:
            if finder is importlib.machinery.PathFinder:
                spec = finder.find_spec("kernels", other_paths)
            elif hasattr(finder, "find_spec"):
                spec = finder.find_spec("kernels", None)
            else:
                continue
            if spec is not None:
                return spec
        return None

    _spec = _spec_elsewhere()
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    # Python returns whatever sys.modules holds under the name once this file has run.
    sys.modules["kernels"] = _module
    if _spec.loader is not None:  # a namespace package has nothing to run
        _spec.loader.exec_module(_module)
