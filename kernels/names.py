"""The names of the variables a generated kernel shares between its parts, declared in one place.

The generator and every kind's fragments write Triton source as text; where one part reads what
another wrote (a softmax state's statistics, a term's value, its weight), both take the name from
here. Names local to one fragment (its own temporaries) are that fragment's business; they carry the
term's index so that two terms never collide.
"""

from __future__ import annotations

#: the row's labels (int) and the logit at the label (float32): only in kernels that read labels
LABEL = "y"
LABEL_LOGIT = "z_label"
#: the whole vocabulary's size (in float32), e.g. for epsilon / V
VOCAB_FLOAT = "Vf"
#: the tile's columns inside the row's vocab slice
IN_VOCAB = "in_v"


def inverse_temperature(slot: int) -> str:
    """1 / T of a temperature slot (a run-time argument)."""
    return f"inv_t{slot}"


def student_max(slot: int) -> str:
    """Running max of the student's scaled logits s = z / T."""
    return f"m_s{slot}"


def student_sum(slot: int) -> str:
    """sum_j exp(s_j - max)."""
    return f"sum_s{slot}"


def student_log_sum(slot: int) -> str:
    """log of `student_sum`: log q_j = (s_j - max) - log_sum."""
    return f"log_sum_s{slot}"


def student_log2_sum(slot: int) -> str:
    """log2 of `student_sum`: log2 q_j = (s_j - max) log2(e) - log2_sum."""
    return f"log2_sum_s{slot}"


def student_lse(slot: int) -> str:
    """logsumexp of the student's scaled logits."""
    return f"lse_s{slot}"


def moment(slot: int) -> str:
    """sum_j exp(s_j - max) (s_j - max): the student's entropy is log_sum - moment / sum."""
    return f"moment_s{slot}"


def cross_moment(slot: int, teacher: int, teacher_slot: int | None = None) -> str:
    """sum_j exp(s_j - max) (s_j - u_j) against dense teacher u, read at `teacher_slot` (default: the
    same slot as the student)."""
    suffix = "" if teacher_slot is None or teacher_slot == slot else f"_{teacher_slot}"
    return f"cross_s{slot}_t{teacher}{suffix}"


def teacher_max(teacher: int, slot: int) -> str:
    return f"m_t{teacher}_{slot}"


def teacher_sum(teacher: int, slot: int) -> str:
    return f"sum_t{teacher}_{slot}"


def teacher_log_sum(teacher: int, slot: int) -> str:
    return f"log_sum_t{teacher}_{slot}"


def teacher_log2_sum(teacher: int, slot: int) -> str:
    return f"log2_sum_t{teacher}_{slot}"


def value(term: int) -> str:
    """The term's value at this row (unweighted)."""
    return f"loss{term}"


def gradient_weight(term: int) -> str:
    """The term's run-time weight times the row's scale: what multiplies its dl/ds."""
    return f"gw{term}"


def row_sum(name: str, term: int) -> str:
    """A row sum a term's fragment asked the second read for (`LossFragments.row_sums`)."""
    return f"{name}{term}"
