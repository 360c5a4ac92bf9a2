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

from . import names
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


class Inputs(NamedTuple):
    """What every phase of a fused launch reads."""

    logits: torch.Tensor  # [N, V] (this rank's columns under vocab parallel), unit stride on V
    row_scale: torch.Tensor  # [N] float32: mask / normalizer
    labels: torch.Tensor | None  # [N] int64 global ids
    dense: list[torch.Tensor]  # dense teachers [N, V_teacher], unit stride
    topk: list[tuple[torch.Tensor, torch.Tensor]]  # (indices [N, k], log-probs [N, k])
    inverse_temperatures: list[float]
    # per class-weight vector of the spec (`cw{c}_ptr`): the [V_total] float32 weights and their 0-d sum
    class_weights: list[tuple[torch.Tensor, torch.Tensor]] = []


def _arguments(spec: KernelSpec, inputs: Inputs) -> dict[str, object]:
    logits = inputs.logits
    arguments: dict[str, object] = {
        "z_ptr": logits,
        "stride_z": logits.stride(0),
        "row_scale_ptr": inputs.row_scale,
        "V": logits.shape[1],
    }
    if spec.uses_labels:
        arguments["label_ptr"] = inputs.labels
    for c, (weights, total) in enumerate(inputs.class_weights):
        arguments.update({f"cw{c}_ptr": weights, f"cw_sum{c}_ptr": total})
    for i, teacher in enumerate(inputs.dense):
        arguments.update({f"t{i}_ptr": teacher, f"stride_t{i}": teacher.stride(0), f"vocab_t{i}": teacher.shape[1]})
    for i, (indices, logprobs) in enumerate(inputs.topk):
        arguments.update(
            {
                f"k{i}_index_ptr": indices,
                f"stride_k{i}_index": indices.stride(0),
                f"k{i}_logp_ptr": logprobs,
                f"stride_k{i}_logp": logprobs.stride(0),
            }
        )
    arguments.update({names.inverse_temperature(s): float(x) for s, x in enumerate(inputs.inverse_temperatures)})
    return arguments


class TermNumbers(NamedTuple):
    """The run-time numbers of a launch's terms (each a list over the launch's terms, in order)."""

    gradient: list[float]  # per active term only: weight x head weight x scale / T, what multiplies dl/ds
    value_scale: list[float]  # what each term's per-row value is reported times (T^2 where asked, else 1)
    loss: list[float]  # each term's weight in the head's loss; 0 leaves it out, even when not finite


def _term_arguments(spec: KernelSpec, grad: torch.Tensor | None, numbers: TermNumbers) -> dict[str, object]:
    """The gradient buffer and each active term's weight (none of them when the spec writes no
    gradient), and every term's value scale and loss weight."""
    arguments: dict[str, object] = {names.value_scale(t): float(v) for t, v in enumerate(numbers.value_scale)}
    arguments.update({names.loss_weight(t): float(w) for t, w in enumerate(numbers.loss)})
    if not spec.gradient:
        return arguments
    if grad is None:
        raise ValueError("a kernel that writes the gradient needs a gradient buffer")
    active = [t for t, term in enumerate(spec.terms) if term.active]
    arguments.update({names.weight(t): float(w) for t, w in zip(active, numbers.gradient)})
    return {"grad_ptr": grad, "stride_grad": grad.stride(0), **arguments}


def _run(spec: KernelSpec, phase: str, inputs: Inputs, arguments: dict[str, object]) -> None:
    rows, vocab = inputs.logits.shape
    if rows:
        tile = tile_shape(vocab, spec.tile_streams, inputs.logits.element_size())
        kernel = kernel_module(spec, phase).fused_head_kernel
        with launch_guard(kernel):
            kernel[(rows,)](**arguments, BLOCK_V=tile.block, VEC=tile.vec, num_warps=tile.warps)


def launch(
    spec: KernelSpec, inputs: Inputs, *, grad: torch.Tensor | None, numbers: TermNumbers
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run one fused launch over the rows of `inputs.logits` [N, V]; the gradient goes into `grad`.

    Returns (per-row values [N, terms + 1] float32: each term's value times its value scale, then the
    row's weighted loss; student argmax [N]; teacher argmaxes [teachers, N]). `grad` may be the logits
    themselves (in-place). A spec with `gradient=False` takes no `grad` (None) and ignores
    `numbers.gradient`.
    """
    rows = inputs.logits.shape[0]
    device = inputs.logits.device
    values = torch.empty((rows, len(spec.terms) + 1), dtype=torch.float32, device=device)
    prediction = torch.empty(rows, dtype=torch.int64, device=device)
    teacher_predictions = torch.empty((len(inputs.dense), rows), dtype=torch.int64, device=device)
    arguments = _arguments(spec, inputs)
    arguments.update({"loss_ptr": values, "pred_ptr": prediction})
    arguments.update({f"tpred{i}_ptr": teacher_predictions[i] for i in range(len(inputs.dense))})
    arguments.update(_term_arguments(spec, grad, numbers))
    _run(spec, "single", inputs, arguments)
    return values, prediction, teacher_predictions


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
    arguments = _arguments(spec, inputs)
    arguments.update({"statf_ptr": statistics.floats, "stati_ptr": statistics.ints})
    arguments.update({f"topz{i}_ptr": z for i, z in enumerate(statistics.topk_logits)})
    arguments.update({"vocab_start": vocab_start, "V_total": vocab_total})
    _run(spec, "stats", inputs, arguments)
    return statistics


def launch_reduce(
    spec: KernelSpec, inputs: Inputs, floats: torch.Tensor, *, vocab_start: int, vocab_total: int
) -> torch.Tensor:
    """Vocab parallel, phase 2: this rank's share of the row sums of jsd / tvd / reverse KL terms."""
    generator = layout(spec, "reduce")
    partial = torch.empty(
        (inputs.logits.shape[0], len(generator.reduction_stats())), dtype=torch.float32, device=inputs.logits.device
    )
    arguments = _arguments(spec, inputs)
    arguments.update({"statf_ptr": floats, "red_ptr": partial, "vocab_start": vocab_start, "V_total": vocab_total})
    _run(spec, "reduce", inputs, arguments)
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
    """Vocab parallel, last phase: values [N, terms + 1] as `launch` gives them (streamed ones, and so the
    row's loss, partial) and the local gradient."""
    values = torch.empty(
        (inputs.logits.shape[0], len(spec.terms) + 1), dtype=torch.float32, device=inputs.logits.device
    )
    arguments = _arguments(spec, inputs)
    arguments.update({"loss_ptr": values, "statf_ptr": floats})
    arguments.update({f"topz{i}_ptr": z for i, z in enumerate(topk_logits)})
    if reductions is not None:
        arguments["red_ptr"] = reductions
    arguments.update({"vocab_start": vocab_start, "V_total": vocab_total})
    arguments.update(_term_arguments(spec, grad, numbers))
    _run(spec, "apply", inputs, arguments)
    return values
