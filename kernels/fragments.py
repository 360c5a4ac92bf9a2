"""The interface between the kernel generator and the kinds: what a term is in a kernel
(`KernelTerm`: a loss kind's `LossFragments` on a target at a temperature slot), what a loss kind
and a dense target form contribute to the kernel, and the generator as they see it (`TileWriter`).

The generator (`kernels/codegen.py` and its parts) owns the structure every kind shares: the row, the tile
loops, the softmax states, the targets' tile expressions and the gradient accumulation. A loss kind
owns the math of its own term and hands it to the generator through a `LossFragments` object; the
fragments of each built-in kind live in the kind's module under `lossgraph/kinds/`.

Every method receives a term-scoped writer `k` (a `TileWriter`: `k.q(slot)`, `k.log_q(slot)`,
`k.p(target, slot)`, `k.log_p(target, slot)`, `k.onehot()`, `k.log_mixture(...)`, `k.emit(...)`),
the term's index `t` and the `KernelTerm`; the kernel's shared variable names come from `names`.
Expressions are Triton source text. The names a fragment assigns (`k.emit`, `k.cached`) are the term's
locals, kept in its namespace by the generator, so they need no prefix; a name it reads must be in scope
at that stage (docs/architecture.md, "What a fragment may read, stage by stage"), and each expression it
returns lands as one operand, so it needs no parentheses (kernels/scope.py does both).

Notation: s = z / T (T the term's temperature), q = softmax(s), p the target at its own slot
(`KernelTerm.target_slot`: the teacher temperature where one is given, else T; a target is read with
`k.p(term.target, term.target_slot)`), and every gradient is dl/ds_j; the generator multiplies it by
the term's run-time weight (which carries the 1/T of ds/dz) and the row's scale.

A fragment says which of the shared row statistics it needs (`first_pass_statistics`); where its
value is known (after the first read, from row sums of a second read, or streamed in the last read);
its per-element gradient; and its value and gradient on the small vectors of a top-k teacher (the
stored tokens renormalized, or k buckets plus a tail bucket). Statistics cross vocab-parallel ranks
by the rule of their type (`layout.float_statistics`), never by name; a kind's row sums
are plain sums, added across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, Union


class FragmentError(ValueError):
    """A kind's fragment would miscompile its kernel: it reads a name that is not in scope, assigns a
    kernel variable, or returns what is not one expression. Raised at generation (kernels/scope.py); the
    message names the kind, the fragment method and the name. lossgraph turns it into a `KindError`."""


# Row statistics pass 1 can keep for a term, besides every softmax state (which always exist):
# MOMENT: sum_j exp(s_j - m)(s_j - m) of the student at the term's slot (entropy-like sums);
# CROSS_MOMENT: sum_j exp(s_j - m)(s_j - u_j) against the term's single dense teacher u (reverse KL).
MOMENT = "moment"
CROSS_MOMENT = "cross_moment"

# Where a term's value on a dense target is known (`LossFragments.value_stage`):
FIRST_READ = "first_read"  # from pass 1's statistics
ROW_SUMS = "row_sums"  # from row sums that a second read takes before the gradient's read
STREAMED = "streamed"  # summed over the columns in the last read, beside the gradient


class TileWriter(Protocol):
    """The generator as the fragments see it: its tile vocabulary. A loss kind's fragments get a
    term-scoped `scope.TermWriter`, a target form the generator's tile writer itself (`tiles.Tiles`). Each
    method returns the name of a variable of the current tile loop (written once, then reused), or an
    expression that is one operand."""

    def emit(self, *lines: str) -> None:
        """Write lines of source (statements) at the current indentation; the names they assign are the
        term's locals."""

    def cached(self, name: str, expression: str) -> str:
        """`name = expression` once per tile loop; returns `name` (a local of the term)."""

    def q(self, slot: int) -> str:
        """The student's q_j at the slot's temperature."""

    def log_q(self, slot: int) -> str:
        """log q_j, as (s_j - max) - log S (exact for huge logits)."""

    def log2_q(self, slot: int) -> str:
        """log2 q_j, the exponent q_j is computed from: cheaper than log q where a sum can be taken in
        bits (see `LossFragments.streams_in_bits`)."""

    def p(self, target: TargetFragments, slot: int) -> str:
        """The target's p_j (its form's expression)."""

    def log_p(self, target: TargetFragments, slot: int) -> str:
        """The target's log p_j."""

    def log2_p(self, target: TargetFragments, slot: int) -> str:
        """The target's log2 p_j."""

    def onehot(self) -> str:
        """True at the label's column."""

    def token_ids(self) -> str:
        """The global token ids of the tile's columns (`offs` is the column within the row's slice)."""

    def class_weight_tile(self, vector: int) -> str:
        """w_j of class-weight vector `vector` at the tile's columns (0 past the vocab)."""

    def label_class_weight(self, vector: int) -> str:
        """w_y, the label's class weight (per row)."""

    def class_weight_sum(self, vector: int) -> str:
        """W = sum_j w_j of the whole vector (per row, the same for every row)."""

    def scaled_label_logit(self, slot: int) -> str:
        """s_y, the label's logit at the slot's temperature."""

    def teacher_log_p(self, teacher: int, slot: int) -> str:
        """log p_j of a dense teacher at the slot."""

    def teacher_log2_p(self, teacher: int, slot: int) -> str:
        """log2 p_j of a dense teacher at the slot."""

    def log_mixture(self, beta: float, log_a: str, log_b: str) -> str:
        """An expression for log(beta a + (1 - beta) b) from log a and log b."""

    def constant_id(self, value: object) -> int:
        """A small number naming a constant of the spec in variable names."""


