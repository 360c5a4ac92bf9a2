"""Host side of the fused-head kernels: build (and cache) the generated kernel, choose tiles, launch.

Generated sources are written once per KernelSpec to a cache folder (`LOSSGRAPH_CACHE_DIR`, default
`~/.cache/lossgraph/kernels`) and imported from there: Triton reads a kernel's source through
`inspect`, so it must live in a real file. Writes go through a temporary file and an atomic rename,
so concurrent processes (data-parallel ranks) can share the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

from .codegen import generate, next_power_of_two
from .signature import KernelSpec

_MODULES: dict[str, ModuleType] = {}

# Widest vocab tile: tiles of the student and every teacher stream live in registers at once.
MAX_BLOCK_V = 4096
MIN_BLOCK_V = 128


def cache_dir() -> Path:
    root = os.environ.get("LOSSGRAPH_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "lossgraph" / "kernels"


def kernel_module(spec: KernelSpec) -> ModuleType:
    """The imported module of the generated kernel for `spec` (generated on first use)."""
    key = spec.key()
    module = _MODULES.get(key)
    if module is not None:
        return module
    source = generate(spec)
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    name = f"lossgraph_fused_{digest}"
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    if not path.exists() or path.read_text(encoding="utf-8") != source:
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".py.tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(source)
        os.replace(temporary, path)
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    loader_spec.loader.exec_module(module)
    _MODULES[key] = module
    return module


def block_size(vocab: int, streams: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocab and the number of N x V tensors streamed together.

    Wider tiles amortize the per-tile reductions; every extra stream (teacher) shares the registers,
    so the tile shrinks as streams are added.
    """
    widest = max(MIN_BLOCK_V, MAX_BLOCK_V // next_power_of_two(max(1, streams)))
    block = max(MIN_BLOCK_V, min(widest, next_power_of_two(vocab)))
    warps = 8 if block >= 2048 else 4
    return block, warps


def launch(
    spec: KernelSpec,
    *,
    logits: torch.Tensor,
    grad: torch.Tensor,
    row_scale: torch.Tensor,
    labels: torch.Tensor | None,
    dense: list[torch.Tensor],
    topk: list[tuple[torch.Tensor, torch.Tensor]],
    inverse_temperatures: list[float],
    weights: list[float],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Run one fused launch over the rows of `logits` [N, V]; the gradient goes into `grad` [N, V].

    Returns (per-row term values [N, terms] float32, student argmax [N], teacher argmaxes [N] each).
    `weights` has one entry per active term; `grad` may be `logits` itself (in-place).
    """
    rows, vocab = logits.shape
    device = logits.device
    values = torch.empty((rows, len(spec.terms)), dtype=torch.float32, device=device)
    prediction = torch.empty(rows, dtype=torch.int64, device=device)
    teacher_predictions = [torch.empty(rows, dtype=torch.int64, device=device) for _ in dense]
    block, warps = block_size(vocab, 1 + len(dense))
    arguments: list[object] = [logits, logits.stride(0), grad, grad.stride(0), values, prediction, row_scale]
    if spec.uses_labels:
        arguments.append(labels)
    for teacher, predicted in zip(dense, teacher_predictions):
        arguments += [teacher, teacher.stride(0), teacher.shape[1], predicted]
    for indices, logprobs in topk:
        arguments += [indices, indices.stride(0), logprobs, logprobs.stride(0)]
    arguments += [float(x) for x in inverse_temperatures]
    arguments += [float(x) for x in weights]
    arguments.append(vocab)
    if rows:
        kernel_module(spec).fused_head_kernel[(rows,)](*arguments, BLOCK_V=block, num_warps=warps)
    return values, prediction, teacher_predictions
