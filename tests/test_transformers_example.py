"""examples/hf_train.py, run as a user runs it: default TrainingArguments, a top-k dataset teacher and an
online teacher, gradient accumulation 2 and evaluation; logged terms that sum to the logged loss; a
save/load round trip that keeps the MTP heads and trains on; no warning from transformers about the models'
configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "hf_train.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_train")
    # tiny models: one thread is faster than several, and keeps the run short on a busy machine
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((out / "summary.json").read_text(encoding="utf-8")), result.stdout, result.stderr


def terms(entry: dict, prefix: str) -> dict[str, float]:
    return {key: value for key, value in entry.items() if key.startswith(prefix)}


def test_both_teachers_train_with_gradient_accumulation_and_evaluation(run):
    summary, _, _ = run
    logs = summary["train_logs"]
    assert [entry["step"] for entry in logs] == [2, 4, 6, 8]
    for entry in logs:
        assert entry["lossgraph/offline/next"] > 0  # the top-k teacher's columns reached the loss
        assert entry["lossgraph/online/next"] > 0  # and so did the online teacher
    assert logs[-1]["loss"] < logs[0]["loss"]
    evaluation = summary["eval"]
    assert set(terms(evaluation, "eval_lossgraph/")) == {
        "eval_lossgraph/lm/next",
        "eval_lossgraph/lm/mtp2",
        "eval_lossgraph/online/next",
        "eval_lossgraph/offline/next",
    }
    assert 0 <= evaluation["eval_lossgraph_metrics/next/accuracy"] <= 1


def test_logged_terms_sum_to_the_logged_loss(run):
    summary, stdout, _ = run
    for entry in [*summary["train_logs"], *summary["continued_logs"]]:
        assert sum(terms(entry, "lossgraph/").values()) == pytest.approx(entry["loss"], rel=1e-5), entry
    evaluation = summary["eval"]
    assert sum(terms(evaluation, "eval_lossgraph/").values()) == pytest.approx(evaluation["eval_loss"], rel=1e-5)
    assert "= sum of terms" in stdout


def test_the_mtp_heads_survive_save_and_load_and_train_on(run):
    summary, _, _ = run
    reload = summary["reload"]
    assert reload["heads_equal"]
    assert any(key.startswith("mtp2.") for key in reload["head_keys"])
    assert reload["eval_loss_after"] == pytest.approx(reload["eval_loss_before"], rel=1e-6)
    assert len(reload["draft"]) == 2 and all(len(row) == 2 for row in reload["draft"])
    assert summary["continued_logs"] and summary["continued_heads_moved"]


def test_the_models_build_without_transformers_warnings(run):
    """transformers logs `[transformers] ...` to stderr, for example when a config is built with a bos or
    eos id outside its vocab (GPT-2's default 50256)."""
    _, _, stderr = run
    logged = [line for line in stderr.splitlines() if "[transformers]" in line or "within the vocabulary" in line]
    assert not logged, "\n".join(logged)