@dataclass(frozen=True)
class Vectors:
    """The names of a top-k term's small vectors: q, p and their logs over the stored tokens (or the
    stored buckets), and for a bucket term the tail bucket's scalars."""

    q: str
    p: str
    log_q: str
    log_p: str
    q_tail: str = ""
    p_tail: str = ""
    log_q_tail: str = ""
    log_p_tail: str = ""


@dataclass(frozen=True)
class BucketForm:
    """What a kind computes on k stored buckets plus one tail bucket (T = 1).

    value: the term's value. stored: q_i G'_i at the stored tokens, where G'_b = dl/dQ_b -
    sum_c Q_c dl/dQ_c (the scatter adds it after the last pass). tail_factor: G'_tail, so that every
    unstored token j gets q_j G'_tail; or "" when the kind writes its own tail gradient
    (`LossFragments.bucket_tail_gradient`)."""

    value: str
    stored: str
    tail_factor: str = ""


@dataclass(frozen=True)
class LinearGradient:
    """dl/ds_j as a sum of per-row scalars times tile vectors, for `LossFragments.gradient`.

    `parts` are (coefficient, vector) pairs: dl/ds_j = sum coefficient x vector_j. `at_label` is a
    coefficient added at the label's column only. The generator adds up the coefficients of one vector
    over every term of the launch (CE, forward KL and z-loss all share the student's q), so each
    distinct vector costs one multiply-add per element, and the label's part is paid on one tile only.
    """

    parts: tuple[tuple[str, str], ...]
    at_label: str | None = None


class PhasedRows(NamedTuple):
    """What a term's `row_input_values` reads, every row of the launch at once ([N] tensors; float32)."""

    logprob: Any  # log q of the row's label at the term's slot (from the combined statistics)
    student_entropy: Any  # the student's entropy at the term's slot; None unless the term keeps MOMENT
    weight: Any  # the row's scale in the term's group (0: the row takes no loss)
    target: tuple  # the tensors of the term's leaf (`LeafForm.tensors`)


