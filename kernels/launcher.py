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
from typing import NamedTuple

import torch

from .arguments import Call, Inputs, TermNumbers
from .codegen import KernelGenerator, next_power_of_two
from .interpreter_lock import launch_guard
from .signature import KernelSpec

_MODULES: dict[tuple[str, str], tuple[ModuleType, KernelGenerator]] = {}


class KernelCacheError(OSError):
    """The folder for generated kernels cannot be written (lossgraph turns this into a BackendError)."""


# Widest vocab tile: tiles of the student and every teacher stream live in registers at once.
MAX_BLOCK_V = 4096
MIN_BLOCK_V = 128


def cache_dir() -> Path:
    root = os.environ.get("LOSSGRAPH_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "lossgraph" / "kernels"


def kernel_module(spec: KernelSpec, phase: str = "single") -> ModuleType:
    """The imported module of the generated kernel for `spec` and `phase` (generated on first use)."""
    return _built(spec, phase)[0]


def layout(spec: KernelSpec, phase: str = "single") -> KernelGenerator:
    """The generator of a kernel, which knows its statistics layout (for vocab-parallel launches)."""
    return _built(spec, phase)[1]


def _built(spec: KernelSpec, phase: str) -> tuple[ModuleType, KernelGenerator]:
    key = (spec.key(), phase)
    built = _MODULES.get(key)
    if built is not None:
        return built
    generator = KernelGenerator(spec, phase)
    source = generator.source()
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    name = f"lossgraph_fused_{digest}"
    folder = cache_dir()
    path = folder / f"{name}.py"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != source:
            handle, temporary = tempfile.mkstemp(dir=folder, suffix=".py.tmp")
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(source)
            os.replace(temporary, path)
    except OSError as error:
        raise KernelCacheError(
            f"cannot write generated kernels to {folder} ({error.strerror}); point LOSSGRAPH_CACHE_DIR "
            "at a writable folder"
        ) from None
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    loader_spec.loader.exec_module(module)
    _MODULES[key] = (module, generator)
    return module, generator


class TileShape(NamedTuple):
    """How a launch walks a row: BLOCK_V columns per tile, the warps of a program, and VEC, the
    contiguous columns of one lane (one 16-byte load of the logits; see kernels/primitives.py)."""

    block: int
    warps: int
    vec: int


def tile_shape(vocab: int, streams: int, element_bytes: int) -> TileShape:
    """The tile for a vocab, the number of N x V tensors streamed together and the logits' element size.

    Every extra stream (teacher) shares the registers, so the tile shrinks as streams are added.
    """
    widest = max(MIN_BLOCK_V, MAX_BLOCK_V // next_power_of_two(max(1, streams)))
    block = max(MIN_BLOCK_V, min(widest, next_power_of_two(vocab)))
    warps = 8 if block >= 2048 else 4
    return TileShape(block, warps, min(block, 16 // element_bytes))


def _run(spec: KernelSpec, phase: str, call: Call) -> None:
    rows, vocab = call.inputs.logits.shape
    if rows:
        tile = tile_shape(vocab, spec.tile_streams, call.inputs.logits.element_size())
        module, generator = _built(spec, phase)
        kernel = module.fused_head_kernel
        with launch_guard(kernel):
            kernel[(rows,)](**generator.signature.bind(call, tile.block, tile.vec), num_warps=tile.warps)


def launch(
    spec: KernelSpec, inputs: Inputs, *, grad: torch.Tensor | None, numbers: TermNumbers
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run one fused launch over the rows of `inputs.logits` [N, V]; the gradient goes into `grad`.

    Returns (per-row values [N, spec.value_columns] float32: each term's value times its value scale, the
    row's weighted loss, then the row diagnostics; student argmax [N]; teacher argmaxes [teachers, N]).
    `grad` may be the logits themselves (in-place). A spec with `gradient=False` takes no `grad` (None)
    and ignores `numbers.gradient`.
    """
    rows = inputs.logits.shape[0]
    device = inputs.logits.device
    call = Call(
        inputs,
        numbers,
        grad,
        values=torch.empty((rows, spec.value_columns), dtype=torch.float32, device=device),
        prediction=torch.empty(rows, dtype=torch.int64, device=device),
        teacher_predictions=torch.empty((len(spec.dense), rows), dtype=torch.int64, device=device),
    )
    _run(spec, "single", call)
    return call.values, call.prediction, call.teacher_predictions


class SliceStatistics(NamedTuple):
    """What the vocab-parallel "stats" phase writes per row (see KernelGenerator.float_stats)."""

    floats: torch.Tensor  # [N, float statistics], float64
    ints: torch.Tensor  # [N, int statistics]: argmax indices (global ids)
    topk_logits: list[torch.Tensor]  # [N, k rounded up to a power of two] per top-k source


def launch_stats(spec: KernelSpec, inputs: Inputs, *, vocab_start: int, vocab_total: int) -> SliceStatistics:
    """Vocab parallel, phase 1: this rank's statistics of every row."""
    generator = layout(spec, "stats")
    rows, device = inputs.logits.shape[0], inputs.logits.device
    statistics = SliceStatistics(
        torch.empty((rows, len(generator.float_stats())), dtype=torch.float64, device=device),
        torch.empty((rows, len(generator.int_stats())), dtype=torch.int64, device=device),
        [
            torch.empty((rows, generator.topk_width(i)), dtype=torch.float32, device=device)
            for i in range(len(spec.topk))
        ],
    )
    floats, ints, topk_logits = statistics
    call = Call(
        inputs, floats=floats, ints=ints, topk_logits=topk_logits, vocab_start=vocab_start, vocab_total=vocab_total
    )
    _run(spec, "stats", call)
    return statistics


def launch_reduce(
    spec: KernelSpec, inputs: Inputs, floats: torch.Tensor, *, vocab_start: int, vocab_total: int
) -> torch.Tensor:
    """Vocab parallel, phase 2: this rank's share of the row sums of jsd / tvd / reverse KL terms."""
    generator = layout(spec, "reduce")
    partial = torch.empty(
        (inputs.logits.shape[0], len(generator.reduction_stats())), dtype=torch.float32, device=inputs.logits.device
    )
    call = Call(inputs, floats=floats, reductions=partial, vocab_start=vocab_start, vocab_total=vocab_total)
    _run(spec, "reduce", call)
    return partial


def launch_apply(
    spec: KernelSpec,
    inputs: Inputs,
    *,
    grad: torch.Tensor | None,
    numbers: TermNumbers,
    floats: torch.Tensor,
    topk_logits: list[torch.Tensor],
    reductions: torch.Tensor | None,
    vocab_start: int,
    vocab_total: int,
) -> torch.Tensor:
    """Vocab parallel, last phase: values [N, spec.value_columns] as `launch` gives them (streamed ones, and
    so the row's loss, partial) and the local gradient."""
    values = torch.empty((inputs.logits.shape[0], spec.value_columns), dtype=torch.float32, device=inputs.logits.device)
    call = Call(
        inputs,
        numbers,
        grad,
        values,
        floats=floats,
        topk_logits=topk_logits,
        reductions=reductions,
        vocab_start=vocab_start,
        vocab_total=vocab_total,
    )
    _run(spec, "apply", call)
    return values
