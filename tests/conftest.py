"""Shared fixtures: run the CLI in-process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from lossgraph.cli import app


@pytest.fixture
def cli() -> Callable[..., Result]:
    """`cli("validate", path)` runs `lossgraph validate PATH` in-process and returns the click Result."""
    runner = CliRunner()

    def invoke(*args: str | Path) -> Result:
        return runner.invoke(app, [str(arg) for arg in args])

    return invoke
