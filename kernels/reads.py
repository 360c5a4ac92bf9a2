"""The reads of the row in a generated kernel, each one tile loop:

pass 1     online max and sum-exp of every softmax state, the argmaxes and the sums that stream in
           the same read (`first_pass`), kept per lane and combined after the loop (`combine_lanes`);
pass 2     the row sums that involve p and q at once (`reduction_pass`), only where a term needs them;
last pass  the streamed values and the summed gradient, written once (`last_pass`).
"""

from __future__ import annotations

from . import names
from .fragments import KernelTerm, KTopK, LinearGradient
from .layout import reduction_statistics
from .tiles import NEG_INF, Tiles
from .topk import bucket_tail_gradient

LANE_COUNT = "[BLOCK_V // VEC]"

# --------------------------------------------------------------------------------------------------
# Pass 1.
# --------------------------------------------------------------------------------------------------


def first_pass(k: Tiles) -> None:
    """One read of the row, with every running statistic kept per lane (kernels/primitives.py):
    each softmax state's max and sum-exp, the streamed sums, and the argmax's best value and tile.
    A lane reduces its own VEC columns in registers, so the loop has no block reduction at all;
    the lanes are combined once, after the loop. A tile's lane maxima are taken once per tensor:
    the state at temperature T has max(x / T) = max(x) / T (T > 0, and rounding keeps the order)."""
    k.emit("# pass 1: online softmax statistics, argmax and the sums that stream in one read, per lane")
    open_first_pass_lanes(k)
    with k.tile_loop():
        argmax_updates(k)
        for i, s in k.layout.teacher_states:
            m, total = names.teacher_max(i, s), names.teacher_sum(i, s)
            lane_max = scaled_max(k, f"{k.teacher_tile(i)}_max", s)
            k.emit(
                f"{m}_lanes, {total}_lanes, _, _ = lane_softmax_update("
                f"{m}_lanes, {total}_lanes, {k.scaled_teacher(i, s)}, {lane_max}, VEC)"
            )
        for i in k.layout.tail_sources:
            # the softmax state of the tokens source i does not store (a bucket's tail, T = 1)
            tail = k.cached(names.topk(i, "tail_logits"), f"tl.where({k.stored_columns(i)}, {NEG_INF}, x)")
            m, total = names.tail_max(i), names.tail_sum(i)
            k.emit(
                f"{m}_lanes, {total}_lanes, _, _ = lane_softmax_update("
                f"{m}_lanes, {total}_lanes, {tail}, lane_max({tail}, VEC), VEC)"
            )
        for s in k.layout.student_slots:
            student_state_update(k, s)
    combine_lanes(k)


def open_first_pass_lanes(k: Tiles) -> None:
    """Before pass 1: the lanes of every softmax state's max and sum, the streamed sums and the argmaxes."""
    states = softmax_states(k)
    streamed = [names.moment(s) for s in k.layout.moment_slots] + [
        names.cross_moment(s, i, u) for s, i, u in k.layout.cross_moments
    ]
    for m, _ in states:
        k.emit(f"{m}_lanes = tl.full({LANE_COUNT}, {NEG_INF}, tl.float32)")
    k.open_lanes([total for _, total in states] + streamed)
    for teacher in [None, *range(len(k.spec.dense))]:
        k.emit(
            f"{names.best_value(teacher)}_lanes = tl.full({LANE_COUNT}, {NEG_INF}, tl.float32)",
            f"{names.best_start(teacher)}_lanes = tl.zeros({LANE_COUNT}, dtype=tl.int32)",
        )


def softmax_states(k: Tiles) -> list[tuple[str, str]]:
    """(max, sum) of every softmax state pass 1 keeps: the student's at each slot, each dense
    teacher's at each slot it is read at, each bucket tail's."""
    layout = k.layout
    states = [(names.student_max(s), names.student_sum(s)) for s in layout.student_slots]
    states += [(names.teacher_max(i, s), names.teacher_sum(i, s)) for i, s in layout.teacher_states]
    return states + [(names.tail_max(i), names.tail_sum(i)) for i in layout.tail_sources]


def argmax_updates(k: Tiles) -> None:
    """In pass 1: the tile's lane maxima of the raw logits, of x and of each dense teacher, and the
    running argmaxes they update."""
    raw = "z_raw" if k.transformed else "x"
    k.emit(f"{raw}_max = lane_max({raw}, VEC)")
    if k.spec.softcap is not None:
        k.emit("x_max = lane_max(x, VEC)")
    elif k.spec.logits_scale is not None:
        # a > 0 and rounding keep the order: max_j(a z_j) = a max_j(z_j), one product per lane
        k.emit(f"x_max = {k.capped('z_raw_max')}")
    best = f"{names.best_value()}_lanes, {names.best_start()}_lanes"
    k.emit(f"{best} = lane_argmax_update({best}, {raw}_max, start)")
    for i in range(len(k.spec.dense)):
        tile = k.teacher_tile(i)
        best = f"{names.best_value(i)}_lanes, {names.best_start(i)}_lanes"
        k.emit(f"{tile}_max = lane_max({tile}, VEC)", f"{best} = lane_argmax_update({best}, {tile}_max, start)")


