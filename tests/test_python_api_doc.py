"""docs/python-api.md runs: every ```python block is executed, in order, in one namespace."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "python-api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_doc_has_python_blocks():
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    assert any("optimizer.step()" in block and "losses" in block for block in blocks)


def test_doc_examples_run_and_loss_decreases(monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "python_api_doc"}
    for index, block in enumerate(python_blocks(DOC.read_text(encoding="utf-8"))):
        code = compile(block, f"{DOC.name} (python block {index + 1})", "exec")
        exec(code, namespace)  # noqa: S102 - the documentation's own examples
    losses = namespace["losses"]
    assert len(losses) >= 10
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    printed = capsys.readouterr().out
    assert "lm/next" in printed and "distill/next" in printed  # the loop logs out.terms
    assert "did you mean 'next'" in printed  # the errors block shows real messages
    assert "did you mean 'labels'" in printed
    # graph.tokens_per_head counts what the graph divides by
    ns = namespace
    full = ns["graph"](
        logits=ns["student"](ns["inputs"]),
        labels=ns["labels"],
        teachers={"teacher": ns["teacher"](ns["inputs"])["next"]},
        loss_mask=ns["loss_mask"],
        document_ids=ns["document_ids"],
    )
    counts = {head: int(count) for head, count in ns["num_items"].items()}
    assert counts == {head: int(metrics["tokens"]) for head, metrics in full.metrics.items()}
    assert counts["mtp2"] < counts["next"]
    # the Hugging Face form of the batch gives what the shifted one gives, and the wrong one is refused
    assert torch.equal(ns["unshifted"].loss, ns["shifted"].loss)
    assert "labels look unshifted" in printed
    assert namespace["out"].weights["distill/next"] == pytest.approx(0.5)
