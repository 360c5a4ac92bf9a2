"""The tile vocabulary of a generated kernel: what the row programs and the kinds' fragments write with.

`Tiles` is the kernel being written as its parts see it: the spec, the phase and the layout (fixed),
the source lines, and the expressions of the current tile of the row (`fragments.TileWriter`): the
student's q and log q at a temperature slot, the targets' p and log p, the dense teachers' tiles, the
label's column, the class weights. Each expression is written once per tile loop, as a named variable,
and then reused (`cached`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from . import names
from .fragments import KernelTerm, TargetFragments
from .layout import KernelLayout
from .scope import TermScope, term_scopes
from .signature import KernelSpec

NEG_INF = 'float("-inf")'


class SourceLines:
    """Lines of source at an indentation depth that `block` raises."""

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


class Tiles:
    """The kernel being written for one spec and phase, and its tile vocabulary (see the module doc).

    Column j of the row's vocab slice is global token id vocab_start + j under vocab parallel (a phase
    other than "single"); V is the slice's width and VT the whole vocab's.
    """

    def __init__(
        self,
        spec: KernelSpec,
        phase: str,
        layout: KernelLayout,
        *,
        primitives: Iterable[str] = (),
        holds_label: bool = True,
        parent: Tiles | None = None,
    ) -> None:
        self.spec = spec
        self.phase = phase
        self.layout = layout
        self.src = SourceLines()
        # the tile may hold the label's column; False in the copy of a tile body for the tiles that do not
        self.holds_label = holds_label
        self.cache: dict[str, str] = {}  # this tile loop's variables: name -> expression
        self.reads = 0  # tile loops written so far (each read of the row is one)
        # the writer of the kernel this one writes a copy of a tile body for (None: the kernel's own)
        self.parent = parent
        # each term's fragments, called through its scope (kernels/scope.py): one per kernel, shared by the copies
        self.scopes: list[TermScope] = parent.scopes if parent else term_scopes(spec, primitives)

    @property
    def sliced(self) -> bool:
        """The row is one rank's slice of the vocab (every phase but "single")."""
        return self.phase != "single"

    def emit(self, *lines: str) -> None:
        """Write lines of source at the current indentation (for the kinds' fragments)."""
        self.src(*lines)

    def term(self, t: int) -> TermScope:
        """Term t's fragments, to be called here: through its scope, which checks and namespaces them."""
        return self.scopes[t].writing_to(self)

    def kernel_lines(self) -> tuple[list[str], int]:
        """The kernel's lines so far as this writer continues them (a copy of a tile body: its parent's,
        then its own at the parent's depth), and the depth it writes at: what the term scopes read the
        kernel variables in scope from."""
        if self.parent is None:
            return self.src.lines, self.src.depth
        lines, depth = self.parent.kernel_lines()
        indent = "    " * depth
        return lines + [indent + line if line else line for line in self.src.lines], depth + self.src.depth

    def comment(self, text: str) -> None:
        self.src(f"# {text}")

    def term_header(self, t: int, term: KernelTerm, *what: str) -> None:
        """A comment naming the term whose code follows, with the kind's formulas for `what`."""
        formulas = term.loss.formulas(term)
        found = "; ".join(formulas[key] for key in what if key in formulas)
        self.comment(f"term {t} ({term.loss.name}): {found}" if found else f"term {t} ({term.loss.name})")

    # ----------------------------------------------------------------------------------------------
    # The logits as the terms see them.
    # ----------------------------------------------------------------------------------------------

    def capped(self, logits: str) -> str:
        """The logits as the terms see them: times the head's scale a, then soft-capped, when the head
        scales or caps them. dz'/dz carries a factor a, which the row's gradient scale holds."""
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

    # ----------------------------------------------------------------------------------------------
    # Tile expressions (cached per loop body).
    # ----------------------------------------------------------------------------------------------

    def cached(self, name: str, expression: str) -> str:
        if name not in self.cache:
            self.src(f"{name} = {expression}")
            self.cache[name] = expression
        return name

    def constant_id(self, value: object) -> int:
        """A small number naming a constant of the spec (an epsilon, a mixture) in cached variable names."""
        key = f"const:{value!r}"
        if key not in self.cache:
            self.cache[key] = str(len([k for k in self.cache if k.startswith("const:")]))
        return int(self.cache[key])

    def scaled_student(self, slot: int) -> str:
        if self.spec.slot_is_one[slot]:
            return "x"
        return self.cached(f"student_logits_{slot}", f"x * {names.inverse_temperature(slot)}")

    def centered_student(self, slot: int) -> str:
        """s - m: exact for huge logits, where s - lse would round near them."""
        return self.cached(f"student_centered_{slot}", f"{self.scaled_student(slot)} - {names.student_max(slot)}")

    def log_q(self, slot: int) -> str:
        return self.cached(f"log_q_{slot}", f"{self.centered_student(slot)} - {names.student_log_sum(slot)}")

    def log2_q(self, slot: int) -> str:
        """log2 q = (s - m) log2(e) - log2 S: one FMA after the centering, and the exponent of q."""
        return self.cached(f"log2_q_{slot}", f"{self.centered_student(slot)} * LOG2E - {names.student_log2_sum(slot)}")

    def q(self, slot: int) -> str:
        return self.cached(f"q_{slot}", f"tl.exp2({self.log2_q(slot)})")

    def teacher_tile(self, i: int) -> str:
        mapping = self.spec.dense[i].mapping
        mask = f"{names.IN_VOCAB} & (offs < vocab_t{i})" if mapping == "pad" else names.IN_VOCAB
        load = f"tl.load({names.teacher_row(i)} + offs, mask={mask}, other={NEG_INF}).to(tl.float32)"
        return self.cached(f"teacher{i}_logits", load)

    def scaled_teacher(self, i: int, slot: int) -> str:
        tile = self.teacher_tile(i)
        if self.spec.slot_is_one[slot]:
            return tile
        return self.cached(f"teacher{i}_logits_{slot}", f"{tile} * {names.inverse_temperature(slot)}")

    def centered_teacher(self, i: int, slot: int) -> str:
        """u - m of dense teacher i at the slot."""
        return self.cached(
            f"teacher{i}_centered_{slot}", f"{self.scaled_teacher(i, slot)} - {names.teacher_max(i, slot)}"
        )

    def teacher_log_p(self, i: int, slot: int) -> str:
        """log p of dense teacher i at the slot: (u - m) - log S, exact where p underflows."""
        return self.cached(
            f"teacher{i}_log_p_{slot}", f"{self.centered_teacher(i, slot)} - {names.teacher_log_sum(i, slot)}"
        )

    def teacher_log2_p(self, i: int, slot: int) -> str:
        """log2 p of dense teacher i at the slot: (u - m) log2(e) - log2 S."""
        return self.cached(
            f"teacher{i}_log2_p_{slot}",
            f"{self.centered_teacher(i, slot)} * LOG2E - {names.teacher_log2_sum(i, slot)}",
        )

    def p(self, target: TargetFragments, slot: int) -> str:
        """Target probabilities of the tile (the target form's own expression)."""
        return target.p(self, slot)

    def log_p(self, target: TargetFragments, slot: int) -> str:
        """Target log-probabilities of the tile (exact for dense teachers and labels)."""
        return target.log_p(self, slot)

    def log2_p(self, target: TargetFragments, slot: int) -> str:
        """Target log2-probabilities of the tile (the target form's own expression)."""
        return target.log2_p(self, slot)

    def log_mixture(self, beta: float, log_a: str, log_b: str) -> str:
        """log(beta a + (1 - beta) b) from log a and log b: never formed from underflowed probabilities."""
        return f"log_add_exp({math.log(beta)!r} + {log_a}, {math.log1p(-beta)!r} + {log_b})"

    def stored_columns(self, i: int) -> str:
        """Which columns of the tile top-k source i stores: a histogram of its ids that fall in the tile."""
        held, column = names.topk(i, "held"), names.topk(i, "safe_column")
        inside = self.cached(names.topk(i, "in_tile"), f"{held} & ({column} >= start) & ({column} < start + BLOCK_V)")
        bins = self.cached(names.topk(i, "bin"), f"tl.where({inside}, {column} - start, 0).to(tl.int32)")
        return self.cached(names.topk(i, "is_stored"), f"tl.histogram({bins}, BLOCK_V, mask={inside}) > 0")

    def onehot(self) -> str:
        """True at the label's column (the constant False in the copy of a body for the tiles without it)."""
        if not self.holds_label:
            return "False"
        return self.cached(names.IS_LABEL, f"offs == {names.LABEL_COLUMN}")

    def scaled_label_logit(self, slot: int) -> str:
        """s_y: the label's logit at the slot's temperature."""
        if self.spec.slot_is_one[slot]:
            return names.LABEL_LOGIT
        return f"{names.LABEL_LOGIT} * {names.inverse_temperature(slot)}"

    def token_ids(self) -> str:
        """The global token ids of the tile's columns (under vocab parallel, past this rank's start)."""
        return "vocab_start + offs" if self.sliced else "offs"

    def class_weight_tile(self, vector: int) -> str:
        """w_j of class-weight vector `vector` at the tile's columns, by global token id (0 past the vocab)."""
        load = f"tl.load(cw{vector}_ptr + {self.token_ids()}, mask={names.IN_VOCAB}, other=0.0)"
        return self.cached(f"class_weight_{vector}", load)

    def label_class_weight(self, vector: int) -> str:
        """w_y of class-weight vector `vector` (loaded once per row after the first read)."""
        return names.label_class_weight(vector)

    def class_weight_sum(self, vector: int) -> str:
        """W = sum_j w_j of class-weight vector `vector` (loaded once per row after the first read)."""
        return names.class_weight_sum(vector)

    # ----------------------------------------------------------------------------------------------
    # Row sums kept per lane in a tile loop.
    # ----------------------------------------------------------------------------------------------

    def open_lanes(self, sums: list[str]) -> None:
        """Before a tile loop: a per-lane vector `<name>_lanes` for each row sum the loop adds to, so
        that the loop needs no block reduction for them (see kernels/primitives.py on lanes)."""
        for name in sums:
            self.src(f"{name}_lanes = tl.zeros([BLOCK_V // VEC], dtype=tl.float32)")

    def add_to_lanes(self, name: str, summand: str) -> None:
        """In a tile loop: add a tile's summands to the row sum `name`, per lane."""
        self.src(f"{name}_lanes += lane_sum({summand}, VEC)")

    def close_lanes(self, sums: list[str], operator: str) -> None:
        """After the loop: each sum's lanes reduced once, assigned (`=`) or added (`+=`) to `<name>`."""
        for name in sums:
            self.src(f"{name} {operator} tl.sum({name}_lanes, 0)")

    # ----------------------------------------------------------------------------------------------
    # Tile loops.
    # ----------------------------------------------------------------------------------------------

    def _constants(self) -> dict[str, str]:
        return {key: value for key, value in self.cache.items() if key.startswith("const:")}

    @contextmanager
    def tile_loop(self) -> Iterator[None]:
        """A read of the row, tile by tile. Reads alternate direction: the tiles a read ends with are the
        ones still in L2 when the next read starts with them."""
        reverse = self.reads % 2 == 1
        self.reads += 1
        with self.src.block("for back in range(0, tiles):" if reverse else "for start in range(0, V, BLOCK_V):"):
            self.cache = self._constants()
            if reverse:
                self.src("start = (tiles - 1 - back) * BLOCK_V")
            in_vocab = names.IN_VOCAB
            self.src("offs = start + cols", f"{in_vocab} = offs < V")
            if not self.transformed:
                self.src(f"x = tl.load(z_row + offs, mask={in_vocab}, other={NEG_INF}).to(tl.float32)")
            elif self.spec.softcap is None:
                # every term sees a z (padded lanes stay -inf, a > 0); the argmax reads the raw logits
                self.src(
                    f"z_raw = tl.load(z_row + offs, mask={in_vocab}, other={NEG_INF}).to(tl.float32)",
                    f"x = {self.capped('z_raw')}",
                )
            else:
                # every term sees the capped logits (padded lanes stay -inf); the argmax reads the raw
                # ones, which rank the same without the ties of saturated caps
                self.src(
                    f"z_raw = tl.load(z_row + offs, mask={in_vocab}, other={NEG_INF}).to(tl.float32)",
                    f"x = tl.where({in_vocab}, {self.capped('z_raw')}, {NEG_INF})",
                )
            yield
        self.cache = self._constants()

    def tile_body(self, body: Callable[[Tiles], None]) -> None:
        """Write a tile loop's body, `body(tiles)`. A body that reads the label's column (`onehot()`)
        takes a per-tile branch: the copy for the one tile that holds the label compares columns with
        it, the copy for every other tile knows it is absent (`onehot()` is False there, and the
        compiler folds it away), so the per-element compare and select are paid on one tile per row.
        Each copy is written by a `Tiles` of its own (its lines, its loop variables): the body is written
        for a tile that may hold the label and, only where that copy asked for the label's column, once
        more for the tiles that do not."""
        label_tile = self._tile_copy(holds_label=True)
        body(label_tile)
        if names.IS_LABEL not in label_tile.cache:  # the body never asked for the label's column
            self.src(*label_tile.src.lines)
            self.cache = label_tile.cache
            return
        other_tiles = self._tile_copy(holds_label=False)
        body(other_tiles)
        with self.src.block(f"if ({names.LABEL_COLUMN} >= start) & ({names.LABEL_COLUMN} < start + BLOCK_V):"):
            self.src(*label_tile.src.lines)
        with self.src.block("else:"):
            self.src(*other_tiles.src.lines)

    def _tile_copy(self, *, holds_label: bool) -> Tiles:
        """A writer for one copy of a tile body: this loop's variables so far, its own lines."""
        copy = Tiles(self.spec, self.phase, self.layout, holds_label=holds_label, parent=self)
        copy.cache = dict(self.cache)
        return copy
