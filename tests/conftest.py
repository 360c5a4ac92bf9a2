"""Shared fixtures: run the CLI in-process; keep the fused tests on CUDA wherever there is CUDA; a
one-process gloo group."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.distributed as dist
from device_guard import fused_tensors_on_cuda  # noqa: F401  (an autouse fixture: every test gets it)
from typer.testing import CliRunner, Result

from lossgraph.cli.app import app
from lossgraph.kinds import (
    loss_kinds,
    source_kinds,
    unregister_loss_kind,
    unregister_source_kind,
)


@pytest.fixture
def cli() -> Callable[..., Result]:
    """`cli("validate", path)` runs `lossgraph validate PATH` in-process and returns the click Result."""
    runner = CliRunner()

    def invoke(*args: str | Path) -> Result:
        return runner.invoke(app, [str(arg) for arg in args])

    return invoke


@pytest.fixture
def world_of_one():
    """A one-process gloo group (vocab parallel and normalize_across run their collectives on it)."""
    handle, path = tempfile.mkstemp()
    os.close(handle)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
        os.unlink(path)


def pytest_terminal_summary(terminalreporter, config) -> None:
    """Name the order the tests ran in also under `-q` (which hides pytest-randomly's header), so that a
    failure that depends on it can be repeated."""
    seed = getattr(config.option, "randomly_seed", None)
    if config.pluginmanager.has_plugin("randomly") and isinstance(seed, int):
        terminalreporter.write_line(f"test order: pytest-randomly, repeat it with --randomly-seed={seed}")


@pytest.fixture
def registry_restored():
    """Unregister, after the test, every kind it registered (by whatever route)."""
    losses = {kind.name for kind in loss_kinds()}
    sources = {kind.name for kind in source_kinds()}
    yield
    for kind in loss_kinds():
        if kind.name not in losses:
            unregister_loss_kind(kind.name)
    for kind in source_kinds():
        if kind.name not in sources:
            unregister_source_kind(kind.name)
