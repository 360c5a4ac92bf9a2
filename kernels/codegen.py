"""Generates the Triton source of one fused-head kernel from a `KernelSpec`.

One program handles one row (one token position) of the head's logits and streams its vocabulary in
tiles of BLOCK_V:

  pass 1     online max and sum-exp for every softmax the terms need (the student at each temperature
             slot, each dense teacher at each slot it is used at), the student's and teachers' argmax,
             and the running sums some terms can take in the same read (entropy, reverse KL against
             one teacher).
  (top-k)    the stored top-k entries are gathered; their terms are small vectors computed at once.
  pass 2     only when a term needs a row sum that involves p and q at once before any gradient
             element is known (jsd, tvd, reverse KL against a mixture): those sums.
  last pass  every term's remaining value and the summed gradient, written once in the logits dtype;
             then the sparse top-k gradient entries are added.

Notation in the comments: for the term's temperature T, s = z / T, q = softmax(s), p the target at T,
g_j = dl/dz_j. Every gradient below is dl/ds_j; the generated code multiplies it by the run-time
weight w = weight x head_weight x (T^2 if temperature_scaling) / T, which also carries the 1/T of
ds/dz, and finally by the row's scale (mask / normalizer).

This module assembles the kernel (its header, `def` and row prologue); the parts live by job:
kernels/tiles.py (the tile vocabulary the row programs and the kinds' fragments write with),
kernels/rows.py (one row program per phase), kernels/reads.py (passes 1, 2 and the last),
kernels/topk.py (the top-k vectors) and kernels/layout.py (what each phase keeps and hands on).
"""

from __future__ import annotations

import io
import tokenize

from . import names
from .arguments import kernel_signature
from .layout import (
    effective,
    float_statistics,
    int_statistics,
    kernel_layout,
    next_power_of_two,
    reduction_statistics,
    topk_width,
)
from .rows import masked_row, row_program
from .signature import KernelSpec, KTopK
from .tiles import Tiles

__all__ = ["PHASES", "PRIMITIVES", "KernelGenerator", "generate", "next_power_of_two", "primitive_imports"]

PHASES = ("single", "stats", "reduce", "apply")

# the building blocks (kernels/primitives.py) a generated module may import; it imports those it uses
PRIMITIVES = (
    "LN2",
    "LOG2E",
    "fast_exp",
    "lane_argmax_update",
    "lane_centered_moment",
    "lane_max",
    "lane_softmax_update",
    "lane_sum",
    "lane_weights",
    "lanes_of",
    "log_add_exp",
    "log_sum_exp",
    "round_to",
    "row_argmax",
    "row_centered_moment",
    "sign_of_difference",
    "soft_cap",
)


def primitive_imports(code: str) -> list[str]:
    """The import of the primitives `code` names (in code, not in comments), in PRIMITIVES order."""
    used = {
        token.string for token in tokenize.generate_tokens(io.StringIO(code).readline) if token.type == tokenize.NAME
    }
    names = [name for name in PRIMITIVES if name in used]
    if not names:
        return []
    return ["from lossgraph.kernels.primitives import (", *[f"    {name}," for name in names], ")"]


