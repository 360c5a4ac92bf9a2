"""docs/transformers.md runs: every ```python block is executed, in order, in one namespace (tiny models
built from configs, a few steps each), and what it prints and trains is what the page says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "transformers.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_the_page_covers_the_integration():
    text = DOC.read_text(encoding="utf-8")
    for heading in (
        "## Quick start",
        "## Batches",
        "## MTP heads",
        "## Teachers",
        "## Logs and evaluation",
        "## Saving, loading, training on",
        "## Your own training loop",
        "## PEFT",
        "## Several GPUs",
    ):
        assert f"\n{heading}\n" in text, heading
    assert "(docs/transformers.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_page_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the page writes under out/
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a thread pool costs more than it gives
    namespace: dict = {"__name__": "transformers_doc"}
    try:
        for index, block in enumerate(python_blocks(DOC.read_text(encoding="utf-8"))):
            exec(compile(block, f"{DOC.name} (python block {index + 1})", "exec"), namespace)  # noqa: S102
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out

    # packed sequences: the counts the page prints
    assert "{'next': 22, 'mtp2': 20, 'mtp3': 18}" in printed
    # the distillation run: both teachers in every log, terms that sum to the logged loss
    logs = [entry for entry in namespace["trainer"].state.log_history if "loss" in entry]
    assert logs
    for entry in logs:
        terms = {key: value for key, value in entry.items() if key.startswith("lossgraph/")}
        assert terms["lossgraph/online/next"] > 0 and terms["lossgraph/offline/next"] > 0
        assert sum(terms.values()) == pytest.approx(entry["loss"], rel=1e-5)
    metrics = namespace["metrics"]
    evaluated = [value for key, value in metrics.items() if key.startswith("eval_lossgraph/")]
    assert len(evaluated) == 4 and sum(evaluated) == pytest.approx(metrics["eval_loss"], rel=1e-5)
    # the reloaded student has its deepseek heads and trained on
    student = namespace["student"]
    assert student.config.lossgraph_heads["style"] == "deepseek" and "mtp2" in student.lossgraph_heads
    assert "the model's own greedy decoding agrees with the first" in printed
    assert "have no module on the model: call attach_mtp_heads" in printed
