"""The names of the variables a generated kernel shares between its parts, declared in one place.

The generator and every kind's fragments write Triton source as text; where one part reads what
another wrote (a softmax state's statistics, a term's value, its weight), both take the name from
here. Names local to one fragment (its own temporaries) are that fragment's business; they carry the
term's index so that two terms never collide.

A name says what it holds: its owner (`student`, `teacher{i}` for dense teacher i, `topk{i}` for top-k
teacher i), then what it is, then the temperature slot it is taken at (`student_max_1`), or the index
of the term it belongs to (`grad_weight_0`).
"""

from __future__ import annotations

#: the row's label (int64, a global token id): only in kernels that read labels
LABEL = "label"
#: the label's column in the row's vocab slice (int32), -1 where the slice does not hold it
LABEL_COLUMN = "label_column"
#: the logit at the label (float32), as the terms see it (scaled and capped)
LABEL_LOGIT = "label_logit"
#: the label is a token id of the vocab (an unchecked input may not be)
LABEL_OK = "label_ok"
#: in a tile loop: True at the label's column
IS_LABEL = "is_label"
#: the tile of the gradient dl/dz the last pass sums the terms into, and the row it is written to
GRAD = "grad"
GRAD_ROW = "grad_row"
#: the whole vocabulary's size (in float32), e.g. for epsilon / V
VOCAB_FLOAT = "Vf"
#: the tile's columns inside the row's vocab slice
IN_VOCAB = "in_v"


def inverse_temperature(slot: int) -> str:
    """1 / T of a temperature slot (a run-time argument)."""
    return f"inverse_temperature_{slot}"


def student_max(slot: int) -> str:
    """Running max of the student's scaled logits s = z / T."""
    return f"student_max_{slot}"


def student_sum(slot: int) -> str:
    """sum_j exp(s_j - max)."""
    return f"student_sum_{slot}"


def student_log_sum(slot: int) -> str:
    """log of `student_sum`: log q_j = (s_j - max) - log_sum."""
    return f"student_log_sum_{slot}"


def student_log2_sum(slot: int) -> str:
    """log2 of `student_sum`: log2 q_j = (s_j - max) log2(e) - log2_sum."""
    return f"student_log2_sum_{slot}"


def student_lse(slot: int) -> str:
    """logsumexp of the student's scaled logits."""
    return f"student_lse_{slot}"


def moment(slot: int) -> str:
    """sum_j exp(s_j - max) (s_j - max): the student's entropy is log_sum - moment / sum."""
    return f"student_moment_{slot}"


def cross_moment(slot: int, teacher: int, teacher_slot: int | None = None) -> str:
    """sum_j exp(s_j - max) (s_j - u_j) against dense teacher u, read at `teacher_slot` (default: the
    same slot as the student)."""
    suffix = "" if teacher_slot is None or teacher_slot == slot else f"_{teacher_slot}"
    return f"cross_moment_teacher{teacher}_{slot}{suffix}"


def teacher_max(teacher: int, slot: int) -> str:
    """Running max of dense teacher `teacher`'s scaled logits u = z_teacher / T."""
    return f"teacher{teacher}_max_{slot}"


def teacher_sum(teacher: int, slot: int) -> str:
    """sum_j exp(u_j - max) of the teacher at the slot."""
    return f"teacher{teacher}_sum_{slot}"


def teacher_log_sum(teacher: int, slot: int) -> str:
    return f"teacher{teacher}_log_sum_{slot}"


def teacher_log2_sum(teacher: int, slot: int) -> str:
    return f"teacher{teacher}_log2_sum_{slot}"


def teacher_lse(teacher: int) -> str:
    """logsumexp of the teacher's logits at its first slot (finite iff the teacher is a distribution)."""
    return f"teacher{teacher}_lse"


def teacher_ok(teacher: int) -> str:
    """The dense teacher's logits are a distribution at this row (no NaN or +inf, some finite)."""
    return f"teacher{teacher}_ok"