class KernelGenerator:
    """Writes the kernel for one KernelSpec and phase (PHASES; kernels/rows.py says what each phase
    computes). `source()` returns the module text; `float_stats()` and the like say what the
    vocab-parallel phases hand each other (kernels/layout.py)."""

    def __init__(self, spec: KernelSpec, phase: str = "single"):
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        spec = effective(spec)
        self.spec = spec
        self.phase = phase
        self.layout = kernel_layout(spec)
        self.signature = kernel_signature(spec, phase)
        for term in spec.terms:
            if term.loss.fixed_temperature_one and not spec.slot_is_one[term.slot]:
                raise ValueError(f"{term.loss.name} needs a temperature slot fixed at 1")
            bucket = isinstance(term.target, KTopK) and term.target.tail == "bucket"
            if bucket and not (spec.slot_is_one[term.slot] and spec.slot_is_one[term.target_slot]):
                raise ValueError("a top-k term with tail 'bucket' needs a temperature slot fixed at 1")

    @property
    def sliced(self) -> bool:
        """The row is one rank's slice of the vocab (every phase but "single")."""
        return self.phase != "single"

    # ----------------------------------------------------------------------------------------------
    # Arguments.
    # ----------------------------------------------------------------------------------------------

    def arguments(self) -> list[str]:
        """The kernel's parameters, as its `def` lists them (kernels/arguments.py spells them)."""
        return self.signature.definition()

    # ----------------------------------------------------------------------------------------------
    # What crosses ranks under vocab parallel (kernels/layout.py): the statistics buffers' layout.
    # ----------------------------------------------------------------------------------------------

    def float_stats(self) -> list[tuple[str, str, tuple]]:
        return float_statistics(self.spec, self.layout)

    def int_stats(self) -> list[str]:
        return int_statistics(self.spec)

    def reduction_stats(self) -> list[str]:
        return reduction_statistics(self.spec, self.layout)

    def topk_width(self, i: int) -> int:
        return topk_width(self.spec, i)

    # ----------------------------------------------------------------------------------------------
    # The kernel.
    # ----------------------------------------------------------------------------------------------

    def source(self) -> str:
        k = Tiles(self.spec, self.phase, self.layout, primitives=PRIMITIVES)
        src = k.src
        src(*self.header(), "import triton", "import triton.language as tl", "")
        imports_at = len(src.lines)  # the primitives the body uses are imported here once it is written
        src(
            "",
            "",
            "@triton.jit",
        )
        with src.block("def fused_head_kernel("):
            for argument in self.arguments():
                src(f"{argument},")
        src("):")
        src.depth += 1
        skip = self.row_prologue(k)
        with src.block(f"if {skip}:"):
            masked_row(k)
        with src.block("else:"):
            row_program(k)
        src.depth -= 1
        imports = primitive_imports("\n".join(src.lines[imports_at:]))
        src.lines[imports_at - 1 : imports_at] = ["", *imports] if imports else []
        return src.text()

    def header(self) -> list[str]:
        """The comment the module opens with: what it computes and the notation of its comments."""
        return [
            f"# Generated by lossgraph.kernels.codegen (phase {self.phase}); one program per row.",
            *[f"#   {line}" for line in self.spec.describe()],
            f"#   reads of the row: {self.layout.passes}",
            "# Notation: s = z / T at the term's slot, q = softmax(s), p the target at T; each term's",
            "# gradient is dl/ds_j, times its grad_weight (weight x head weight x T^2 if scaled / T x row scale).",
        ]

    def row_prologue(self, k: Tiles) -> str:
        """The row's scales and pointers, for every row; returns the condition of a row without loss."""
        k.emit("row = tl.program_id(0).to(tl.int64)")
        if self.spec.grouped:
            # each term group's row scale (its positions' weight / its normalizer), row_scale [N, groups]
            groups = self.spec.row_groups
            k.emit(*[f"{names.row_scale(g)} = tl.load(row_scale_ptr + row * {groups} + {g})" for g in range(groups)])
            skip = " & ".join(f"({names.row_scale(g)} == 0.0)" for g in range(groups))
        else:
            k.emit(f"{names.row_scale()} = tl.load(row_scale_ptr + row)")
            skip = f"{names.row_scale()} == 0.0"
        k.emit(
            "z_row = z_ptr + row * stride_z",
            "cols = tl.arange(0, BLOCK_V)",
            "tiles = tl.cdiv(V, BLOCK_V)",
            "VT = V_total" if self.sliced else "VT = V",
            f"{names.VOCAB_FLOAT} = VT.to(tl.float32)",
        )
        if self.phase in ("single", "apply") and self.spec.gradient:
            k.emit(f"{names.GRAD_ROW} = grad_ptr + row * stride_grad")
        for i in range(len(self.spec.dense)):
            k.emit(f"{names.teacher_row(i)} = t{i}_ptr + row * stride_t{i}")
        return skip


def generate(spec: KernelSpec) -> str:
    """Triton source of the fused kernel for `spec` (a module defining `fused_head_kernel`)."""
    return KernelGenerator(spec).source()
