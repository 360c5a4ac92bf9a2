"""The top-k teachers of a generated kernel: their stored entries gathered into small vectors, the
terms on those vectors (tail "renormalize": softmaxes over the stored tokens; tail "bucket": k stored
buckets plus a tail bucket), and the sparse gradient entries scattered after the last pass.
"""

from __future__ import annotations

from . import names
from .fragments import KernelTerm, Vectors
from .layout import topk_width
from .tiles import NEG_INF, Tiles


def load_topk_indices(k: Tiles, i: int) -> None:
    """The stored ids and log-probs of top-k source i; `held` ids are columns of this row's slice."""
    slots, valid, index, log_p, in_vocab, held, safe, logits = (
        names.topk(i, what)
        for what in ("slots", "valid", "index", "log_p", "in_vocab", "held", "safe_column", "logits")
    )
    k.emit(
        f"{slots} = tl.arange(0, {topk_width(k.spec, i)})",
        f"{valid} = {slots} < {k.spec.topk[i]}",
        f"{index} = tl.load(k{i}_index_ptr + row * stride_k{i}_index + {slots}, mask={valid}, other=0)",
        f"{index} = {index}.to(tl.int64)",
        f"{log_p} = tl.load(k{i}_logp_ptr + row * stride_k{i}_logp + {slots}, mask={valid}, other=0.0)",
        f"{log_p} = {log_p}.to(tl.float32)",
        f"{in_vocab} = {valid} & ({index} >= 0) & ({index} < VT)",
    )
    if k.sliced:
        column = names.topk(i, "column")
        k.emit(
            f"{column} = {index} - vocab_start",
            f"{held} = {in_vocab} & ({column} >= 0) & ({column} < V)",
            f"{safe} = tl.where({held}, {column}, 0)",
        )
    else:
        k.emit(f"{held} = {in_vocab}", f"{safe} = tl.where({in_vocab}, {index}, 0)")
    if k.phase in ("single", "stats"):
        k.emit(f"{logits} = tl.load(z_row + {safe}, mask={held}, other={NEG_INF}).to(tl.float32)")
        if k.transformed:
            k.emit(f"{logits} = tl.where({held}, {k.capped(logits)}, {NEG_INF})")


def topk_block(k: Tiles) -> frozenset[int]:
    """Every top-k term's value and sparse gradient entries. Returns the bucket terms whose tail
    gradient is q_j times a per-row factor (`BucketForm.tail_factor`; see `bucket_tail_gradient`)."""
    k.emit("# top-k teachers: gather the stored entries; their terms are computed on these vectors")
    for i in k.layout.topk_sources:
        width = topk_width(k.spec, i)
        logits, in_vocab = names.topk(i, "logits"), names.topk(i, "in_vocab")
        if k.sliced:  # every rank's share, combined
            combined = f"tl.load(topz{i}_ptr + row * {width} + {names.topk(i, 'slots')})"
            k.emit(f"{logits} = tl.where({in_vocab}, {combined}, {NEG_INF})")
        k.emit(f"{names.topk(i, 'grad')} = tl.zeros([{width}], dtype=tl.float32)")
    tail_factors = set()
    for t in k.layout.topk_terms:
        term = k.spec.terms[t]
        if term.target.tail == "renormalize":
            renormalized_term(k, t, term)
        elif bucket_term(k, t, term):
            tail_factors.add(t)
    return frozenset(tail_factors)


def sparse_weight(k: Tiles, t: int) -> str:
    """What a top-k term's sparse gradient entries are multiplied by before the scatter: its weight,
    and with term groups its group's gradient scale (the scatter then applies none)."""
    if k.spec.grouped:
        return f"{names.weight(t)} * {names.grad_scale(k.spec.group_of(t))}"
    return names.weight(t)


def renormalized_term(k: Tiles, t: int, term: KernelTerm) -> None:
    i = term.target.source
    in_vocab = names.topk(i, "in_vocab")
    s = term.slot
    inv = "" if k.spec.slot_is_one[s] else f" * {names.inverse_temperature(s)}"
    # the stored log-probs at the teacher's temperature: softmax(log p / T_teacher) over the stored tokens
    u = term.target_slot
    teacher_inv = "" if k.spec.slot_is_one[u] else f" * {names.inverse_temperature(u)}"
    v = Vectors(f"stored_q_{t}", f"stored_p_{t}", f"stored_log_q_{t}", f"stored_log_p_{t}")
    k.emit(
        "# top-k, renormalize: q' and p' are softmaxes over the k stored tokens only",
        f"stored_s_{t} = tl.where({in_vocab}, {names.topk(i, 'logits')}{inv}, {NEG_INF})",
        f"{v.log_q} = stored_s_{t} - log_sum_exp(stored_s_{t})",
        f"{v.q} = fast_exp({v.log_q})",
        f"stored_u_{t} = tl.where({in_vocab}, {names.topk(i, 'log_p')}{teacher_inv}, {NEG_INF})",
        f"{v.log_p} = stored_u_{t} - log_sum_exp(stored_u_{t})",
        f"{v.p} = fast_exp({v.log_p})",
        f"usable_{t} = tl.max({in_vocab}.to(tl.int32), 0) > 0",
    )
    k.term_header(t, term, "vector")
    value, gradient = k.term(t).vector(v)
    k.emit(f"{names.value(t)} = tl.where(usable_{t}, {value}, 0.0)")
    if term.active:
        update = f"tl.where({in_vocab} & usable_{t}, {sparse_weight(k, t)} * ({gradient}), 0.0)"
        k.emit(f"{names.topk(i, 'grad')} += {update}")


