"""Shared fixtures: run the CLI in-process; keep the fused tests on CUDA wherever there is CUDA."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from device_guard import fused_tensors_on_cuda  # noqa: F401  (an autouse fixture: every test gets it)
from typer.testing import CliRunner, Result

from lossgraph.cli.app import app


@pytest.fixture
def cli() -> Callable[..., Result]:
    """`cli("validate", path)` runs `lossgraph validate PATH` in-process and returns the click Result."""
    runner = CliRunner()

    def invoke(*args: str | Path) -> Result:
        return runner.invoke(app, [str(arg) for arg in args])

    return invoke


def pytest_terminal_summary(terminalreporter, config) -> None:
    """Name the order the tests ran in also under `-q` (which hides pytest-randomly's header), so that a
    failure that depends on it can be repeated."""
    seed = getattr(config.option, "randomly_seed", None)
    if config.pluginmanager.has_plugin("randomly") and isinstance(seed, int):
        terminalreporter.write_line(f"test order: pytest-randomly, repeat it with --randomly-seed={seed}")
