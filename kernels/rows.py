"""The row programs of a generated kernel, one per phase, and the steps they share.

phase "single" is the whole algorithm in one launch (`single_row`). Under vocab parallel each rank
holds a slice of the vocab, and the algorithm is cut where statistics must be combined across ranks:
"stats" (pass 1 and the gathers, written out), "reduce" (pass 2's partial sums, when a term needs
them) and "apply" (the last pass, from the combined statistics). A spec whose terms read per-row
inputs computed across rows (`KernelSpec.phased`: GSPO's sequence ratio, an entropy quantile) runs
the same phases on one rank, the inputs computed on the device between stats and apply. A row that
takes no loss runs `masked_row` in every phase.
"""

from __future__ import annotations

from . import names
from .fragments import FIRST_READ, STREAMED, KernelTerm, KTopK
from .layout import float_statistics, int_statistics, next_power_of_two, reduction_statistics, topk_width
from .reads import first_pass, last_pass, reduction_pass, reduction_values
from .signature import dense_teachers
from .tiles import NEG_INF, Tiles
from .topk import load_topk_indices, scatter_topk, topk_block


def row_program(k: Tiles) -> None:
    """The program of a row that takes a loss, in the phase of `k`."""
    {"single": single_row, "stats": stats_row, "reduce": reduce_row, "apply": apply_row}[k.phase](k)


def single_row(k: Tiles) -> None:
    """The whole row in one launch: statistics, terms, gradient, values and argmaxes."""
    load_row_inputs(k)
    first_pass(k)
    after_first_pass(k)
    tail_factors = topk_block(k) if k.layout.topk_sources else frozenset()
    if k.layout.reduction_terms:
        reduction_pass(k)
        reduction_values(k)
    last_pass(k, tail_factors)
    if k.layout.topk_sources and k.spec.gradient:
        scatter_topk(k)
    store_values(k)
    k.emit(f"tl.store(pred_ptr + row, {names.best_index()})")
    for i in range(len(k.spec.dense)):
        k.emit(f"tl.store(tpred{i}_ptr + row, {names.best_index(i)})")


def stats_row(k: Tiles) -> None:
    """Vocab parallel, phase 1: this slice's statistics, its share of the label logit and of the
    stored top-k logits (0 where another rank holds the token)."""
    load_row_inputs(k)
    first_pass(k)
    if k.spec.uses_labels:
        label, logit, held = names.LABEL, names.LABEL_LOGIT, "label_held"
        k.emit(
            f"{held} = ({label} >= vocab_start) & ({label} < vocab_start + V)",
            f"{logit} = tl.load(z_row + tl.where({held}, {label} - vocab_start, 0), mask={held}, other=0.0)"
            ".to(tl.float32)",
        )
        if k.transformed:
            k.emit(f"{logit} = tl.where({held}, {k.capped(logit)}, 0.0)")
    for i in k.layout.topk_sources:
        at = f"topz{i}_ptr + row * {topk_width(k.spec, i)} + {names.topk(i, 'slots')}"
        k.emit(f"tl.store({at}, tl.where({names.topk(i, 'held')}, {names.topk(i, 'logits')}, 0.0))")
    floats = float_statistics(k.spec, k.layout)
    for c, (name, _, _) in enumerate(floats):
        k.emit(f"tl.store(statf_ptr + row * {len(floats)} + {c}, {name})")
    ints = int_statistics(k.spec)
    for c, name in enumerate(ints):
        k.emit(f"tl.store(stati_ptr + row * {len(ints)} + {c}, {name})")


def reduce_row(k: Tiles) -> None:
    """Vocab parallel, phase 2: this slice's share of the row sums jsd, tvd and reverse KL need."""
    if k.spec.uses_labels:
        load_label(k)
    load_stats(k)
    after_first_pass(k)
    reduction_pass(k)
    sums = reduction_statistics(k.spec, k.layout)
    for c, name in enumerate(sums):
        k.emit(f"tl.store(red_ptr + row * {len(sums)} + {c}, {name})")


