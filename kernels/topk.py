"""The top-k teachers of a generated kernel: their stored entries gathered into small vectors, the
terms on those vectors (tail "renormalize": softmaxes over the stored tokens; tail "bucket": k stored
buckets plus a tail bucket), and the sparse gradient entries scattered after the last pass.
"""

from __future__ import annotations

from .fragments import KernelTerm, Vectors
from .layout import topk_width
from .tiles import NEG_INF, Tiles


def load_topk_indices(k: Tiles, i: int) -> None:
    """The stored ids and log-probs of top-k source i; `held` ids are columns of this row's slice."""
    top = k.spec.topk[i]
    k.emit(
        f"kk{i} = tl.arange(0, {topk_width(k.spec, i)})",
        f"kmask{i} = kk{i} < {top}",
        f"index{i} = tl.load(k{i}_index_ptr + row * stride_k{i}_index + kk{i}, mask=kmask{i}, other=0)",
        f"index{i} = index{i}.to(tl.int64)",
        f"stored_lp{i} = tl.load(k{i}_logp_ptr + row * stride_k{i}_logp + kk{i}, mask=kmask{i}, other=0.0)",
        f"stored_lp{i} = stored_lp{i}.to(tl.float32)",
        f"in_vocab{i} = kmask{i} & (index{i} >= 0) & (index{i} < VT)",
    )
    if k.sliced:
        k.emit(
            f"column{i} = index{i} - vocab_start",
            f"held{i} = in_vocab{i} & (column{i} >= 0) & (column{i} < V)",
            f"safe{i} = tl.where(held{i}, column{i}, 0)",
        )
    else:
        k.emit(f"held{i} = in_vocab{i}", f"safe{i} = tl.where(in_vocab{i}, index{i}, 0)")
    if k.phase in ("single", "stats"):
        k.emit(f"z_top{i} = tl.load(z_row + safe{i}, mask=held{i}, other={NEG_INF}).to(tl.float32)")
        if k.transformed:
            k.emit(f"z_top{i} = tl.where(held{i}, {k.capped(f'z_top{i}')}, {NEG_INF})")


def topk_block(k: Tiles) -> frozenset[int]:
    """Every top-k term's value and sparse gradient entries. Returns the bucket terms whose tail
    gradient is q_j times a per-row factor (`BucketForm.tail_factor`; see `bucket_tail_gradient`)."""
    k.emit("# top-k teachers: gather the stored entries; their terms are computed on these vectors")
    for i in k.layout.topk_sources:
        width = topk_width(k.spec, i)
        if k.sliced:  # every rank's share, combined
            k.emit(f"z_top{i} = tl.where(in_vocab{i}, tl.load(topz{i}_ptr + row * {width} + kk{i}), {NEG_INF})")
        k.emit(f"delta{i} = tl.zeros([{width}], dtype=tl.float32)")
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
        return f"w{t} * grad_scale{k.spec.group_of(t)}"
    return f"w{t}"


def renormalized_term(k: Tiles, t: int, term: KernelTerm) -> None:
    i = term.target.source
    s = term.slot
    inv = "" if k.spec.slot_is_one[s] else f" * inv_t{s}"
    # the stored log-probs at the teacher's temperature: softmax(log p / T_teacher) over the stored tokens
    u = term.target_slot
    teacher_inv = "" if k.spec.slot_is_one[u] else f" * inv_t{u}"
    k.emit(
        "# top-k, renormalize: q' and p' are softmaxes over the k stored tokens only",
        f"a{t} = tl.where(in_vocab{i}, z_top{i}{inv}, {NEG_INF})",
        f"lq{t} = a{t} - log_sum_exp(a{t})",
        f"qv{t} = fast_exp(lq{t})",
        f"b{t} = tl.where(in_vocab{i}, stored_lp{i}{teacher_inv}, {NEG_INF})",
        f"lp{t} = b{t} - log_sum_exp(b{t})",
        f"pv{t} = fast_exp(lp{t})",
        f"usable{t} = tl.max(in_vocab{i}.to(tl.int32), 0) > 0",
    )
    k.term_header(t, term, "vector")
    value, gradient = term.loss.vector(k, t, term, Vectors(f"qv{t}", f"pv{t}", f"lq{t}", f"lp{t}"))
    k.emit(f"loss{t} = tl.where(usable{t}, {value}, 0.0)")
    if term.active:
        k.emit(f"delta{i} += tl.where(in_vocab{i} & usable{t}, {sparse_weight(k, t)} * ({gradient}), 0.0)")


def bucket_term(k: Tiles, t: int, term: KernelTerm) -> bool:
    """k stored buckets plus one tail bucket; T = 1. Returns whether the kind gave a tail factor.

    With bucket b(j) of token j and G'_b = dl/dQ_b - sum_c Q_c dl/dQ_c, dl/dz_j = q_j G'_b(j): the
    stored tokens get q_i G'_i (`sparse`, scattered after the last pass), every other token
    q_j G'_tail (written by the last pass, which skips the stored columns).
    Q_tail comes from pass 1's own softmax state of the unstored tokens, in log space: exact however
    far the tail lies below the stored mass (a confident student).
    """
    i = term.target.source
    s = term.slot
    k.emit(
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
    k.term_header(t, term, "bucket")
    vectors = Vectors(f"Q{t}", f"P{t}", f"lQ{t}", f"lP{t}", f"Qt{t}", f"Pt{t}", f"lQt{t}", f"lPt{t}")
    form = term.loss.bucket(k, t, term, vectors)
    k.emit(f"loss{t} = {form.value}", f"sparse{t} = {form.stored}")
    if form.tail_factor:
        k.emit(f"gt{t} = {form.tail_factor}")
    if term.active:
        k.emit(f"delta{i} += tl.where(in_vocab{i}, {sparse_weight(k, t)} * sparse{t}, 0.0)")
    return bool(form.tail_factor)


def bucket_tail_gradient(k: Tiles, t: int, term: KernelTerm, tail_factors: frozenset[int]) -> str:
    """q_j G'_tail of a bucket term at the tile's columns; 0 at the stored ones (they get `sparse`)."""
    q, lq = k.q(term.slot), k.log_q(term.slot)
    if t in tail_factors:
        tail = f"tl.where({q} > 0, {q} * gt{t}, 0.0)"
    else:
        tail = term.loss.bucket_tail_gradient(k, t, term, q, lq)
    return f"tl.where({k.stored_columns(term.target.source)}, 0.0, {tail})"


def scatter_topk(k: Tiles) -> None:
    """After the last pass: the stored tokens' sparse gradient entries added to the written gradient."""
    k.emit("# the stored top-k tokens get their sparse gradient entries on top of the dense ones")
    for i in k.layout.topk_sources:
        k.emit(
            "tl.debug_barrier()",
            f"old{i} = tl.load(g_row + safe{i}, mask=held{i}, other=0.0).to(tl.float32)",
            f"new{i} = old{i} + delta{i}{'' if k.spec.grouped else ' * grad_scale'}{k.cap_factor(f'z_top{i}')}",
            f"new{i} = round_to(new{i}, grad_ptr.dtype.element_ty)",
            f"tl.store(g_row + safe{i}, new{i}, mask=held{i})",
        )