def teacher_row(teacher: int) -> str:
    """The pointer to dense teacher `teacher`'s logits of this row."""
    return f"teacher{teacher}_row"


def topk(source: int, what: str) -> str:
    """A per-row vector or scalar of top-k teacher `source` (kernels/topk.py says which): its stored
    ids (`index`), their log-probs (`log_p`), which are ids of the vocab (`in_vocab`) and columns of
    this row's slice (`held`, at `column`), the student's logits there (`logits`), ..."""
    return f"topk{source}_{what}"


def topk_ok(source: int) -> str:
    """The top-k teacher's stored log-probs are a distribution at this row."""
    return f"topk{source}_ok"


def tail_max(source: int) -> str:
    """Running max of the student's logits at the columns top-k source `source` does not store (T = 1)."""
    return f"topk{source}_tail_max"


def tail_sum(source: int) -> str:
    """sum_j exp(z_j - tail max) over those columns: with the max, the tail bucket's softmax state."""
    return f"topk{source}_tail_sum"


def tail_log_q(term: int) -> str:
    """log Q_tail of a top-k bucket term: the student's mass off the stored tokens, in log space (the
    term's `Vectors.log_q_tail`)."""
    return f"tail_log_q_{term}"


def tail_p(term: int) -> str:
    """P_tail of a top-k bucket term: the teacher's mass off the stored tokens (`Vectors.p_tail`)."""
    return f"tail_p_{term}"


def best_value(teacher: int | None = None) -> str:
    """The row's largest logit: the student's, or dense teacher `teacher`'s."""
    return "best_value" if teacher is None else f"teacher{teacher}_best_value"


def best_index(teacher: int | None = None) -> str:
    """The column (a global token id) of `best_value`: the argmax."""
    return "best_index" if teacher is None else f"teacher{teacher}_best_index"


def best_start(teacher: int | None = None) -> str:
    """Per lane in pass 1: the start of the tile holding the lane's `best_value`."""
    return "best_start" if teacher is None else f"teacher{teacher}_best_start"


def row_scale(group: int | None = None) -> str:
    """The row's scale (its positions' weight / the normalizer), or term group `group`'s."""
    return "row_scale" if group is None else f"row_scale_{group}"


def grad_scale(group: int | None = None) -> str:
    """The row's scale as the gradient takes it: NaN where a teacher of an active term is no
    distribution, times the head's logits scale."""
    return "grad_scale" if group is None else f"grad_scale_{group}"


def label_class_weight(vector: int) -> str:
    """w_y of class-weight vector `vector` (per row)."""
    return f"label_class_weight_{vector}"


def class_weight_sum(vector: int) -> str:
    """W = sum_j w_j of class-weight vector `vector` (the same for every row)."""
    return f"class_weight_sum_{vector}"


def weight(term: int) -> str:
    """The term's run-time gradient weight (weight x head weight x T^2 if scaled / T; an argument)."""
    return f"weight_{term}"


def value_scale(term: int) -> str:
    """What the term's value is reported times (T^2 where asked, else 1; an argument)."""
    return f"value_scale_{term}"


def loss_weight(term: int) -> str:
    """The term's weight in the head's loss (an argument; 0 leaves it out)."""
    return f"loss_weight_{term}"


def value(term: int) -> str:
    """The term's value at this row (unweighted)."""
    return f"value_{term}"


def gradient_weight(term: int) -> str:
    """The term's run-time weight times the row's scale: what multiplies its dl/ds."""
    return f"grad_weight_{term}"


def row_sum(name: str, term: int) -> str:
    """A row sum a term's fragment asked the second read for (`LossFragments.row_sums`)."""
    return f"{name}_{term}"


def row_input(term: int, name: str) -> str:
    """The pointer to per-row input `name` of term `term` ([N] float32), computed across rows between the
    stats and apply phases (`LossFragments.row_inputs`)."""
    return f"term{term}_{name}_ptr"