def apply_row(k: Tiles) -> None:
    """Vocab parallel, last phase: the terms and this slice's gradient, from combined statistics."""
    load_row_inputs(k)
    load_stats(k)
    sums = reduction_statistics(k.spec, k.layout)
    for c, name in enumerate(sums):
        k.emit(f"{name} = tl.load(red_ptr + row * {len(sums)} + {c})")
    after_first_pass(k)
    if k.layout.reduction_terms:
        reduction_values(k)
    tail_factors = topk_block(k) if k.layout.topk_sources else frozenset()
    last_pass(k, tail_factors)
    if k.layout.topk_sources and k.spec.gradient:
        scatter_topk(k)
    store_values(k)


def masked_row(k: Tiles) -> None:
    """A position that takes no loss: zero gradient, zero terms (and neutral statistics)."""
    spec = k.spec
    if k.phase == "stats":
        floats, ints = len(float_statistics(spec, k.layout)), len(int_statistics(spec))
        for buffer, count, zero in (("statf_ptr", floats, "0.0"), ("stati_ptr", ints, "0")):
            width = next_power_of_two(count)
            k.emit(
                f"tl.store({buffer} + row * {count} + tl.arange(0, {width}), {zero}, "
                f"mask=tl.arange(0, {width}) < {count})"
            )
        for i in k.layout.topk_sources:
            width = topk_width(spec, i)
            k.emit(f"tl.store(topz{i}_ptr + row * {width} + tl.arange(0, {width}), 0.0)")
        return
    if k.phase == "reduce":
        sums = reduction_statistics(spec, k.layout)
        for c in range(len(sums)):
            k.emit(f"tl.store(red_ptr + row * {len(sums)} + {c}, 0.0)")
        return
    if spec.gradient and not spec.accumulate:
        with k.src.block("for start in range(0, V, BLOCK_V):"):
            k.emit("offs = start + cols")
            zeros = "tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)"
            k.emit(f"tl.store({names.GRAD_ROW} + offs, {zeros}, mask=offs < V)")
    for column in range(spec.value_columns):
        k.emit(f"tl.store(loss_ptr + row * {spec.value_columns} + {column}, 0.0)")
    if k.phase == "single":
        k.emit("tl.store(pred_ptr + row, 0)")
        for i in range(len(spec.dense)):
            k.emit(f"tl.store(tpred{i}_ptr + row, 0)")


# --------------------------------------------------------------------------------------------------
# Steps the row programs share.
# --------------------------------------------------------------------------------------------------


def load_row_inputs(k: Tiles) -> None:
    """The row's label and its top-k teachers' stored entries, where the spec reads them."""
    if k.spec.uses_labels:
        load_label(k)
    for i in k.layout.topk_sources:
        load_topk_indices(k, i)


def load_label(k: Tiles) -> None:
    """The row's label (a global id), and its column in this row's slice as int32, -1 when the
    slice does not hold it (or it is out of range): the tile loops compare 32-bit columns."""
    label = names.LABEL
    k.emit(f"{label} = tl.load(label_ptr + row)")
    if k.sliced:
        held = f"({label} >= vocab_start) & ({label} < vocab_start + V)"
        k.emit(f"{names.LABEL_COLUMN} = tl.where({held}, {label} - vocab_start, -1).to(tl.int32)")
    else:
        k.emit(f"{names.LABEL_COLUMN} = tl.where(({label} >= 0) & ({label} < V), {label}, -1).to(tl.int32)")


def load_stats(k: Tiles) -> None:
    """The combined statistics (kept in a float64 buffer, computed with in float32)."""
    floats = float_statistics(k.spec, k.layout)
    for c, (name, _, _) in enumerate(floats):
        k.emit(f"{name} = tl.load(statf_ptr + row * {len(floats)} + {c}).to(tl.float32)")


