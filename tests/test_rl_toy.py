"""examples/rl_toy.py: a tiny policy learns a verifiable task with lossgraph's policy gradient, and its
reward rises; the live table draws."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "rl_toy.py"


def rl_toy():
    spec = importlib.util.spec_from_file_location("rl_toy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reward_rises(tmp_path):
    summary = rl_toy().main(["--steps", "40", "--quiet", "--json", str(tmp_path / "run.json")])
    assert summary["seconds"] < 60
    assert summary["first_reward"] < 0.2  # chance is 1/16
    assert summary["last_reward"] > summary["first_reward"] + 0.15
    assert (tmp_path / "run.json").exists()


def test_the_live_table_shows_the_reward():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "6"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "reward by step" in result.stdout
    assert re.search(r"│\s+6 │\s+0\.\d{3} │", result.stdout)  # the last step's row
    assert "reward rose from" in result.stdout.splitlines()[-1]


@pytest.mark.slow
def test_the_default_run_learns_the_task_in_under_two_minutes():
    summary = rl_toy().main(["--quiet"])
    assert summary["seconds"] < 120
    assert summary["last_reward"] > 0.9