def student_state_update(k: Tiles, s: int) -> None:
    """In pass 1: the student's softmax state at slot s, and the moments that stream beside it."""
    layout = k.layout
    xs = k.scaled_student(s)
    m, total, moment = names.student_max(s), names.student_sum(s), names.moment(s)
    rescale, exp = f"student_rescale_{s}", f"student_exp_{s}"  # of this tile's update
    if s in layout.moment_slots:
        k.emit(f"{m}_old = {m}_lanes", f"{total}_old = {total}_lanes")
    k.emit(
        f"{m}_lanes, {total}_lanes, {rescale}, {exp} = lane_softmax_update("
        f"{m}_lanes, {total}_lanes, {xs}, {scaled_max(k, 'x_max', s)}, VEC)"
    )
    if s in layout.moment_slots:
        # entropy: H = log S - sum_j exp(s_j - m) (s_j - m) / S, the sum kept like sum-exp
        k.emit(
            f"{moment}_lanes = lane_centered_moment("
            f"{moment}_lanes, {m}_old, {m}_lanes, {total}_old, {rescale}, {exp}, {xs}, VEC)"
        )
    for slot, i, teacher_slot in layout.cross_moments:
        if slot == s:
            # against one teacher: sum_j q_j (s_j - u_j) streams like sum-exp
            u = k.scaled_teacher(i, teacher_slot)
            cross = names.cross_moment(s, i, teacher_slot)
            k.emit(
                f"{cross}_lanes = {cross}_lanes * {rescale} + tl.sum(tl.where("
                f"{exp} > 0, {exp} * lanes_of({xs} - {u}, VEC), 0.0), 1)"
            )


def scaled_max(k: Tiles, lane_max: str, slot: int) -> str:
    """Lane maxima at a temperature slot from those of the unscaled tile."""
    return lane_max if k.spec.slot_is_one[slot] else f"{lane_max} * {names.inverse_temperature(slot)}"


def combine_lanes(k: Tiles) -> None:
    """After pass 1: each softmax state's lanes brought to the row's max and summed; each streamed
    sum likewise; the argmax from the lanes' bests."""
    layout = k.layout
    for m, total in softmax_states(k):
        k.emit(f"{m}, {m}_weights = lane_weights({m}_lanes)", f"{total} = tl.sum({total}_lanes * {m}_weights, 0)")
    for s in layout.moment_slots:
        m, total, moment = names.student_max(s), names.student_sum(s), names.moment(s)
        k.emit(f"{moment} = row_centered_moment({moment}_lanes, {total}_lanes, {m}_lanes, {m}, {m}_weights)")
    for s, i, u in layout.cross_moments:
        cross, weights = names.cross_moment(s, i, u), f"{names.student_max(s)}_weights"
        # a lane whose weight underflows to 0 holds no mass in float32, even if its sum is infinite
        # (a banned teacher token): it adds nothing, as an underflowed element adds nothing in a lane
        k.emit(f"{cross} = tl.sum(tl.where({weights} > 0, {cross}_lanes * {weights}, 0.0), 0)")
    for teacher in [None, *range(len(k.spec.dense))]:
        value, index, start = names.best_value(teacher), names.best_index(teacher), names.best_start(teacher)
        if teacher is None:
            row, limit = "z_row", "V"
        else:
            row = names.teacher_row(teacher)
            limit = f"tl.minimum(V, vocab_t{teacher})" if k.spec.dense[teacher].mapping == "pad" else "V"
        k.emit(f"{value}, {index} = row_argmax({value}_lanes, {start}_lanes, {row}, {limit}, BLOCK_V, VEC)")
        if k.sliced:
            k.emit(f"{index} = {index} + vocab_start")


# --------------------------------------------------------------------------------------------------
# Pass 2 (only for terms whose gradient needs a row sum over p and q).
# --------------------------------------------------------------------------------------------------


def reduction_pass(k: Tiles) -> None:
    k.emit("# pass 2: row sums that involve p and q together (needed before any gradient element)")
    sums = reduction_statistics(k.spec, k.layout)
    k.open_lanes(sums)
    with k.tile_loop():
        k.tile_body(row_sum_summands)
    k.close_lanes(sums, "=")


def row_sum_summands(k: Tiles) -> None:
    """Pass 2's tile body: each term's summands added to its row sums."""
    for t in k.layout.reduction_terms:
        term = k.spec.terms[t]
        k.term_header(t, term, "row sums")
        summands = k.term(t).row_sums()
        for name, summand in zip(term.loss.row_sum_names(term), summands, strict=True):
            k.add_to_lanes(names.row_sum(name, t), summand)