def after_first_pass(k: Tiles) -> None:
    """log-sum-exps, the teachers' checks, the gradient scale, the label's logit and class weights,
    and the values of the terms that are known after one read."""
    log_sums(k)
    if k.phase in ("single", "apply"):
        grad_scales(k)
    if k.spec.uses_labels:
        label_logit(k)
    for t, term in enumerate(k.spec.terms):
        if isinstance(term.target, KTopK):
            continue
        stage = term.loss.value_stage(term)
        if stage == FIRST_READ:
            k.term_header(t, term, "value")
            k.emit(f"{names.value(t)} = {k.term(t).value_after_first_pass()}")
        elif stage == STREAMED:
            k.emit(f"{names.value(t)} = 0.0  # term {t}: streamed in the last pass")


def log_sums(k: Tiles) -> None:
    """Each softmax state's log and log2 sum; the student's log-sum-exps; whether each teacher's
    logits and stored log-probs are a distribution (`names.teacher_ok`, `names.topk_ok`)."""
    layout = k.layout
    for s in layout.student_slots:
        total, log_sum = names.student_sum(s), names.student_log_sum(s)
        k.emit(
            f"{log_sum} = tl.log({total})",
            f"{names.student_log2_sum(s)} = tl.log2({total})",
            f"{names.student_lse(s)} = {names.student_max(s)} + {log_sum}",
        )
    for i, s in layout.teacher_states:
        total = names.teacher_sum(i, s)
        k.emit(f"{names.teacher_log_sum(i, s)} = tl.log({total})", f"{names.teacher_log2_sum(i, s)} = tl.log2({total})")
    for i in range(len(k.spec.dense)):
        # a NaN or +inf logit, or no finite one, leaves the teacher's log-sum-exp non-finite (x - x != 0)
        _, s = next(state for state in layout.teacher_states if state[0] == i)
        lse = names.teacher_lse(i)
        k.emit(
            f"{lse} = {names.teacher_max(i, s)} + {names.teacher_log_sum(i, s)}",
            f"{names.teacher_ok(i)} = ({lse} - {lse}) == 0.0",
        )
    for i in layout.topk_sources if k.phase != "reduce" else ():
        # the same for the stored log-probs of a top-k teacher
        lse, valid, log_p = names.topk(i, "lse"), names.topk(i, "valid"), names.topk(i, "log_p")
        k.emit(
            f"{lse} = log_sum_exp(tl.where({valid}, {log_p}, {NEG_INF}))",
            f"{names.topk_ok(i)} = ({lse} - {lse}) == 0.0",
        )


def teacher_checks(term: KernelTerm) -> list[str]:
    """The per-row flags saying the teachers `term` reads are distributions."""
    checks = [names.teacher_ok(i) for i in dense_teachers(term.target)]
    if isinstance(term.target, KTopK):
        checks.append(names.topk_ok(term.target.source))
    return checks


def distinct_teacher_checks(terms: list[KernelTerm]) -> list[str]:
    """`teacher_checks` of all `terms`, each flag once: the top-k teachers', then the dense ones'."""
    topk = sorted({term.target.source for term in terms if isinstance(term.target, KTopK)})
    dense = sorted({i for term in terms for i in dense_teachers(term.target)})
    return [names.topk_ok(i) for i in topk] + [names.teacher_ok(i) for i in dense]


def grad_scales(k: Tiles) -> None:
    """The gradient's scale per row (per term group with groups): the row scale, NaN where a teacher
    that an active term reads is no distribution. A row whose teacher is not a distribution gets a NaN
    gradient, as its loss is NaN: a finite loss never hides a broken teacher, and a NaN loss never
    comes with a finite gradient. Only teachers of terms in the gradient count: a weight-0 term is
    reported, not applied. A scaled head: dl/dz = a dl/dz' with z' = a z, the factor a taken once
    per row here."""
    spec = k.spec
    factor = "" if spec.logits_scale is None else f" * {spec.logits_scale!r}"
    groups = range(spec.row_groups) if spec.grouped else (None,)
    for g in groups:
        terms = [term for t, term in enumerate(spec.terms) if term.active and (g is None or spec.group_of(t) == g)]
        checks = distinct_teacher_checks(terms)
        scale, row_scale = names.grad_scale(g), names.row_scale(g)
        if not checks:
            k.emit(f"{scale} = {row_scale}{factor}")
        elif g is None:
            k.emit(f'{scale} = tl.where({" & ".join(checks)}, {row_scale}{factor}, float("nan"))')
        else:  # a group whose row scale is 0 leaves the row alone
            ok = " & ".join(checks)
            k.emit(f'{scale} = tl.where(({ok}) | ({row_scale} == 0.0), {row_scale}{factor}, float("nan"))')


