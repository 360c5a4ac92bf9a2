"""Shared test helpers: a verbose allclose, per-dtype tolerances and random inputs."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

# Tolerances for comparing against the float64 reference, by the dtype of the tensor under test.
# Losses and gradients are computed in float32 inside the kernels; the low-precision rows cover the
# rounding of the logits dtype (the gradient is returned in it).
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-11},
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
    torch.float16: {"rtol": 5e-3, "atol": 5e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-4},
}


def assert_close(actual, expected, *, dtype: torch.dtype | None = None, rtol=None, atol=None, what: str = "") -> None:
    """torch.allclose with a report of where and by how much the values differ.

    Tolerances come from TOLERANCES for `dtype` (default: the dtype of `actual`) unless given.
    NaN matches only NaN and infinities only the same infinity.
    """
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    tolerance = TOLERANCES[dtype or actual.dtype]
    rtol = tolerance["rtol"] if rtol is None else rtol
    atol = tolerance["atol"] if atol is None else atol
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    same_special = (a.isnan() & e.isnan()) | (a.isinf() & e.isinf() & (a.sign() == e.sign()))
    finite = a.isfinite() & e.isfinite()
    close = torch.zeros_like(a, dtype=torch.bool)
    close[finite] = (a[finite] - e[finite]).abs() <= atol + rtol * e[finite].abs()
    bad = ~(close | same_special)
    if not bool(bad.any()):
        return
    error = torch.where(finite, (a - e).abs(), torch.full_like(a, math.inf))
    error[~bad] = -1.0
    worst = torch.topk(error.reshape(-1), min(5, int(bad.sum()))).indices
    rows = []
    for flat in worst.tolist():
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        rows.append(f"  at {index}: got {a.reshape(-1)[flat]:.10g}, expected {e.reshape(-1)[flat]:.10g}")
    finite_bad = bad & finite
    max_abs = float((a - e).abs()[finite_bad].max()) if bool(finite_bad.any()) else math.nan
    raise AssertionError(
        f"{what or 'values'} differ at {int(bad.sum())} of {a.numel()} elements "
        f"(rtol={rtol}, atol={atol}, max abs error {max_abs:.3g}); worst:\n" + "\n".join(rows)
    )


def random_logits(*shape: int, scale: float = 3.0, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Logits with a realistic spread (N(0, scale^2)), reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def random_labels(*shape: int, vocab: int, ignore_fraction: float = 0.2, seed: int = 1) -> torch.Tensor:
    """Labels in [0, vocab) with about `ignore_fraction` of them set to -100."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=generator)
    ignored = torch.rand(shape, generator=generator) < ignore_fraction
    return torch.where(ignored, torch.full_like(labels, -100), labels)


def random_topk(*lead: int, vocab: int, k: int, seed: int = 2, mass: float = 0.9):
    """Top-k indices (distinct per position) and log-probs whose mass sums to `mass`."""
    from lossgraph import TopK

    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(*lead, vocab, generator=generator)
    indices = scores.topk(k, dim=-1).indices
    probs = torch.softmax(torch.randn(*lead, k, generator=generator, dtype=torch.float64) * 2, dim=-1) * mass
    return TopK(indices, probs.log().to(torch.float32))


def run_compiler_script(arguments: list[str | Path], out: Path) -> dict:
    """Run a Python script (`arguments`: its path and arguments, one of them writing JSON to `out`) in
    a child process without TRITON_INTERPRET (interpreted kernels cannot be compiled for a GPU) and
    return the JSON it wrote."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, *[str(argument) for argument in arguments]],
        cwd=Path(__file__).resolve().parent.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the MASTER_PORT of a process group the test spawns."""
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def assert_ranks_match(folder: Path, world: int, loss: torch.Tensor, grad: torch.Tensor) -> list[dict]:
    """Each vocab-parallel rank's saved result (`folder/rank{r}.pt`: its `loss` and its columns' `grad`)
    against one process's loss and gradient; returns the ranks' results for further checks."""
    width = grad.shape[-1] // world
    results = []
    for rank in range(world):
        got = torch.load(Path(folder) / f"rank{rank}.pt")
        assert_close(got["loss"], loss, rtol=1e-5, atol=1e-6, what=f"rank {rank} loss")
        local = grad[..., rank * width : (rank + 1) * width]
        assert_close(got["grad"], local, rtol=1e-5, atol=1e-7, what=f"rank {rank} gradient")
        results.append(got)
    return results
