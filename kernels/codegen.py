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
"""

from __future__ import annotations

import io
import math
import tokenize
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from . import names
from .arguments import kernel_signature
from .fragments import FIRST_READ, STREAMED, LinearGradient, TargetFragments, Vectors
from .layout import effective, kernel_layout
from .scope import term_scopes
from .signature import KernelSpec, KernelTerm, KTopK, dense_teachers

NEG_INF = 'float("-inf")'


class _Source:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, *lines: str) -> None:
        for line in lines:
            self.lines.append(("    " * self.depth + line) if line else "")

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        self(header)
        self.depth += 1
        yield
        self.depth -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


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
    """Writes the kernel for one KernelSpec and phase. `source()` returns the module text.

    phase "single" is the whole algorithm in one launch. Under vocab parallel each rank holds a slice
    of the vocab, and the algorithm is cut where statistics must be combined across ranks: "stats"
    (pass 1 and the gathers, written out), "reduce" (pass 2's partial sums, when a term needs them)
    and "apply" (the last pass, from the combined statistics). Column j of a slice is global token id
    vocab_start + j; V is the slice's width and VT the whole vocab's.
    """

    def __init__(self, spec: KernelSpec, phase: str = "single"):
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        spec = effective(spec)
        self.spec = spec
        self.phase = phase
        self.sliced = phase != "single"
        self.layout = kernel_layout(spec)
        self.signature = kernel_signature(spec, phase)
        for term in spec.terms:
            if term.loss.fixed_temperature_one and not spec.slot_is_one[term.slot]:
                raise ValueError(f"{term.loss.name} needs a temperature slot fixed at 1")
            bucket = isinstance(term.target, KTopK) and term.target.tail == "bucket"
            if bucket and not (spec.slot_is_one[term.slot] and spec.slot_is_one[term.target_slot]):
                raise ValueError("a top-k term with tail 'bucket' needs a temperature slot fixed at 1")
        self.src = _Source()
        self._tile_cache: dict[str, str] = {}
        self._reads = 0  # tile loops written so far (each read of the row is one)
        self._reads_label = False  # the tile body being written called onehot()
        self._label_elsewhere = False  # ... and is the copy for tiles without the label (tile_body)
        self._tail_factors: set[int] = set()  # bucket terms whose tail gradient is q_j * gt{t}
        self.term_scopes = term_scopes(self, PRIMITIVES)  # each term's fragments, checked and namespaced

    def capped(self, logits: str) -> str:
        """The logits as the terms see them: times the head's scale a, then soft-capped, when the head
        scales or caps them. dz'/dz carries a factor a, which the row's grad_scale holds."""
        scale, cap = self.spec.logits_scale, self.spec.softcap
        if scale is not None:
            logits = f"{logits} * {scale!r}"
        return logits if cap is None else f"soft_cap({logits}, {cap!r})"

    @property
    def transformed(self) -> bool:
        """The terms see other logits than the raw ones (a scale or a cap)."""
        return self.spec.softcap is not None or self.spec.logits_scale is not None

    def cap_derivative(self, capped: str) -> str:
        """dz'/dz = 1 - (z' / c)^2 at a capped logit z' (0 at -inf, where there is no gradient)."""
        inverse = repr(1.0 / self.spec.softcap)
        return f"tl.where({capped} > {NEG_INF}, 1.0 - ({capped} * {inverse}) * ({capped} * {inverse}), 0.0)"

    def cap_factor(self, capped: str) -> str:
        """` * dz'/dz` when the head caps its logits, else nothing."""
        return "" if self.spec.softcap is None else f" * {self.cap_derivative(capped)}"

    def emit(self, *lines: str) -> None:
        """Write lines of source at the current indentation (for the kinds' fragments)."""
        self.src(*lines)

    def comment(self, text: str) -> None:
        self.src(f"# {text}")

    # ----------------------------------------------------------------------------------------------
    # Arguments.
    # ----------------------------------------------------------------------------------------------

    def arguments(self) -> list[str]:
        """The kernel's parameters, as its `def` lists them (kernels/arguments.py spells them)."""
        return self.signature.definition()

    # ----------------------------------------------------------------------------------------------
    # What crosses ranks under vocab parallel: the layout of the statistics buffers.
    # ----------------------------------------------------------------------------------------------

    def float_stats(self) -> list[tuple[str, str, tuple]]:
        """(variable, how ranks combine it, the softmax state it belongs to) for each float statistic.

        max: all-reduce max; sum_exp: the state's sum of exp(x - max), rescaled to the global max and
        summed; scaled: another sum taken against the state's local max, combined the same way;
        moment: the centered moment (re-centered on the global max, summed); sum: summed as is (the
        label's logit, written by the rank holding it); argmax: the max of a running argmax (its index
        is in the int buffer, same order).
        """
        entries: list[tuple[str, str, tuple]] = []
        for s in self.layout.student_slots:
            entries += [(f"m_s{s}", "max", ("s", s)), (f"sum_s{s}", "sum_exp", ("s", s))]
        entries += [(names.moment(s), "moment", ("s", s)) for s in self.layout.moment_slots]
        for i in self.layout.tail_sources:
            entries += [(f"tail_m{i}", "max", ("tail", i)), (f"tail_sum{i}", "sum_exp", ("tail", i))]
        entries += [(names.cross_moment(s, i, u), "scaled", ("s", s)) for s, i, u in self.layout.cross_moments]
        for i, s in self.layout.teacher_states:
            entries += [(f"m_t{i}_{s}", "max", ("t", i, s)), (f"sum_t{i}_{s}", "sum_exp", ("t", i, s))]
        entries.append(("best_value", "argmax", ()))
        entries += [(f"best_value_t{i}", "argmax", ()) for i in range(len(self.spec.dense))]
        if self.spec.uses_labels:
            entries.append(("z_label", "sum", ()))
        return entries

    def int_stats(self) -> list[str]:
        return ["best_index", *[f"best_index_t{i}" for i in range(len(self.spec.dense))]]

    def reduction_stats(self) -> list[str]:
        """The row sums pass 2 takes (summed across ranks under vocab parallel)."""
        return [
            names.row_sum(name, t)
            for t in self.layout.reduction_terms
            for name in self.spec.terms[t].loss.row_sum_names(self.spec.terms[t])
        ]

    def topk_width(self, i: int) -> int:
        return next_power_of_two(self.spec.topk[i])

    # ----------------------------------------------------------------------------------------------
    # Tile expressions (cached per loop body).
    # ----------------------------------------------------------------------------------------------

    def open_lanes(self, names: list[str]) -> None:
        """Before a tile loop: a per-lane vector `<name>_lanes` for each row sum the loop adds to, so
        that the loop needs no block reduction for them (see kernels/primitives.py on lanes)."""
        for name in names:
            self.src(f"{name}_lanes = tl.zeros([BLOCK_V // VEC], dtype=tl.float32)")

    def add_to_lanes(self, name: str, summand: str) -> None:
        """In a tile loop: add a tile's summands to the row sum `name`, per lane."""
        self.src(f"{name}_lanes += lane_sum({summand}, VEC)")

    def close_lanes(self, names: list[str], operator: str) -> None:
        """After the loop: each sum's lanes reduced once, assigned (`=`) or added (`+=`) to `<name>`."""
        for name in names:
            self.src(f"{name} {operator} tl.sum({name}_lanes, 0)")

    def cached(self, name: str, expression: str) -> str:
        if name not in self._tile_cache:
            self.src(f"{name} = {expression}")
            self._tile_cache[name] = expression
        return name

    def scaled_student(self, slot: int) -> str:
        if self.spec.slot_is_one[slot]:
            return "x"
        return self.cached(f"xs{slot}", f"x * inv_t{slot}")

    def centered_student(self, slot: int) -> str:
        """s - m: exact for huge logits, where s - lse would round near them."""
        return self.cached(f"dq{slot}", f"{self.scaled_student(slot)} - m_s{slot}")

    def log_q(self, slot: int) -> str:
        return self.cached(f"logq{slot}", f"{self.centered_student(slot)} - log_sum_s{slot}")

    def log2_q(self, slot: int) -> str:
        """log2 q = (s - m) log2(e) - log2 S: one FMA after the centering, and the exponent of q."""
        return self.cached(f"l2q{slot}", f"{self.centered_student(slot)} * LOG2E - log2_sum_s{slot}")

    def q(self, slot: int) -> str:
        return self.cached(f"q{slot}", f"tl.exp2({self.log2_q(slot)})")

    def teacher_tile(self, i: int) -> str:
        mapping = self.spec.dense[i].mapping
        mask = f"in_v & (offs < vocab_t{i})" if mapping == "pad" else "in_v"
        return self.cached(f"t{i}", f"tl.load(t{i}_row + offs, mask={mask}, other={NEG_INF}).to(tl.float32)")

    def scaled_teacher(self, i: int, slot: int) -> str:
        tile = self.teacher_tile(i)
        if self.spec.slot_is_one[slot]:
            return tile
        return self.cached(f"u{i}_{slot}", f"{tile} * inv_t{slot}")

    def stored_columns(self, i: int) -> str:
        """Which columns of the tile top-k source i stores: a histogram of its ids that fall in the tile."""
        inside = self.cached(f"in_tile{i}", f"held{i} & (safe{i} >= start) & (safe{i} < start + BLOCK_V)")
        bins = self.cached(f"bin{i}", f"tl.where({inside}, safe{i} - start, 0).to(tl.int32)")
        return self.cached(f"is_stored{i}", f"tl.histogram({bins}, BLOCK_V, mask={inside}) > 0")

    def log_mixture(self, beta: float, log_a: str, log_b: str) -> str:
        """log(beta a + (1 - beta) b) from log a and log b: never formed from underflowed probabilities."""
        return f"log_add_exp({math.log(beta)!r} + {log_a}, {math.log1p(-beta)!r} + {log_b})"

    def load_label(self) -> None:
        """The row's label y (a global id), and its column in this row's slice as int32, -1 when the
        slice does not hold it (or it is out of range): the tile loops compare 32-bit columns."""
        self.src("y = tl.load(label_ptr + row)")
        if self.sliced:
            self.src("y_col = tl.where((y >= vocab_start) & (y < vocab_start + V), y - vocab_start, -1).to(tl.int32)")
        else:
            self.src("y_col = tl.where((y >= 0) & (y < V), y, -1).to(tl.int32)")

    def onehot(self) -> str:
        self._reads_label = True
        if self._label_elsewhere:  # this copy of the body runs on tiles without the label's column
            return "False"
        return self.cached("is_label", "offs == y_col")

    def token_ids(self) -> str:
        """The global token ids of the tile's columns (under vocab parallel, past this rank's start)."""
        return "vocab_start + offs" if self.sliced else "offs"

    def class_weight_tile(self, vector: int) -> str:
        """w_j of class-weight vector `vector` at the tile's columns, by global token id (0 past the vocab)."""
        return self.cached(f"cwt{vector}", f"tl.load(cw{vector}_ptr + {self.token_ids()}, mask=in_v, other=0.0)")

    def label_class_weight(self, vector: int) -> str:
        """w_y of class-weight vector `vector` (loaded once per row after the first read)."""
        return f"cwy{vector}"

    def class_weight_sum(self, vector: int) -> str:
        """W = sum_j w_j of class-weight vector `vector` (loaded once per row after the first read)."""
        return f"cws{vector}"

    def tile_body(self, body: Callable[[], None]) -> None:
        """Write a tile loop's body. A body that reads the label's column is written twice, under a
        per-tile branch: the copy for the one tile that holds the label compares columns with it, the
        copy for every other tile knows it is absent (`onehot()` is False there, and the compiler folds
        it away), so the per-element compare and select are paid on one tile per row."""
        before = dict(self._tile_cache)
        start = len(self.src.lines)
        self._reads_label = False
        body()
        if not self._reads_label:
            return
        del self.src.lines[start:]
        self._tile_cache = dict(before)
        with self.src.block("if (y_col >= start) & (y_col < start + BLOCK_V):"):
            body()
        self._tile_cache = dict(before)
        self._label_elsewhere = True
        with self.src.block("else:"):
            body()
        self._label_elsewhere = False
        self._tile_cache = dict(before)

    def p(self, target: TargetFragments, slot: int) -> str:
        """Target probabilities of the tile (the target form's own expression)."""
        return target.p(self, slot)

    def log_p(self, target: TargetFragments, slot: int) -> str:
        """Target log-probabilities of the tile (exact for dense teachers and labels)."""
        return target.log_p(self, slot)

    def log2_p(self, target: TargetFragments, slot: int) -> str:
        """Target log2-probabilities of the tile (the target form's own expression)."""
        return target.log2_p(self, slot)

    def centered_teacher(self, i: int, slot: int) -> str:
        """u - m of dense teacher i at the slot."""
        return self.cached(f"du{i}_{slot}", f"{self.scaled_teacher(i, slot)} - {names.teacher_max(i, slot)}")

    def teacher_log_p(self, i: int, slot: int) -> str:
        """log p of dense teacher i at the slot: (u - m) - log S, exact where p underflows."""
        return self.cached(f"logp_t{i}_{slot}", f"{self.centered_teacher(i, slot)} - {names.teacher_log_sum(i, slot)}")

    def teacher_log2_p(self, i: int, slot: int) -> str:
        """log2 p of dense teacher i at the slot: (u - m) log2(e) - log2 S."""
        return self.cached(
            f"l2p_t{i}_{slot}", f"{self.centered_teacher(i, slot)} * LOG2E - {names.teacher_log2_sum(i, slot)}"
        )

    def constant_id(self, value: object) -> int:
        """A small number naming a constant of the spec (an epsilon, a mixture) in cached variable names."""
        key = f"const:{value!r}"
        if key not in self._tile_cache:
            self._tile_cache[key] = str(len([k for k in self._tile_cache if k.startswith("const:")]))
        return int(self._tile_cache[key])

    @contextmanager
    def tile_loop(self) -> Iterator[None]:
        """A read of the row, tile by tile. Reads alternate direction: the tiles a read ends with are the
        ones still in L2 when the next read starts with them."""
        constants = {k: v for k, v in self._tile_cache.items() if k.startswith("const:")}
        reverse = self._reads % 2 == 1
        self._reads += 1
        with self.src.block("for back in range(0, tiles):" if reverse else "for start in range(0, V, BLOCK_V):"):
            self._tile_cache = dict(constants)
            if reverse:
                self.src("start = (tiles - 1 - back) * BLOCK_V")
            self.src("offs = start + cols", "in_v = offs < V")
            if not self.transformed:
                self.src(f"x = tl.load(z_row + offs, mask=in_v, other={NEG_INF}).to(tl.float32)")
            elif self.spec.softcap is None:
                # every term sees a z (padded lanes stay -inf, a > 0); the argmax reads the raw logits
                self.src(
                    f"z_raw = tl.load(z_row + offs, mask=in_v, other={NEG_INF}).to(tl.float32)",
                    f"x = {self.capped('z_raw')}",
                )
            else:
                # every term sees the capped logits (padded lanes stay -inf); the argmax reads the raw
                # ones, which rank the same without the ties of saturated caps
                self.src(
                    f"z_raw = tl.load(z_row + offs, mask=in_v, other={NEG_INF}).to(tl.float32)",
                    f"x = tl.where(in_v, {self.capped('z_raw')}, {NEG_INF})",
                )
            yield
        self._tile_cache = {k: v for k, v in self._tile_cache.items() if k.startswith("const:")}

    # ----------------------------------------------------------------------------------------------
    # The kernel.
    # ----------------------------------------------------------------------------------------------

    def source(self) -> str:
        src = self.src
        src(
            f"# Generated by lossgraph.kernels.codegen (phase {self.phase}); one program per row.",
            *[f"#   {line}" for line in self.spec.describe()],
            f"#   reads of the row: {self.layout.passes}",
            "# Notation: s = z / T at the term's slot, q = softmax(s), p the target at T; each term's",
            "# gradient is dl/ds_j, times its weight gw (weight x head weight x T^2 if scaled / T x row scale).",
            "import triton",
            "import triton.language as tl",
            "",
        )
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
        src("row = tl.program_id(0).to(tl.int64)")
        if self.spec.grouped:
            # each term group's row scale (its positions' weight / its normalizer), row_scale [N, groups]
            groups = self.spec.row_groups
            src(*[f"row_scale{g} = tl.load(row_scale_ptr + row * {groups} + {g})" for g in range(groups)])
            skip = " & ".join(f"(row_scale{g} == 0.0)" for g in range(groups))
        else:
            src("row_scale = tl.load(row_scale_ptr + row)")
            skip = "row_scale == 0.0"
        src(
            "z_row = z_ptr + row * stride_z",
            "cols = tl.arange(0, BLOCK_V)",
            "tiles = tl.cdiv(V, BLOCK_V)",
            "VT = V_total" if self.sliced else "VT = V",
            "Vf = VT.to(tl.float32)",
        )
        if self.phase in ("single", "apply") and self.spec.gradient:
            src("g_row = grad_ptr + row * stride_grad")
        for i in range(len(self.spec.dense)):
            src(f"t{i}_row = t{i}_ptr + row * stride_t{i}")
        with src.block(f"if {skip}:"):
            self.masked_row()
        with src.block("else:"):
            {"single": self.live_row, "stats": self.stats_row, "reduce": self.reduce_row, "apply": self.apply_row}[
                self.phase
            ]()
        src.depth -= 1
        imports = primitive_imports("\n".join(src.lines[imports_at:]))
        src.lines[imports_at - 1 : imports_at] = ["", *imports] if imports else []
        return src.text()

    def masked_row(self) -> None:
        """A position that takes no loss: zero gradient, zero terms (and neutral statistics)."""
        src = self.src
        if self.phase == "stats":
            floats, ints = len(self.float_stats()), len(self.int_stats())
            src(
                f"tl.store(statf_ptr + row * {floats} + tl.arange(0, {next_power_of_two(floats)}), 0.0, "
                f"mask=tl.arange(0, {next_power_of_two(floats)}) < {floats})"
            )
            src(
                f"tl.store(stati_ptr + row * {ints} + tl.arange(0, {next_power_of_two(ints)}), 0, "
                f"mask=tl.arange(0, {next_power_of_two(ints)}) < {ints})"
            )
            for i in self.layout.topk_sources:
                width = self.topk_width(i)
                src(f"tl.store(topz{i}_ptr + row * {width} + tl.arange(0, {width}), 0.0)")
            return
        if self.phase == "reduce":
            names = self.reduction_stats()
            for c in range(len(names)):
                src(f"tl.store(red_ptr + row * {len(names)} + {c}, 0.0)")
            return
        if self.spec.gradient and not self.spec.accumulate:
            with src.block("for start in range(0, V, BLOCK_V):"):
                src("offs = start + cols")
                src("tl.store(g_row + offs, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=offs < V)")
        for column in range(len(self.spec.terms) + 1):
            src(f"tl.store(loss_ptr + row * {len(self.spec.terms) + 1} + {column}, 0.0)")
        if self.phase == "single":
            src("tl.store(pred_ptr + row, 0)")
            for i in range(len(self.spec.dense)):
                src(f"tl.store(tpred{i}_ptr + row, 0)")

    def live_row(self) -> None:
        src = self.src
        spec = self.spec
        if spec.uses_labels:
            self.load_label()
        for i in self.layout.topk_sources:
            self.load_topk_indices(i)
        self.first_pass()
        self.after_first_pass()
        if self.layout.topk_sources:
            self.topk_block()
        if self.layout.reduction_terms:
            self.reduction_pass()
            self.reduction_values()
        self.last_pass()
        if self.layout.topk_sources and self.spec.gradient:
            self.scatter_topk()
        self.store_values()
        src("tl.store(pred_ptr + row, best_index)")
        for i in range(len(spec.dense)):
            src(f"tl.store(tpred{i}_ptr + row, best_index_t{i})")

    @staticmethod
    def teacher_checks(term: KernelTerm) -> list[str]:
        """The per-row flags saying the teachers `term` reads are distributions."""
        checks = [f"ok_t{i}" for i in dense_teachers(term.target)]
        if isinstance(term.target, KTopK):
            checks.append(f"ok_k{term.target.source}")
        return checks

    def store_values(self) -> None:
        """Each term's value at the row times its value scale (T^2 where asked), then the row's share of
        the head's loss, sum_t lw_t x value_t over the terms whose loss weight is not 0 (a weight-0
        term's value may be infinite, and 0 x inf would be NaN)."""
        count = len(self.spec.terms) + 1
        self.src("row_loss = 0.0")
        for t, term in enumerate(self.spec.terms):
            checks = self.teacher_checks(term)
            if checks:
                self.src(f'loss{t} = tl.where({" & ".join(checks)}, loss{t}, float("nan"))')
            if self.spec.grouped:
                # the term's value where its group takes the row, 0 elsewhere; the row's loss takes each
                # term times its own group's row scale (the host does not scale this column again)
                g = self.spec.group_of(t)
                self.src(
                    f"loss{t} = tl.where(row_scale{g} != 0.0, loss{t} * vs{t}, 0.0)",
                    f"tl.store(loss_ptr + row * {count} + {t}, loss{t})",
                    f"row_loss += tl.where(lw{t} != 0.0, lw{t} * loss{t} * row_scale{g}, 0.0)",
                )
                continue
            self.src(
                f"loss{t} = loss{t} * vs{t}",
                f"tl.store(loss_ptr + row * {count} + {t}, loss{t})",
                f"row_loss += tl.where(lw{t} != 0.0, lw{t} * loss{t}, 0.0)",
            )
        self.src(f"tl.store(loss_ptr + row * {count} + {count - 1}, row_loss)")

    def stats_row(self) -> None:
        """Vocab parallel, phase 1: this slice's statistics, its share of the label logit and of the
        stored top-k logits (0 where another rank holds the token)."""
        src = self.src
        if self.spec.uses_labels:
            self.load_label()
        for i in self.layout.topk_sources:
            self.load_topk_indices(i)
        self.first_pass()
        if self.spec.uses_labels:
            src(
                "held = (y >= vocab_start) & (y < vocab_start + V)",
                "z_label = tl.load(z_row + tl.where(held, y - vocab_start, 0), mask=held, other=0.0).to(tl.float32)",
            )
            if self.transformed:
                src(f"z_label = tl.where(held, {self.capped('z_label')}, 0.0)")
        for i in self.layout.topk_sources:
            src(f"tl.store(topz{i}_ptr + row * {self.topk_width(i)} + kk{i}, tl.where(held{i}, z_top{i}, 0.0))")
        floats = self.float_stats()
        for c, (name, _, _) in enumerate(floats):
            src(f"tl.store(statf_ptr + row * {len(floats)} + {c}, {name})")
        ints = self.int_stats()
        for c, name in enumerate(ints):
            src(f"tl.store(stati_ptr + row * {len(ints)} + {c}, {name})")

    def load_stats(self) -> None:
        """The combined statistics (kept in a float64 buffer, computed with in float32)."""
        floats = self.float_stats()
        for c, (name, _, _) in enumerate(floats):
            self.src(f"{name} = tl.load(statf_ptr + row * {len(floats)} + {c}).to(tl.float32)")

    def reduce_row(self) -> None:
        """Vocab parallel, phase 2: this slice's share of the row sums jsd, tvd and reverse KL need."""
        if self.spec.uses_labels:
            self.load_label()
        self.load_stats()
        self.after_first_pass()
        self.reduction_pass()
        names = self.reduction_stats()
        for c, name in enumerate(names):
            self.src(f"tl.store(red_ptr + row * {len(names)} + {c}, {name})")

    def apply_row(self) -> None:
        """Vocab parallel, last phase: the terms and this slice's gradient, from combined statistics."""
        src = self.src
        if self.spec.uses_labels:
            self.load_label()
        for i in self.layout.topk_sources:
            self.load_topk_indices(i)
        self.load_stats()
        names = self.reduction_stats()
        for c, name in enumerate(names):
            src(f"{name} = tl.load(red_ptr + row * {len(names)} + {c})")
        self.after_first_pass()
        if self.layout.reduction_terms:
            self.reduction_values()
        if self.layout.topk_sources:
            self.topk_block()
        self.last_pass()
        if self.layout.topk_sources and self.spec.gradient:
            self.scatter_topk()
        self.store_values()

    # ----------------------------------------------------------------------------------------------
    # Pass 1.
    # ----------------------------------------------------------------------------------------------

    def first_pass(self) -> None:
        """One read of the row, with every running statistic kept per lane (kernels/primitives.py):
        each softmax state's max and sum-exp, the streamed sums, and the argmax's best value and tile.
        A lane reduces its own VEC columns in registers, so the loop has no block reduction at all;
        the lanes are combined once, after the loop. A tile's lane maxima are taken once per tensor:
        the state at temperature T has max(x / T) = max(x) / T (T > 0, and rounding keeps the order)."""
        src = self.src
        layout = self.layout
        lane_count = "[BLOCK_V // VEC]"
        src("# pass 1: online softmax statistics, argmax and the sums that stream in one read, per lane")
        states = [f"s{s}" for s in layout.student_slots] + [f"t{i}_{s}" for i, s in layout.teacher_states]
        maxima = [f"m_{state}" for state in states] + [f"tail_m{i}" for i in layout.tail_sources]
        sums = [f"sum_{state}" for state in states] + [f"tail_sum{i}" for i in layout.tail_sources]
        streamed = [f"moment_s{s}" for s in layout.moment_slots] + [
            names.cross_moment(s, i, u) for s, i, u in layout.cross_moments
        ]
        for name in maxima:
            src(f"{name}_lanes = tl.full({lane_count}, {NEG_INF}, tl.float32)")
        self.open_lanes(sums + streamed)
        for suffix in ["", *[f"_t{i}" for i in range(len(self.spec.dense))]]:
            src(
                f"best_value{suffix}_lanes = tl.full({lane_count}, {NEG_INF}, tl.float32)",
                f"best_start{suffix}_lanes = tl.zeros({lane_count}, dtype=tl.int32)",
            )
        with self.tile_loop():
            raw = "z_raw" if self.transformed else "x"
            src(f"{raw}_max = lane_max({raw}, VEC)")
            if self.spec.softcap is not None:
                src("x_max = lane_max(x, VEC)")
            elif self.spec.logits_scale is not None:
                # a > 0 and rounding keep the order: max_j(a z_j) = a max_j(z_j), one product per lane
                src(f"x_max = {self.capped('z_raw_max')}")
            src(
                "best_value_lanes, best_start_lanes = lane_argmax_update("
                f"best_value_lanes, best_start_lanes, {raw}_max, start)"
            )
            for i in range(len(self.spec.dense)):
                tile = self.teacher_tile(i)
                src(
                    f"{tile}_max = lane_max({tile}, VEC)",
                    f"best_value_t{i}_lanes, best_start_t{i}_lanes = lane_argmax_update("
                    f"best_value_t{i}_lanes, best_start_t{i}_lanes, {tile}_max, start)",
                )
            for i, s in layout.teacher_states:
                u = self.scaled_teacher(i, s)
                state = f"t{i}_{s}"
                src(
                    f"m_{state}_lanes, sum_{state}_lanes, _, _ = lane_softmax_update("
                    f"m_{state}_lanes, sum_{state}_lanes, {u}, {self.scaled_max(f't{i}_max', s)}, VEC)"
                )
            for i in layout.tail_sources:
                # the softmax state of the tokens source i does not store (a bucket's tail, T = 1)
                tail = self.cached(f"tail_x{i}", f"tl.where({self.stored_columns(i)}, {NEG_INF}, x)")
                src(
                    f"tail_m{i}_lanes, tail_sum{i}_lanes, _, _ = lane_softmax_update("
                    f"tail_m{i}_lanes, tail_sum{i}_lanes, {tail}, lane_max({tail}, VEC), VEC)"
                )
            for s in layout.student_slots:
                xs = self.scaled_student(s)
                if s in layout.moment_slots:
                    src(f"m_old{s} = m_s{s}_lanes", f"sum_old{s} = sum_s{s}_lanes")
                src(
                    f"m_s{s}_lanes, sum_s{s}_lanes, rescale{s}, e{s} = lane_softmax_update("
                    f"m_s{s}_lanes, sum_s{s}_lanes, {xs}, {self.scaled_max('x_max', s)}, VEC)"
                )
                if s in layout.moment_slots:
                    # entropy: H = log S - sum_j exp(s_j - m) (s_j - m) / S, the sum kept like sum-exp
                    src(
                        f"moment_s{s}_lanes = lane_centered_moment("
                        f"moment_s{s}_lanes, m_old{s}, m_s{s}_lanes, sum_old{s}, rescale{s}, e{s}, {xs}, VEC)"
                    )
                for slot, i, teacher_slot in layout.cross_moments:
                    if slot == s:
                        # against one teacher: sum_j q_j (s_j - u_j) streams like sum-exp
                        u = self.scaled_teacher(i, teacher_slot)
                        cross = names.cross_moment(s, i, teacher_slot)
                        src(
                            f"{cross}_lanes = {cross}_lanes * rescale{s} + tl.sum(tl.where("
                            f"e{s} > 0, e{s} * lanes_of({xs} - {u}, VEC), 0.0), 1)"
                        )
        self.combine_lanes()

    def scaled_max(self, lane_max: str, slot: int) -> str:
        """Lane maxima at a temperature slot from those of the unscaled tile."""
        return lane_max if self.spec.slot_is_one[slot] else f"{lane_max} * inv_t{slot}"

    def combine_lanes(self) -> None:
        """After pass 1: each softmax state's lanes brought to the row's max and summed; each streamed
        sum likewise; the argmax from the lanes' bests."""
        src = self.src
        layout = self.layout
        states = [(f"m_s{s}", f"sum_s{s}") for s in layout.student_slots]
        states += [(f"m_t{i}_{s}", f"sum_t{i}_{s}") for i, s in layout.teacher_states]
        states += [(f"tail_m{i}", f"tail_sum{i}") for i in layout.tail_sources]
        for m, total in states:
            src(f"{m}, {m}_weights = lane_weights({m}_lanes)", f"{total} = tl.sum({total}_lanes * {m}_weights, 0)")
        for s in layout.moment_slots:
            src(
                f"moment_s{s} = row_centered_moment("
                f"moment_s{s}_lanes, sum_s{s}_lanes, m_s{s}_lanes, m_s{s}, m_s{s}_weights)"
            )
        for s, i, u in layout.cross_moments:
            cross = names.cross_moment(s, i, u)
            # a lane whose weight underflows to 0 holds no mass in float32, even if its sum is infinite
            # (a banned teacher token): it adds nothing, as an underflowed element adds nothing in a lane
            src(f"{cross} = tl.sum(tl.where(m_s{s}_weights > 0, {cross}_lanes * m_s{s}_weights, 0.0), 0)")
        offset = " + vocab_start" if self.sliced else ""
        src("best_value, best_index = row_argmax(best_value_lanes, best_start_lanes, z_row, V, BLOCK_V, VEC)")
        if offset:
            src(f"best_index = best_index{offset}")
        for i in range(len(self.spec.dense)):
            limit = f"tl.minimum(V, vocab_t{i})" if self.spec.dense[i].mapping == "pad" else "V"
            src(
                f"best_value_t{i}, best_index_t{i} = row_argmax("
                f"best_value_t{i}_lanes, best_start_t{i}_lanes, t{i}_row, {limit}, BLOCK_V, VEC)"
            )
            if offset:
                src(f"best_index_t{i} = best_index_t{i}{offset}")

    def after_first_pass(self) -> None:
        """log-sum-exps, and the values of the terms that are known after one read."""
        src = self.src
        spec = self.spec
        for s in self.layout.student_slots:
            src(
                f"log_sum_s{s} = tl.log(sum_s{s})",
                f"log2_sum_s{s} = tl.log2(sum_s{s})",
                f"lse_s{s} = m_s{s} + log_sum_s{s}",
            )
        for i, s in self.layout.teacher_states:
            src(f"log_sum_t{i}_{s} = tl.log(sum_t{i}_{s})", f"log2_sum_t{i}_{s} = tl.log2(sum_t{i}_{s})")
        for i in range(len(spec.dense)):
            # a NaN or +inf logit, or no finite one, leaves the teacher's log-sum-exp non-finite (x - x != 0)
            _, s = next(state for state in self.layout.teacher_states if state[0] == i)
            src(f"lse_t{i} = m_t{i}_{s} + log_sum_t{i}_{s}", f"ok_t{i} = (lse_t{i} - lse_t{i}) == 0.0")
        for i in self.layout.topk_sources if self.phase != "reduce" else ():
            # the same for the stored log-probs of a top-k teacher
            src(
                f"lse_k{i} = log_sum_exp(tl.where(kmask{i}, stored_lp{i}, {NEG_INF}))",
                f"ok_k{i} = (lse_k{i} - lse_k{i}) == 0.0",
            )
        if self.phase in ("single", "apply"):
            # a row whose teacher is not a distribution gets a NaN gradient, as its loss is NaN: a
            # finite loss never hides a broken teacher, and a NaN loss never comes with a finite gradient.
            # Only teachers of terms in the gradient count: a weight-0 term is reported, not applied.
            # a scaled head: dl/dz = a dl/dz' with z' = a z, the factor a taken once per row here
            factor = "" if spec.logits_scale is None else f" * {spec.logits_scale!r}"
            if spec.grouped:
                self.group_grad_scales(factor)
            else:
                checks = sorted({check for term in spec.terms if term.active for check in self.teacher_checks(term)})
                if checks:
                    src(f'grad_scale = tl.where({" & ".join(checks)}, row_scale{factor}, float("nan"))')
                else:
                    src(f"grad_scale = row_scale{factor}")
        if spec.uses_labels:
            # an out-of-range label (unchecked input) gives a NaN loss instead of an out-of-bounds read
            src("label_ok = (y >= 0) & (y < VT)")
            if self.sliced:  # the combined statistics hold the label's logit
                src('z_label = tl.where(label_ok, z_label, float("nan"))')
            else:
                src(
                    'z_label = tl.load(z_row + tl.where(label_ok, y, 0), mask=label_ok, other=float("nan"))',
                    f"z_label = {self.capped('z_label.to(tl.float32)')}",
                )
            if self.phase in ("single", "apply"):
                for c in spec.class_weight_vectors:
                    # the label's class weight w_y (NaN for a label outside the vocab) and W = sum_j w_j
                    src(
                        f'cwy{c} = tl.load(cw{c}_ptr + tl.where(label_ok, y, 0), mask=label_ok, other=float("nan"))',
                        f"cws{c} = tl.load(cw_sum{c}_ptr)",
                    )
        for t, term in enumerate(spec.terms):
            if isinstance(term.target, KTopK):
                continue
            stage = term.loss.value_stage(term)
            if stage == FIRST_READ:
                self.term_header(t, term, "value")
                self.src(f"{names.value(t)} = {self.term_scopes[t].value_after_first_pass()}")
            elif stage == STREAMED:
                self.src(f"{names.value(t)} = 0.0  # term {t}: streamed in the last pass")

    def group_grad_scales(self, factor: str) -> None:
        """Each term group's gradient scale: its row scale (times a scaled head's `factor`), NaN where a
        teacher that an active term of the group reads is no distribution (and the group takes the row)."""
        spec = self.spec
        for g in range(spec.row_groups):
            terms = [term for t, term in enumerate(spec.terms) if term.active and spec.group_of(t) == g]
            checks = sorted({check for term in terms for check in self.teacher_checks(term)})
            if checks:
                ok = " & ".join(checks)
                self.src(
                    f'grad_scale{g} = tl.where(({ok}) | (row_scale{g} == 0.0), row_scale{g}{factor}, float("nan"))'
                )
            else:
                self.src(f"grad_scale{g} = row_scale{g}{factor}")

    def sparse_weight(self, t: int) -> str:
        """What a top-k term's sparse gradient entries are multiplied by before the scatter: its weight,
        and with term groups its group's gradient scale (the scatter then applies none)."""
        if self.spec.grouped:
            return f"w{t} * grad_scale{self.spec.group_of(t)}"
        return f"w{t}"

    def term_header(self, t: int, term: KernelTerm, *what: str) -> None:
        """A comment naming the term whose code follows, with the kind's formulas for `what`."""
        formulas = term.loss.formulas(term)
        found = "; ".join(formulas[key] for key in what if key in formulas)
        self.comment(f"term {t} ({term.loss.name}): {found}" if found else f"term {t} ({term.loss.name})")

    def scaled_label_logit(self, slot: int) -> str:
        """s_y: the label's logit at the slot's temperature."""
        return names.LABEL_LOGIT if self.spec.slot_is_one[slot] else f"{names.LABEL_LOGIT} * inv_t{slot}"

    # ----------------------------------------------------------------------------------------------
    # Top-k teachers.
    # ----------------------------------------------------------------------------------------------

    def topk_block(self) -> None:
        src = self.src
        src("# top-k teachers: gather the stored entries; their terms are computed on these vectors")
        for i in self.layout.topk_sources:
            width = self.topk_width(i)
            if self.sliced:  # every rank's share, combined
                src(f"z_top{i} = tl.where(in_vocab{i}, tl.load(topz{i}_ptr + row * {width} + kk{i}), {NEG_INF})")
            src(f"delta{i} = tl.zeros([{width}], dtype=tl.float32)")
        for t in self.layout.topk_terms:
            term = self.spec.terms[t]
            if term.target.tail == "renormalize":
                self.topk_renormalized(t, term)
            else:
                self.topk_bucket(t, term)

    def load_topk_indices(self, i: int) -> None:
        """The stored ids and log-probs of top-k source i; `held` ids are columns of this row's slice."""
        k = self.spec.topk[i]
        self.src(
            f"kk{i} = tl.arange(0, {self.topk_width(i)})",
            f"kmask{i} = kk{i} < {k}",
            f"index{i} = tl.load(k{i}_index_ptr + row * stride_k{i}_index + kk{i}, mask=kmask{i}, other=0)",
            f"index{i} = index{i}.to(tl.int64)",
            f"stored_lp{i} = tl.load(k{i}_logp_ptr + row * stride_k{i}_logp + kk{i}, mask=kmask{i}, other=0.0)",
            f"stored_lp{i} = stored_lp{i}.to(tl.float32)",
            f"in_vocab{i} = kmask{i} & (index{i} >= 0) & (index{i} < VT)",
        )
        if self.sliced:
            self.src(
                f"column{i} = index{i} - vocab_start",
                f"held{i} = in_vocab{i} & (column{i} >= 0) & (column{i} < V)",
                f"safe{i} = tl.where(held{i}, column{i}, 0)",
            )
        else:
            self.src(f"held{i} = in_vocab{i}", f"safe{i} = tl.where(in_vocab{i}, index{i}, 0)")
        if self.phase in ("single", "stats"):
            self.src(f"z_top{i} = tl.load(z_row + safe{i}, mask=held{i}, other={NEG_INF}).to(tl.float32)")
            if self.transformed:
                self.src(f"z_top{i} = tl.where(held{i}, {self.capped(f'z_top{i}')}, {NEG_INF})")

    def topk_renormalized(self, t: int, term: KernelTerm) -> None:
        src = self.src
        i = term.target.source
        s = term.slot
        inv = "" if self.spec.slot_is_one[s] else f" * inv_t{s}"
        # the stored log-probs at the teacher's temperature: softmax(log p / T_teacher) over the stored tokens
        u = term.target_slot
        teacher_inv = "" if self.spec.slot_is_one[u] else f" * inv_t{u}"
        src(
            "# top-k, renormalize: q' and p' are softmaxes over the k stored tokens only",
            f"a{t} = tl.where(in_vocab{i}, z_top{i}{inv}, {NEG_INF})",
            f"lq{t} = a{t} - log_sum_exp(a{t})",
            f"qv{t} = fast_exp(lq{t})",
            f"b{t} = tl.where(in_vocab{i}, stored_lp{i}{teacher_inv}, {NEG_INF})",
            f"lp{t} = b{t} - log_sum_exp(b{t})",
            f"pv{t} = fast_exp(lp{t})",
            f"usable{t} = tl.max(in_vocab{i}.to(tl.int32), 0) > 0",
        )
        self.term_header(t, term, "vector")
        value, gradient = self.term_scopes[t].vector(Vectors(f"qv{t}", f"pv{t}", f"lq{t}", f"lp{t}"))
        src(f"loss{t} = tl.where(usable{t}, {value}, 0.0)")
        if term.active:
            src(f"delta{i} += tl.where(in_vocab{i} & usable{t}, {self.sparse_weight(t)} * ({gradient}), 0.0)")

    def topk_bucket(self, t: int, term: KernelTerm) -> None:
        """k stored buckets plus one tail bucket; T = 1.

        With bucket b(j) of token j and G'_b = dl/dQ_b - sum_c Q_c dl/dQ_c, dl/dz_j = q_j G'_b(j): the
        stored tokens get q_i G'_i (`sparse`, scattered after the last pass), every other token
        q_j G'_tail (written by the last pass, which skips the stored columns).
        Q_tail comes from pass 1's own softmax state of the unstored tokens, in log space: exact however
        far the tail lies below the stored mass (a confident student).
        """
        src = self.src
        i = term.target.source
        s = term.slot
        src(
            "# top-k, bucket: Q_i = q at the stored tokens, Q_tail = the rest; same for the teacher's P",
            f"lQ{t} = tl.where(in_vocab{i}, (z_top{i} - m_s{s}) - log_sum_s{s}, {NEG_INF})",
            f"Q{t} = fast_exp(lQ{t})",
            # no tail when the stored tokens cover the vocab, whatever the stored mass rounds to
            f"has_tail{t} = tl.sum(in_vocab{i}.to(tl.int32), 0) < VT",
            f"lQt{t} = tl.where(has_tail{t}, (tail_m{i} - m_s{s}) + tl.log(tail_sum{i}) - log_sum_s{s}, {NEG_INF})",
            f"Qt{t} = fast_exp(lQt{t})",
            f"lP{t} = tl.where(in_vocab{i}, stored_lp{i}, {NEG_INF})",
            f"P{t} = fast_exp(lP{t})",
            # the teacher's tail, 1 - sum_i P_i, in float64: a confident teacher's tail lies far below
            # the 6e-8 that float32 resolves next to 1
            f"Pt{t} = tl.where(has_tail{t}, tl.maximum(1.0 - tl.sum(tl.exp(lP{t}.to(tl.float64)), 0), 0.0), 0.0)",
            f"lPt{t} = tl.log(Pt{t}).to(tl.float32)",
            f"Pt{t} = Pt{t}.to(tl.float32)",
        )
        self.term_header(t, term, "bucket")
        vectors = Vectors(f"Q{t}", f"P{t}", f"lQ{t}", f"lP{t}", f"Qt{t}", f"Pt{t}", f"lQt{t}", f"lPt{t}")
        form = self.term_scopes[t].bucket(vectors)
        src(f"loss{t} = {form.value}", f"sparse{t} = {form.stored}")
        if form.tail_factor:
            src(f"gt{t} = {form.tail_factor}")
            self._tail_factors.add(t)
        if term.active:
            src(f"delta{i} += tl.where(in_vocab{i}, {self.sparse_weight(t)} * sparse{t}, 0.0)")

    def bucket_tail_gradient(self, t: int, term: KernelTerm) -> str:
        """q_j G'_tail of a bucket term at the tile's columns; 0 at the stored ones (they get `sparse`)."""
        q, lq = self.q(term.slot), self.log_q(term.slot)
        if t in self._tail_factors:
            tail = f"tl.where({q} > 0, {q} * gt{t}, 0.0)"
        else:
            tail = self.term_scopes[t].bucket_tail_gradient(q, lq)
        return f"tl.where({self.stored_columns(term.target.source)}, 0.0, {tail})"

    # ----------------------------------------------------------------------------------------------
    # Pass 2 (only for terms whose gradient needs a row sum over p and q).
    # ----------------------------------------------------------------------------------------------

    def reduction_pass(self) -> None:
        src = self.src
        src("# pass 2: row sums that involve p and q together (needed before any gradient element)")
        sums = self.reduction_stats()
        self.open_lanes(sums)

        def body() -> None:
            for t in self.layout.reduction_terms:
                term = self.spec.terms[t]
                self.term_header(t, term, "row sums")
                summands = self.term_scopes[t].row_sums()
                for name, summand in zip(term.loss.row_sum_names(term), summands, strict=True):
                    self.add_to_lanes(names.row_sum(name, t), summand)

        with self.tile_loop():
            self.tile_body(body)
        self.close_lanes(sums, "=")

    def reduction_values(self) -> None:
        """The values of the terms pass 2 sums up."""
        for t in self.layout.reduction_terms:
            self.src(f"{names.value(t)} = {self.term_scopes[t].value_from_row_sums()}")

    # ----------------------------------------------------------------------------------------------
    # Last pass: streamed term values and the gradient.
    # ----------------------------------------------------------------------------------------------

    def last_pass(self) -> None:
        src = self.src
        spec = self.spec
        streamed = list(self.layout.streamed_terms)
        if not spec.gradient and not streamed:
            return
        self.open_lanes([names.value(t) for t in streamed])
        if not spec.gradient:
            src("# last pass: the values that stream (no gradient is asked for)")
            with self.tile_loop():
                self.tile_body(self.terms_in_last_pass)
        else:
            # each term's weight times the row's scale, once per row rather than once per element
            for t, term in enumerate(spec.terms):
                if term.active and spec.grouped:
                    src(f"{names.gradient_weight(t)} = w{t} * grad_scale{spec.group_of(t)}")
                elif term.active:
                    src(f"{names.gradient_weight(t)} = w{t} * grad_scale")
            src("# last pass: streamed values and the summed gradient, written once")
            with self.tile_loop():
                src("g = tl.zeros([BLOCK_V], dtype=tl.float32)")
                self.tile_body(self.terms_in_last_pass)
                if spec.softcap is not None:
                    # dl/dz = dl/dz' (1 - tanh^2(z / c)), z' = c tanh(z / c) the capped logit in x
                    src(f"g = g * {self.cap_derivative('x')}")
                if spec.accumulate:
                    src("g += tl.load(g_row + offs, mask=in_v, other=0.0).to(tl.float32)")
                src("tl.store(g_row + offs, round_to(g, grad_ptr.dtype.element_ty), mask=in_v)")
        self.close_lanes([names.value(t) for t in streamed], "+=")
        for t in streamed:
            if self.spec.terms[t].loss.streams_in_bits:
                src(f"{names.value(t)} = {names.value(t)} * LN2  # summed in bits")

    def terms_in_last_pass(self) -> None:
        linear: dict[str, list[str]] = {}  # vector -> its coefficients over the terms, times their weights
        at_label: list[str] = []
        for t, term in enumerate(self.spec.terms):
            self.term_in_last_pass(t, term, linear, at_label)
        if linear or at_label:
            self.comment("the terms' gradients that are sums of vectors, each vector's coefficients added up")
        for vector, coefficients in linear.items():
            self.src(f"g += ({' + '.join(coefficients)}) * {vector}")
        label = self.onehot() if at_label else "False"
        if label != "False":
            self.src(f"g += tl.where({label}, {' + '.join(at_label)}, 0.0)")

    def term_in_last_pass(self, t: int, term: KernelTerm, linear: dict[str, list[str]], at_label: list[str]) -> None:
        """The term's streamed value (if it streams) and its gradient (if it is active); a gradient that
        is a `LinearGradient` goes into `linear` and `at_label` (see `terms_in_last_pass`)."""
        src = self.src
        weight = names.gradient_weight(t)
        if isinstance(term.target, KTopK):
            if term.target.tail == "bucket" and term.active:
                src(f"# term {t} ({term.loss.name}): the tail's part of the bucket gradient, q_j G'_tail (T = 1)")
                src(f"g += {weight} * {self.bucket_tail_gradient(t, term)}")
            return
        streams = t in self.layout.streamed_terms
        if streams or term.active:
            self.term_header(t, term, *(["value"] if streams else []), *(["gradient"] if term.active else []))
        if streams:
            self.add_to_lanes(names.value(t), self.term_scopes[t].streamed_value())
        if not term.active:
            return
        gradient = self.term_scopes[t].gradient()
        if isinstance(gradient, LinearGradient):
            for coefficient, vector in gradient.parts:
                linear.setdefault(vector, []).append(f"{weight} * {coefficient}")
            if gradient.at_label is not None:
                at_label.append(f"{weight} * {gradient.at_label}")
        else:
            # the gradient is an operand of this product (scope.factor): the weight's factors fold into one per row
            src(f"g += {weight} * {gradient}")

    def scatter_topk(self) -> None:
        src = self.src
        src("# the stored top-k tokens get their sparse gradient entries on top of the dense ones")
        for i in self.layout.topk_sources:
            src(
                "tl.debug_barrier()",
                f"old{i} = tl.load(g_row + safe{i}, mask=held{i}, other=0.0).to(tl.float32)",
                f"new{i} = old{i} + delta{i}{'' if self.spec.grouped else ' * grad_scale'}"
                f"{self.cap_factor(f'z_top{i}')}",
                f"new{i} = round_to(new{i}, grad_ptr.dtype.element_ty)",
                f"tl.store(g_row + safe{i}, new{i}, mask=held{i})",
            )


def generate(spec: KernelSpec) -> str:
    """Triton source of the fused kernel for `spec` (a module defining `fused_head_kernel`)."""
    return KernelGenerator(spec).source()