def label_logit(k: Tiles) -> None:
    """The label's logit z_y (NaN for an out-of-range label, an unchecked input, instead of an
    out-of-bounds read), and each class-weight vector's w_y and W = sum_j w_j."""
    label, logit, ok = names.LABEL, names.LABEL_LOGIT, names.LABEL_OK
    k.emit(f"{ok} = ({label} >= 0) & ({label} < VT)")
    if k.sliced:  # the combined statistics hold the label's logit
        k.emit(f'{logit} = tl.where({ok}, {logit}, float("nan"))')
    else:
        k.emit(
            f'{logit} = tl.load(z_row + tl.where({ok}, {label}, 0), mask={ok}, other=float("nan"))',
            f"{logit} = {k.capped(f'{logit}.to(tl.float32)')}",
        )
    if k.phase in ("single", "apply"):
        for c in k.spec.class_weight_vectors:
            # the label's class weight w_y (NaN for a label outside the vocab) and W = sum_j w_j
            at_label = f"cw{c}_ptr + tl.where({ok}, {label}, 0)"
            k.emit(
                f'{names.label_class_weight(c)} = tl.load({at_label}, mask={ok}, other=float("nan"))',
                f"{names.class_weight_sum(c)} = tl.load(cw_sum{c}_ptr)",
            )


def store_values(k: Tiles) -> None:
    """Each term's value at the row times its value scale (T^2 where asked), then the row's share of
    the head's loss, sum_t loss_weight_t x value_t over the terms whose loss weight is not 0 (a weight-0
    term's value may be infinite, and 0 x inf would be NaN)."""
    spec = k.spec
    count = spec.value_columns
    k.emit("row_loss = 0.0")
    for t, term in enumerate(spec.terms):
        value, scale, weight = names.value(t), names.value_scale(t), names.loss_weight(t)
        checks = teacher_checks(term)
        if checks:
            k.emit(f'{value} = tl.where({" & ".join(checks)}, {value}, float("nan"))')
        if spec.grouped:
            # the term's value where its group takes the row, 0 elsewhere; the row's loss takes each
            # term times its own group's row scale (the host does not scale this column again)
            row_scale = names.row_scale(spec.group_of(t))
            k.emit(
                f"{value} = tl.where({row_scale} != 0.0, {value} * {scale}, 0.0)",
                f"tl.store(loss_ptr + row * {count} + {t}, {value})",
                f"row_loss += tl.where({weight} != 0.0, {weight} * {value} * {row_scale}, 0.0)",
            )
            continue
        k.emit(
            f"{value} = {value} * {scale}",
            f"tl.store(loss_ptr + row * {count} + {t}, {value})",
            f"row_loss += tl.where({weight} != 0.0, {weight} * {value}, 0.0)",
        )
    k.emit(f"tl.store(loss_ptr + row * {count} + {len(spec.terms)}, row_loss)")
    store_diagnostics(k)


def store_diagnostics(k: Tiles) -> None:
    """The row diagnostics of the spec (`KernelSpec.diagnostics`), in the columns after the row's loss."""
    spec = k.spec
    column = len(spec.terms) + 1
    for t in dict.fromkeys(t for t, _ in spec.diagnostics):
        k.term_header(t, spec.terms[t], "row diagnostics")
        for value in k.term(t).row_diagnostics():
            k.emit(f"tl.store(loss_ptr + row * {spec.value_columns} + {column}, {value})")
            column += 1
