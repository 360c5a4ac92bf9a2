"""Fusion planning: the kernel launches of every head, their softmax states, passes and bytes.

All terms bound to one head read the same logits, so they form one fused group, run as one launch.
Within a launch, terms with equal temperatures share one student softmax state ("slot"), and each
dense teacher keeps one state per temperature it is read at (a term's own, or its
`teacher_temperature`, which gets a slot of its own when no term's temperature equals it). A head is
split into several launches only when it reads more dense teachers than one launch streams
(MAX_TEACHERS_PER_LAUNCH); the plan says so, and later launches add to the gradient of the first.
Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..kernels.layout import KernelLayout, kernel_layout
from ..kernels.signature import DenseTeacher, KernelSpec, KernelTerm
from ..kinds import leaf_form, loss_kind
from ..kinds.source import DENSE, TOPK, LaunchIndex
from ..spec.describe import scheduled
from ..spec.schedules import FIXED_ONE, temperature_key
from .plan import DenseTarget, HeadPlan, Plan, Target, Term, TopKTarget, target_leaves

# Tiles of the student and of every dense teacher live in registers together; past this many
# teachers per launch, tiles get too narrow (or spill) and a head is split into several launches.
MAX_TEACHERS_PER_LAUNCH = 4

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Default budget for one chunk of a hidden-input head's logits (student and teachers given as hidden).
CHUNK_BYTES = 256 * 1024 * 1024


def chunk_rows(vocab: int, linear_teacher_vocabs: list[int], element_bytes: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's logits fit in `budget` bytes (a power of two, at least 1)."""
    per_row = element_bytes * (vocab + sum(linear_teacher_vocabs))
    rows = max(1, budget // per_row)
    return 1 << (rows.bit_length() - 1)


def peak_extra_bytes(
    rows: int, hidden: int, vocab: int, linear_teacher_vocabs: list[int], element_bytes: int, chunk: int, fp32: bool
) -> int:
    """Memory a hidden-input head allocates beyond its inputs: its gradients plus one chunk of logits."""
    gradients = rows * hidden * element_bytes + vocab * hidden * (4 if fp32 else element_bytes)
    return gradients + min(chunk, rows) * element_bytes * (vocab + sum(linear_teacher_vocabs))


def _uses_fixed_one(term: Term) -> bool:
    """The term reads the logits at temperature 1 whatever it says: its kind (z_loss), or a bucket tail."""
    if loss_kind(term.kind).fragments.fixed_temperature_one:
        return True
    return term.target is not None and term.target.form == TOPK and term.target.tail == "bucket"


def _teacher_temperature(term: Term) -> object | None:
    """The temperature the term's target teachers are read at, where it differs from the student's
    (the loss node's `teacher_temperature`); None when the target is read at the term's own slot."""
    teacher = term.teacher_temperature
    if teacher is None or _uses_fixed_one(term) or temperature_key(teacher) == temperature_key(term.temperature):
        return None
    return teacher


@dataclass(frozen=True)
class SoftmaxState:
    """One online-softmax state of a launch: a tensor at a temperature."""

    tensor: str  # "student" or a teacher's name
    temperature: str  # as written, e.g. "2" or "linear 1 -> 2 over 1000 steps"


@dataclass(frozen=True)
class SlotSource:
    """Whose temperature a run-time slot of a launch holds: term `term`'s (an index among the launch's
    terms, or the head's once the runtime maps it), or its `teacher_temperature` when only the target's
    teachers are read at that slot."""

    term: int
    teacher: bool = False


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a head."""

    head: str
    index: int
    terms: tuple[Term, ...]
    slots: tuple[object, ...]  # temperature value (number or schedule) of each slot
    dense: tuple[DenseTarget, ...]
    topk: tuple[TopKTarget, ...]
    vocab_size: int
    accumulate: bool
    notes: tuple[str, ...]
    softcap: float | None = None  # the head's logit soft-cap, applied inside the kernel
    logits_scale: float | None = None  # the head's logits scale factor, applied inside the kernel (before the cap)
    layout: KernelLayout | None = None  # of the launch's kernel with every term active (set by _launch)
    row_groups: int = 1  # the head's term groups (positions and normalizer): row-scale columns
    class_weights: tuple[str, ...] = ()  # the run-time class-weight vectors its terms read (cw{c}_ptr)
    # per slot: the term whose temperature it holds; None: the constant 1 (set by _launch)
    slot_sources: tuple[SlotSource | None, ...] = ()
    others: tuple[Target, ...] = ()  # leaves of other forms with a run-time value (a plugin's): kernel arguments

    def kernel_spec(self, active: tuple[bool, ...] | None = None) -> KernelSpec:
        """The KernelSpec for this launch; `active[t]` False leaves term t out of the gradient."""
        active = active or (True,) * len(self.terms)
        keys = [temperature_key(value) for value in self.slots]
        index = LaunchIndex.of((*self.dense, *self.topk, *self.others))

        def target(term: Term):
            if term.target is None:
                return None
            if term.class_weights is not None:
                return term.target.class_weighted(self.class_weights.index(term.class_weights))
            return term.target.kernel_target(index)

        terms = tuple(
            KernelTerm(
                loss=loss_kind(term.kind).kernel_fragments(term),
                target=target(term),
                slot=keys.index(FIXED_ONE if _uses_fixed_one(term) else temperature_key(term.temperature)),
                constants=term.constants,
                active=is_active,
                teacher_slot=None if teacher is None else keys.index(temperature_key(teacher)),
            )
            for term, is_active, teacher in zip(self.terms, active, map(_teacher_temperature, self.terms))
        )
        dense = tuple(
            DenseTeacher("same" if t.vocab_size == self.vocab_size else t.vocab_map or "same") for t in self.dense
        )
        return KernelSpec(
            terms=terms,
            slot_is_one=tuple(key == FIXED_ONE for key in keys),
            dense=dense,
            topk=tuple(t.k for t in self.topk),
            accumulate=self.accumulate,
            softcap=self.softcap,
            **(
                {"row_groups": self.row_groups, "term_groups": tuple(term.group for term in self.terms)}
                if self.row_groups > 1
                else {}
            ),
            logits_scale=self.logits_scale,
        )

    @property
    def passes(self) -> int:
        """Reads of the logits row: 2, or 3 when a term needs a row sum over p and q first."""
        return self.layout.passes

    @property
    def softmaxes(self) -> tuple[SoftmaxState, ...]:
        states = [SoftmaxState("student", scheduled(self.slots[s])) for s in self.layout.student_slots]
        states += [SoftmaxState(self.dense[i].name, scheduled(self.slots[s])) for i, s in self.layout.teacher_states]
        return tuple(states)

    def bytes_per_token(self, logits_bytes: int, vocab: int | None = None) -> int:
        """Bytes this launch moves per token: every pass's reads, the gradient write, top-k traffic.

        Teachers are counted at the logits' element size. `vocab` replaces every vocab size of the
        graph (to estimate a file written for a small vocab at a production one).
        """
        head_vocab = vocab or self.vocab_size
        total = 0
        for reads in self.layout.pass_reads:
            total += head_vocab * logits_bytes
            total += sum(min(head_vocab, vocab or self.dense[i].vocab_size) * logits_bytes for i in reads)
        total += head_vocab * logits_bytes * (2 if self.accumulate else 1)  # gradient write (and read)
        total += sum(t.k * (8 + 4 + 2 * logits_bytes) for t in self.topk)
        return total


@dataclass(frozen=True)
class FusionPlan:
    """Every launch of every head, in execution order."""

    launches: tuple[Launch, ...]

    def for_head(self, head: str) -> tuple[Launch, ...]:
        return tuple(launch for launch in self.launches if launch.head == head)


def floor_bytes_per_token(plan: Plan, logits_bytes: int, vocab: int | None = None) -> int:
    """What a perfect implementation moves per token: each logits and teacher row read once, each
    gradient row written once, top-k entries read once."""
    total = 0
    for head in plan.heads:
        if not head.terms:
            continue
        head_vocab = vocab or head.vocab_size
        total += 2 * head_vocab * logits_bytes
        for teacher in head.teachers:
            total += teacher.read_bytes(head_vocab, vocab, logits_bytes)
    return total


def estimate(
    plan: Plan,
    fusion: FusionPlan,
    *,
    tokens: int,
    dtype: str,
    bandwidth: float,
    vocab: int | None = None,
    hidden: int | None = None,
    flops: float | None = None,
) -> dict[str, object]:
    """Per launch and in total: passes, bytes moved and the time they take at `bandwidth` (bytes/s).

    For heads declared `input: hidden`, also the chunking, the peak extra memory and the matmuls'
    time at `flops` (FLOP/s), with hidden size `hidden` (teachers assumed given as hidden states too).
    """
    size = DTYPE_BYTES[dtype]
    launches = []
    for launch in fusion.launches:
        per_token = launch.bytes_per_token(size, vocab)
        head = plan.head(launch.head)
        chunking = None
        if head.hidden_input and launch.index == 0:
            head_vocab = vocab or head.vocab_size
            teachers = [vocab or t.vocab_size for t in head.teachers if t.form == DENSE]
            rows = chunk_rows(head_vocab, teachers, size)
            chunking = {"chunk_rows": rows, "chunks": -(-tokens // rows)}
            if hidden:
                chunking["peak_extra_bytes"] = peak_extra_bytes(tokens, hidden, head_vocab, teachers, size, rows, False)
                matmul = 2 * tokens * hidden * (3 * head_vocab + sum(teachers))
                chunking["matmul_flop"] = matmul
                if flops:
                    chunking["matmul_milliseconds"] = matmul / flops * 1e3
        launches.append(
            {
                "chunking": chunking,
                "head": launch.head,
                "launch": launch.index + 1,
                "terms": [term.key for term in launch.terms],
                "softmaxes": [{"tensor": s.tensor, "temperature": s.temperature} for s in launch.softmaxes],
                "teachers": [t.name for t in launch.dense] + [t.name for t in launch.topk],
                "passes": launch.passes,
                "accumulates": launch.accumulate,
                "notes": list(launch.notes),
                "bytes_per_token": per_token,
                "bytes": per_token * tokens,
                "milliseconds": per_token * tokens / bandwidth * 1e3,
            }
        )
    total = sum(entry["bytes"] for entry in launches)
    floor = floor_bytes_per_token(plan, size, vocab) * tokens
    return {
        "tokens": tokens,
        "dtype": dtype,
        "bandwidth_bytes_per_second": bandwidth,
        "vocab_override": vocab,
        "hidden": hidden,
        "launches": launches,
        "kernel_launches": len(launches),
        "bytes": total,
        "milliseconds": total / bandwidth * 1e3,
        "floor_bytes": floor,
        "floor_milliseconds": floor / bandwidth * 1e3,
        "ratio_to_floor": total / floor if floor else None,
    }


def _dense_of(term: Term) -> list[DenseTarget]:
    if term.target is None:
        return []
    return [leaf for leaf in target_leaves(term.target) if leaf.form == DENSE]


def _launch(head: HeadPlan, index: int, terms: list[Term], notes: list[str]) -> Launch:
    slots: list[object] = []
    keys: list[tuple[str, object]] = []
    for term in terms:
        value = 1.0 if _uses_fixed_one(term) else term.temperature
        if temperature_key(value) not in keys:
            keys.append(temperature_key(value))
            slots.append(value)
    # the temperatures only a target's teachers are read at (teacher_temperature), after the students'
    for term in terms:
        value = _teacher_temperature(term)
        if value is not None and temperature_key(value) not in keys:
            keys.append(temperature_key(value))
            slots.append(value)
    dense: dict[str, DenseTarget] = {}
    topk: dict[str, TopKTarget] = {}
    others: dict[str, Target] = {}
    for term in terms:
        for leaf in target_leaves(term.target) if term.target is not None else []:
            if leaf.form == DENSE:
                dense.setdefault(leaf.name, leaf)
            elif leaf.form == TOPK:
                topk.setdefault(leaf.name, leaf)
            elif leaf_form(leaf.form).takes_value:
                others.setdefault(leaf.name, leaf)
    launch = Launch(
        head=head.name,
        index=index,
        terms=tuple(terms),
        slots=tuple(slots),
        dense=tuple(dense.values()),
        topk=tuple(topk.values()),
        vocab_size=head.vocab_size,
        accumulate=index > 0,
        notes=tuple(notes),
        softcap=head.softcap,
        row_groups=len(head.groups),
        logits_scale=head.logits_scale,
        class_weights=tuple(dict.fromkeys(t.class_weights for t in terms if t.class_weights is not None)),
        others=tuple(others.values()),
    )
    spec = launch.kernel_spec()
    if spec.phased:
        phased = [launch.terms[t].key for t in dict.fromkeys(t for t, _ in spec.row_inputs)]
        notes.append(
            f"runs in phases (statistics, then {', '.join(phased)}'s quantities across rows on the device, then "
            "the terms and the gradient): the same reads of the logits, two launches, no host sync"
        )
    return replace(launch, notes=tuple(notes), layout=kernel_layout(spec), slot_sources=_slot_sources(spec))


def _slot_sources(spec: KernelSpec) -> tuple[SlotSource | None, ...]:
    """Per slot of the spec: the first term at that temperature, else the first term whose target's
    teachers are read there (a `teacher_temperature` of its own), else None (the constant 1)."""
    sources = []
    for slot, fixed_one in enumerate(spec.slot_is_one):
        own = [t for t, term in enumerate(spec.terms) if term.slot == slot]
        teachers = [t for t, term in enumerate(spec.terms) if term.teacher_slot == slot]
        if fixed_one or not (own or teachers):
            sources.append(None)
        else:
            sources.append(SlotSource(own[0]) if own else SlotSource(teachers[0], teacher=True))
    return tuple(sources)


def _renormalized_notes(launch: Launch) -> list[str]:
    """Why a temperature that a top-k term reads has no student softmax state: with tail: renormalize
    the student is renormalized over the k stored tokens of each row, never over the whole row."""
    spec = launch.kernel_spec()
    by_slot: dict[int, list[Term]] = {}
    for t in launch.layout.topk_terms:
        term = spec.terms[t]
        if term.target.tail == "renormalize" and term.slot not in launch.layout.student_slots:
            by_slot.setdefault(term.slot, []).append(launch.terms[t])
    notes = []
    for slot, terms in by_slot.items():
        names = ", ".join(f"{term.key} (top-k teacher {term.target.name!r}, k {term.target.k})" for term in terms)
        notes.append(
            f"no student softmax state at T={scheduled(launch.slots[slot])}: {names} uses tail: renormalize, "
            "which renormalizes the student over the k stored tokens of each row, so no softmax over the "
            "whole row is kept at that temperature"
        )
    return notes


def plan_head(head: HeadPlan) -> list[Launch]:
    """One launch for the head, or several when it reads too many dense teachers for one."""
    groups: list[list[Term]] = []
    teachers: list[set[str]] = []
    for term in head.terms:
        names = {t.name for t in _dense_of(term)}
        for group, seen in zip(groups, teachers):
            if len(seen | names) <= MAX_TEACHERS_PER_LAUNCH:
                group.append(term)
                seen |= names
                break
        else:
            groups.append([term])
            teachers.append(set(names))
    launches = []
    for index, group in enumerate(groups):
        notes = []
        if index > 0:
            notes.append(
                f"split: head {head.name!r} reads {len(set().union(*teachers))} dense teachers; one launch "
                f"streams at most {MAX_TEACHERS_PER_LAUNCH}, so this launch adds to the gradient of launch 1"
            )
        if len(teachers[index]) > MAX_TEACHERS_PER_LAUNCH:
            notes.append(f"one term reads {len(teachers[index])} teachers at once; its tiles are narrower")
        if head.logits_scale is not None:
            seen = (
                f"{head.logits_scale:g} z"
                if head.softcap is None
                else f"{head.softcap:g} tanh({head.logits_scale:g} z / {head.softcap:g})"
            )
            notes.append(
                f"logits_scale: the terms of head {head.name!r} see {seen}, scaled in float32 as the kernel reads "
                "the logits; the gradient takes the factor once per row"
            )
        launch = _launch(head, index, group, notes)
        notes += [
            f"extra pass: {launch.terms[t].key} ({launch.terms[t].kind}) needs a row sum over p and q before its "
            "gradient"
            for t in launch.layout.reduction_terms
        ]
        notes += _renormalized_notes(launch)
        notes += [
            f"positions: {term.key} takes {term.position_note} (row scale {term.group + 1} of {len(head.groups)})"
            for term in launch.terms
            if term.position_note
        ]
        launches.append(replace(launch, notes=tuple(notes)))
    return launches


def plan_fusion(plan: Plan) -> FusionPlan:
    """The launches of every head with terms."""
    return FusionPlan(tuple(launch for head in plan.heads if head.terms for launch in plan_head(head)))