class LossFragments:
    """Kernel code of one loss kind. Subclass it and override what the kind needs; the defaults
    describe a kind with no kernel form, so that a missing piece fails at generation with the kind's
    name instead of producing wrong code."""

    #: the kind's name, as written in `type:` (also the fragment's repr, part of a kernel's cache key)
    name: str = ""
    #: the kind reads the raw logits at temperature 1 only (its slot is the constant 1)
    fixed_temperature_one: bool = False
    #: `streamed_value` is in bits (written with log2_q / log2_p): the generator multiplies the row's
    #: sum by ln 2 once, instead of every summand converting its logarithms
    streams_in_bits: bool = False

    def __repr__(self) -> str:
        return self.name

    def formulas(self, term: KernelTerm) -> dict[str, str]:
        """The math the generated code computes, as comments beside it: keys "value", "gradient",
        "row sums", "vector" and "bucket" (each where the kind has that form)."""
        return {}

    # ----------------------------------------------------------------------------------------------
    # Dense targets (the whole row).
    # ----------------------------------------------------------------------------------------------

    def first_pass_statistics(self, term: KernelTerm) -> tuple[str, ...]:
        """Which of MOMENT, CROSS_MOMENT pass 1 keeps for this term."""
        return ()

    def row_inputs(self, term: KernelTerm) -> tuple[str, ...]:
        """Per-row inputs ([N] float32, read as `tl.load(names.row_input(t, name) + row)`) that depend on
        other rows (a sequence's ratio, a quantile over the batch): the runtime computes them on the
        device, with no host sync, from every row's statistics between the stats and the apply phase
        (`row_input_values`), so a launch with such a term runs in phases even on one rank."""
        return ()

    def row_input_values(self, term: KernelTerm, rows: PhasedRows) -> tuple:
        """The tensors of `row_inputs`, in order, from `rows` (torch ops on the device, no host sync)."""
        raise NotImplementedError(f"{self.name}: no row inputs")

    def value_stage(self, term: KernelTerm) -> str:
        """FIRST_READ, ROW_SUMS or STREAMED: where the term's value on a dense target is known."""
        raise NotImplementedError(f"{self.name}: no kernel form")

    def value_after_first_pass(self, k: TileWriter, t: int, term: KernelTerm) -> str:
        """FIRST_READ: the term's value from pass 1's statistics (emitting any lines it needs)."""
        raise NotImplementedError(f"{self.name}: no value after the first read")

    def row_sum_names(self, term: KernelTerm) -> tuple[str, ...]:
        """ROW_SUMS: the names of the row sums (each summed into `names.row_sum(name, t)`)."""
        return ()

    def row_sums(self, k: TileWriter, t: int, term: KernelTerm) -> tuple[str, ...]:
        """ROW_SUMS: the per-element summand of each row sum, in the order of `row_sum_names`."""
        raise NotImplementedError(f"{self.name}: no row sums")

    def value_from_row_sums(self, k: TileWriter, t: int, term: KernelTerm) -> str:
        """ROW_SUMS: the term's value from its row sums."""
        raise NotImplementedError(f"{self.name}: no value from row sums")

    def streamed_value(self, k: TileWriter, t: int, term: KernelTerm) -> str:
        """STREAMED: the per-element summand of the term's value, summed in the last read."""
        raise NotImplementedError(f"{self.name}: no streamed value")

    def gradient(self, k: TileWriter, t: int, term: KernelTerm) -> str | LinearGradient:
        """dl/ds_j at the tile's columns: an expression, or a `LinearGradient` where it is one."""
        raise NotImplementedError(f"{self.name}: no gradient on a dense target")

    # ----------------------------------------------------------------------------------------------
    # Row diagnostics: per-row quantities for the metrics, written beside the values in the same launch.
    # ----------------------------------------------------------------------------------------------

    def diagnostic_names(self, term: KernelTerm) -> tuple[str, ...]:
        """The per-row diagnostics the kernel writes for this term (names, in order); none by default,
        and a kernel whose terms declare none (or that is built without them, `KernelSpec.row_diagnostics`)
        is generated exactly as without this mechanism."""
        return ()

    def diagnostic_statistics(self, term: KernelTerm) -> tuple[str, ...]:
        """Which of MOMENT, CROSS_MOMENT pass 1 keeps for the row diagnostics only (not kept without them)."""
        return ()

    def row_diagnostics(self, k: TileWriter, t: int, term: KernelTerm) -> tuple[str, ...]:
        """The row's value of each of `diagnostic_names` from pass 1's statistics (as in
        `value_after_first_pass`; the statistics they read in `first_pass_statistics` or
        `diagnostic_statistics`)."""
        raise NotImplementedError(f"{self.name}: no row diagnostics")

    # ----------------------------------------------------------------------------------------------
    # Top-k targets (small vectors).
    # ----------------------------------------------------------------------------------------------

    def vector(self, k: TileWriter, t: int, term: KernelTerm, v: Vectors) -> tuple[str, str]:
        """(value, dl/ds_i) between two distributions over the k stored tokens (tail: renormalize)."""
        raise NotImplementedError(f"{self.name} takes no top-k target")

    def bucket(self, k: TileWriter, t: int, term: KernelTerm, v: Vectors) -> BucketForm:
        """The term on k stored buckets plus a tail bucket (tail: bucket)."""
        raise NotImplementedError(f"{self.name} takes no top-k target")

    def bucket_tail_gradient(self, k: TileWriter, t: int, term: KernelTerm, q: str, log_q: str) -> str:
        """q_j G'_tail at the tile's unstored columns, for kinds whose BucketForm has no tail_factor."""
        raise NotImplementedError(f"{self.name}: no bucket tail gradient")


