"""The `lossgraph` command line (`app`), and the text and graph renderings it prints (`show`, `viz`)."""

from .app import app, run

__all__ = ["app", "run"]