def reduction_values(k: Tiles) -> None:
    """The values of the terms pass 2 sums up."""
    for t in k.layout.reduction_terms:
        k.emit(f"{names.value(t)} = {k.term(t).value_from_row_sums()}")


# --------------------------------------------------------------------------------------------------
# Last pass: streamed term values and the gradient.
# --------------------------------------------------------------------------------------------------


def last_pass(k: Tiles, tail_factors: frozenset[int]) -> None:
    """The streamed values and, when the spec writes one, the gradient (`tail_factors`: see
    `topk.topk_block`)."""
    spec = k.spec
    streamed = list(k.layout.streamed_terms)
    if not spec.gradient and not streamed:
        return

    def body(tiles: Tiles) -> None:
        terms_in_last_pass(tiles, tail_factors)

    k.open_lanes([names.value(t) for t in streamed])
    if not spec.gradient:
        k.emit("# last pass: the values that stream (no gradient is asked for)")
        with k.tile_loop():
            k.tile_body(body)
    else:
        gradient_weights(k)
        k.emit("# last pass: streamed values and the summed gradient, written once")
        with k.tile_loop():
            k.emit(f"{names.GRAD} = tl.zeros([BLOCK_V], dtype=tl.float32)")
            k.tile_body(body)
            if spec.softcap is not None:
                # dl/dz = dl/dz' (1 - tanh^2(z / c)), z' = c tanh(z / c) the capped logit in x
                k.emit(f"{names.GRAD} = {names.GRAD} * {k.cap_derivative('x')}")
            if spec.accumulate:
                earlier = f"tl.load({names.GRAD_ROW} + offs, mask={names.IN_VOCAB}, other=0.0).to(tl.float32)"
                k.emit(f"{names.GRAD} += {earlier}")
            rounded = f"round_to({names.GRAD}, grad_ptr.dtype.element_ty)"
            k.emit(f"tl.store({names.GRAD_ROW} + offs, {rounded}, mask={names.IN_VOCAB})")
    k.close_lanes([names.value(t) for t in streamed], "+=")
    for t in streamed:
        if spec.terms[t].loss.streams_in_bits:
            k.emit(f"{names.value(t)} = {names.value(t)} * LN2  # summed in bits")


def gradient_weights(k: Tiles) -> None:
    """Each active term's weight times the row's scale, once per row rather than once per element."""
    spec = k.spec
    for t, term in enumerate(spec.terms):
        if term.active:
            scale = names.grad_scale(spec.group_of(t) if spec.grouped else None)
            k.emit(f"{names.gradient_weight(t)} = {names.weight(t)} * {scale}")


def terms_in_last_pass(k: Tiles, tail_factors: frozenset[int]) -> None:
    """The last pass's tile body: every term's streamed summand and gradient, the gradients that are
    sums of vectors gathered by vector, the label's part on the label's column."""
    linear: dict[str, list[str]] = {}  # vector -> its coefficients over the terms, times their weights
    at_label: list[str] = []
    for t, term in enumerate(k.spec.terms):
        term_in_last_pass(k, t, term, tail_factors, linear, at_label)
    if linear or at_label:
        k.comment("the terms' gradients that are sums of vectors, each vector's coefficients added up")
    for vector, coefficients in linear.items():
        k.emit(f"{names.GRAD} += ({' + '.join(coefficients)}) * {vector}")
    label = k.onehot() if at_label else "False"
    if label != "False":
        k.emit(f"{names.GRAD} += tl.where({label}, {' + '.join(at_label)}, 0.0)")


def term_in_last_pass(
    k: Tiles,
    t: int,
    term: KernelTerm,
    tail_factors: frozenset[int],
    linear: dict[str, list[str]],
    at_label: list[str],
) -> None:
    """The term's streamed value (if it streams) and its gradient (if it is active); a gradient that
    is a `LinearGradient` goes into `linear` and `at_label` (see `terms_in_last_pass`)."""
    weight = names.gradient_weight(t)
    if isinstance(term.target, KTopK):
        if term.target.tail == "bucket" and term.active:
            k.emit(f"# term {t} ({term.loss.name}): the tail's part of the bucket gradient, q_j G'_tail (T = 1)")
            k.emit(f"{names.GRAD} += {weight} * {bucket_tail_gradient(k, t, term, tail_factors)}")
        return
    streams = t in k.layout.streamed_terms
    if streams or term.active:
        k.term_header(t, term, *(["value"] if streams else []), *(["gradient"] if term.active else []))
    if streams:
        k.add_to_lanes(names.value(t), k.term(t).streamed_value())
    if not term.active:
        return
    gradient = k.term(t).gradient()
    if isinstance(gradient, LinearGradient):
        for coefficient, vector in gradient.parts:
            linear.setdefault(vector, []).append(f"{weight} * {coefficient}")
        if gradient.at_label is not None:
            at_label.append(f"{weight} * {gradient.at_label}")
    else:
        # the gradient is an operand of this product (scope.factor): the weight's factors fold into one per row
        k.emit(f"{names.GRAD} += {weight} * {gradient}")