class TargetFragments:
    """Kernel code of one dense target form (a source kind's distribution over the whole row): the
    tile's p and log p at a temperature slot. Subclasses are frozen dataclasses (hashable, with a
    stable repr: they are part of a kernel's cache key); each source kind's module defines its own.
    The top-k form (`signature.KTopK`) is not one of them: the generator handles it as small vectors."""

    #: the form reads the row's label (labels, smoothed labels, or a mixture holding them)
    reads_labels: bool = False

    def dense_teachers(self) -> tuple[int, ...]:
        """The dense teachers (indices into KernelSpec.dense) the form streams, with repeats."""
        return ()

    def class_weight_vectors(self) -> tuple[int, ...]:
        """The class-weight vectors (indices of the launch's `cw{c}_ptr`) the form reads."""
        return ()

    def single_teacher(self) -> int | None:
        """The dense teacher this form is exactly (its softmax at the slot), else None."""
        return None

    def label_smoothing(self) -> float | None:
        """epsilon where the form is the row's label smoothed, (1 - eps) one-hot + eps / V (0 for the
        one-hot label itself); None for any other distribution."""
        return None

    def kernel_arguments(self) -> tuple[str, ...]:
        """The kernel's arguments this form reads besides the shared ones (`row`, `offs`, `label_ptr`, the
        dense and top-k teachers'): a plugin form's pointers and strides, bound at launch by its leaf
        form's `kernel_tensors`."""
        return ()

    def kernel_argument_types(self) -> dict[str, str]:
        """The Triton types of `kernel_arguments` by name (`"*fp32"`, `"*i64"`, `"i32"`), for the sm_90
        report (`kernels/report.py`), which compiles a kernel without launching it; {}: not declared."""
        return {}

    def p(self, k: TileWriter, slot: int) -> str:
        """The tile's target probabilities at the slot's temperature."""
        raise NotImplementedError(f"{self!r} has no tile probabilities")

    def log_p(self, k: TileWriter, slot: int) -> str:
        """The tile's target log-probabilities (exact where p underflows)."""
        raise NotImplementedError(f"{self!r} has no tile log-probabilities")

    def log2_p(self, k: TileWriter, slot: int) -> str:
        """The tile's target log2-probabilities; by default log p times log2(e)."""
        return k.cached(f"l2p_{k.constant_id(self)}_{slot}", f"({self.log_p(k, slot)}) * LOG2E")


@dataclass(frozen=True)
class KTopK:
    """Top-k teacher `source` (an index into KernelSpec.topk) with its tail mode."""

    source: int
    tail: str  # "renormalize" | "bucket"

    # The capabilities loss kinds ask of any target (`TargetFragments`): a top-k teacher has none of them.
    def single_teacher(self) -> None:
        return None

    def label_smoothing(self) -> None:
        return None

    def class_weight_vectors(self) -> tuple[int, ...]:
        return ()


# A term's target in a kernel: a dense form (defined by its source kind's module) or top-k vectors.
KTarget = Union[TargetFragments, KTopK]


@dataclass(frozen=True)
class KernelTerm:
    """One term of a launch: a loss kind's fragments applied to a target at a temperature slot."""

    loss: LossFragments
    target: KTarget | None
    slot: int  # temperature slot; terms with equal temperatures share one student softmax
    constants: tuple[tuple[str, float], ...] = ()  # the kind's constants of the spec (jsd: beta)
    active: bool = True  # takes part in the gradient (its weight is not 0 at this step)
    teacher_slot: int | None = None  # slot of the target's teacher logits when not `slot` (teacher_temperature)

    @property
    def target_slot(self) -> int:
        """The slot the target is read at: p = softmax(teacher logits / T_teacher). Labels and smoothed
        labels ignore it (they have no temperature)."""
        return self.slot if self.teacher_slot is None else self.teacher_slot

    def describe(self) -> str:
        """One line for the generated kernel's header."""
        constants = "".join(f", {name} {value!r}" for name, value in self.constants)
        target = "no target" if self.target is None else f"target {self.target!r}"
        gradient = "" if self.active else ", value only"
        teacher = "" if self.teacher_slot is None else f", teacher slot {self.teacher_slot}"
        return f"{self.loss.name}, {target}, slot {self.slot}{teacher}{constants}{gradient}"