def bucket_term(k: Tiles, t: int, term: KernelTerm) -> bool:
    """k stored buckets plus one tail bucket; T = 1. Returns whether the kind gave a tail factor.

    With bucket b(j) of token j and G'_b = dl/dQ_b - sum_c Q_c dl/dQ_c, dl/dz_j = q_j G'_b(j): the
    stored tokens get q_i G'_i (`sparse`, scattered after the last pass), every other token
    q_j G'_tail (written by the last pass, which skips the stored columns).
    Q_tail comes from pass 1's own softmax state of the unstored tokens, in log space: exact however
    far the tail lies below the stored mass (a confident student).
    """
    i = term.target.source
    in_vocab = names.topk(i, "in_vocab")
    m, log_sum = names.student_max(term.slot), names.student_log_sum(term.slot)
    v = Vectors(
        *(f"bucket_q_{t}", f"bucket_p_{t}", f"bucket_log_q_{t}", f"bucket_log_p_{t}"),
        *(f"tail_q_{t}", names.tail_p(t), names.tail_log_q(t), f"tail_log_p_{t}"),
    )
    tail_log_q = f"({names.tail_max(i)} - {m}) + tl.log({names.tail_sum(i)}) - {log_sum}"
    k.emit(
        "# top-k, bucket: Q_i = q at the stored tokens, Q_tail = the rest; same for the teacher's P",
        f"{v.log_q} = tl.where({in_vocab}, ({names.topk(i, 'logits')} - {m}) - {log_sum}, {NEG_INF})",
        f"{v.q} = fast_exp({v.log_q})",
        # no tail when the stored tokens cover the vocab, whatever the stored mass rounds to
        f"has_tail_{t} = tl.sum({in_vocab}.to(tl.int32), 0) < VT",
        f"{v.log_q_tail} = tl.where(has_tail_{t}, {tail_log_q}, {NEG_INF})",
        f"{v.q_tail} = fast_exp({v.log_q_tail})",
        f"{v.log_p} = tl.where({in_vocab}, {names.topk(i, 'log_p')}, {NEG_INF})",
        f"{v.p} = fast_exp({v.log_p})",
        # the teacher's tail, 1 - sum_i P_i, in float64: a confident teacher's tail lies far below
        # the 6e-8 that float32 resolves next to 1
        f"{v.p_tail} = tl.where(has_tail_{t}, tl.maximum(1.0 - tl.sum(tl.exp({v.log_p}.to(tl.float64)), 0), 0.0), 0.0)",
        f"{v.log_p_tail} = tl.log({v.p_tail}).to(tl.float32)",
        f"{v.p_tail} = {v.p_tail}.to(tl.float32)",
    )
    k.term_header(t, term, "bucket")
    form = k.term(t).bucket(v)
    k.emit(f"{names.value(t)} = {form.value}", f"sparse_grad_{t} = {form.stored}")
    if form.tail_factor:
        k.emit(f"tail_factor_{t} = {form.tail_factor}")
    if term.active:
        update = f"tl.where({in_vocab}, {sparse_weight(k, t)} * sparse_grad_{t}, 0.0)"
        k.emit(f"{names.topk(i, 'grad')} += {update}")
    return bool(form.tail_factor)


def bucket_tail_gradient(k: Tiles, t: int, term: KernelTerm, tail_factors: frozenset[int]) -> str:
    """q_j G'_tail of a bucket term at the tile's columns; 0 at the stored ones (they get `sparse`)."""
    q, lq = k.q(term.slot), k.log_q(term.slot)
    if t in tail_factors:
        tail = f"tl.where({q} > 0, {q} * tail_factor_{t}, 0.0)"
    else:
        tail = k.term(t).bucket_tail_gradient(q, lq)
    return f"tl.where({k.stored_columns(term.target.source)}, 0.0, {tail})"


def scatter_topk(k: Tiles) -> None:
    """After the last pass: the stored tokens' sparse gradient entries added to the written gradient."""
    k.emit("# the stored top-k tokens get their sparse gradient entries on top of the dense ones")
    for i in k.layout.topk_sources:
        held, safe, old, new = (names.topk(i, what) for what in ("held", "safe_column", "old_grad", "new_grad"))
        scale = "" if k.spec.grouped else f" * {names.grad_scale()}"
        k.emit(
            "tl.debug_barrier()",
            f"{old} = tl.load({names.GRAD_ROW} + {safe}, mask={held}, other=0.0).to(tl.float32)",
            f"{new} = {old} + {names.topk(i, 'grad')}{scale}{k.cap_factor(names.topk(i, 'logits'))}",
            f"{new} = round_to({new}, grad_ptr.dtype.element_ty)",
            f"tl.store({names.GRAD_ROW} + {safe}, {new}, mask={held})",
        )
