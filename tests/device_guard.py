"""A guard that keeps the fused tests honest about devices (a pytest plugin; tests/conftest.py uses it).

Where CUDA is available, the fused backend must be tested where it runs in production: on the GPU. A
test that builds CPU tensors for `backend="triton"` would then either fail with a BackendError (no
interpreter) or, worse, pass through Triton's CPU interpreter (TRITON_INTERPRET=1) and test nothing of
the GPU. The guard checks every tensor that reaches the fused launches (the op boundary,
`lossgraph.runtime.fused._run_launches`) and fails the test that handed over a CPU tensor.

Tests of the interpreter path itself carry `@pytest.mark.interpreter` and are left alone. Without
CUDA the guard does nothing: the CPU is then where the fused tests run.
"""

from __future__ import annotations

import pytest


def _tensors(value, name: str):
    import torch

    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{name}[{index}]")


def stray_cpu_tensors(arguments: dict[str, object]) -> list[str]:
    """Names of the CPU tensors among the fused launches' tensor arguments."""
    return [
        f"{name} {tuple(tensor.shape)}"
        for key, value in arguments.items()
        for name, tensor in _tensors(value, key)
        if tensor.device.type != "cuda"
    ]


@pytest.fixture(autouse=True)
def fused_tensors_on_cuda(request, monkeypatch):
    """Fails a test that hands CPU tensors to the fused kernels while CUDA is available."""
    import torch  # here, not at the top: conftest imports this module, and light tests never need torch

    if not torch.cuda.is_available() or request.node.get_closest_marker("interpreter"):
        yield
        return
    import lossgraph.runtime.fused as fused

    original = fused._run_launches
    found: list[str] = []

    def guarded(key, logits, grad, arguments, numbers, shard=None):
        stray = stray_cpu_tensors({"logits": logits, "grad": grad, **arguments._asdict()})
        if stray:
            message = (
                f"backend='triton' got CPU tensors ({', '.join(stray)}) while CUDA is available: build the "
                "fused tests' inputs on fused_cases.DEVICE (or mark a test of the interpreter path itself "
                "with @pytest.mark.interpreter)"
            )
            found.append(message)
            raise AssertionError(message)
        return original(key, logits, grad, arguments, numbers, shard)

    monkeypatch.setattr(fused, "_run_launches", guarded)
    yield
    if found:  # also when the test caught the AssertionError itself
        pytest.fail(found[0], pytrace=False)
