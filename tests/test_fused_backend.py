"""The fused backend (one generated Triton kernel per head) against the float64 reference backend.

Every test evaluates a graph with backend="triton" on float32, bfloat16 or float16 logits and with
backend="torch" on exactly those values upcast to float64, then compares values, terms, the loss and
the gradient of every head's logits with the per-dtype tolerances of `fused_cases.FUSED_TOLERANCES`.
On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), so rows are few and the
vocabularies small, except where a particular vocab size is the point.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from fused_cases import (
    DEVICE,
    DTYPE_IDS,
    EXAMPLES,
    FUSED_TOLERANCES,
    LOW_PRECISION,
    ROOT,
    Inputs,
    assert_metrics_match,
    assert_pair_matches,
    call,
    graph_yaml,
    interpreter_warnings,
    low_precision,
    make_inputs,
    requires_fused,
    requires_gpu,
    run_pair,
    spec_of,
    upcast,
)
from helpers import assert_close
from kind_table import (
    LABEL_KINDS,
    TARGET_KINDS,
    TARGETLESS_KINDS,
    assert_covers_source_kinds,
    takes_temperature,
    yaml_fields,
)

import lossgraph

pytestmark = [requires_fused, *interpreter_warnings]

DTYPES = [pytest.param(dtype, id=DTYPE_IDS[dtype]) for dtype in LOW_PRECISION]
MTP_DISTILL = ROOT / "examples" / "mtp_distill.yaml"

LABELS = "labels: {type: labels}"
TEACHER = "teacher: {type: teacher}"
TEACHER2 = "teacher2: {type: teacher}"
SMOOTH = "smooth: {type: label_smoothing, source: labels, epsilon: 0.1}"


# --------------------------------------------------------------------------------------------------
# Every loss kind and every source kind, in every logits dtype.
# --------------------------------------------------------------------------------------------------

# name -> (loss lines, source lines); one loss node on head `next`, V = 1000 (one tile of 1024)
LOSS_CASES: dict[str, tuple[str, str]] = {
    "cross_entropy-labels": ("lm: {type: cross_entropy, heads: [next], target: labels}", LABELS),
    "cross_entropy-teacher": ("ce: {type: cross_entropy, heads: [next], target: teacher, temperature: 2.0}", TEACHER),
    "cross_entropy-label_smoothing": (
        "ce: {type: cross_entropy, heads: [next], target: smooth}",
        f"{LABELS}\n{SMOOTH}",
    ),
    "z_loss": ("z: {type: z_loss, heads: [next], weight: 0.01}", ""),
    "forward_kl-teacher-T2-scaled": (
        "kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, temperature_scaling: true}",
        TEACHER,
    ),
    "reverse_kl-teacher": ("rkl: {type: reverse_kl, heads: [next], target: teacher, temperature: 1.5}", TEACHER),
    "reverse_kl-label_smoothing": ("rkl: {type: reverse_kl, heads: [next], target: smooth}", f"{LABELS}\n{SMOOTH}"),
    "reverse_kl-mixture": (
        "rkl: {type: reverse_kl, heads: [next], target: mix, temperature: 0.8}",
        f"{LABELS}\n{TEACHER}\n{SMOOTH}\nmix: {{type: mixture, sources: [teacher, smooth], weights: [0.6, 0.4]}}",
    ),
    "reverse_kl-mixture-of-teachers": (
        "rkl: {type: reverse_kl, heads: [next], target: mix}",
        f"{TEACHER}\n{TEACHER2}\nmix: {{type: mixture, sources: [teacher, teacher2], weights: [0.25, 0.75]}}",
    ),
    "jsd-teacher-beta0.3": ("jsd: {type: jsd, heads: [next], target: teacher, beta: 0.3, temperature: 1.5}", TEACHER),
    "tvd-teacher": ("tvd: {type: tvd, heads: [next], target: teacher}", TEACHER),
    "entropy": ("ent: {type: entropy, heads: [next], temperature: 1.3, weight: -0.1}", ""),
    "forward_kl-topk_renormalize": (
        "kd: {type: forward_kl, heads: [next], target: cached, temperature: 2.0}",
        "cached: {type: topk_teacher, k: 16, tail: renormalize}",
    ),
    "forward_kl-topk_bucket": (
        "kd: {type: forward_kl, heads: [next], target: cached}",
        "cached: {type: topk_teacher, k: 16, tail: bucket}",
    ),
    "forward_kl-mixture": (
        "kd: {type: forward_kl, heads: [next], target: mix, temperature: 2.0}",
        f"{LABELS}\n{TEACHER}\n{TEACHER2}\n{SMOOTH}\n"
        "mix: {type: mixture, sources: [teacher, teacher2, smooth], weights: [0.5, 0.3, 0.2]}",
    ),
    "one-teacher-at-three-temperatures": (
        "kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, temperature_scaling: true}\n"
        "rkl: {type: reverse_kl, heads: [next], target: teacher, weight: 0.3}\n"
        "jsd: {type: jsd, heads: [next], target: teacher, temperature: 0.5, weight: 0.2}",
        TEACHER,
    ),
    "two-topk-teachers": (
        "fk: {type: forward_kl, heads: [next], target: renorm, temperature: 1.5}\n"
        "tv: {type: tvd, heads: [next], target: renorm, weight: 0.5}\n"
        "rk: {type: reverse_kl, heads: [next], target: bucket, weight: 0.3}\n"
        "js: {type: jsd, heads: [next], target: bucket, beta: 0.3, weight: 0.2}",
        "renorm: {type: topk_teacher, k: 32, tail: renormalize}\nbucket: {type: topk_teacher, k: 64, tail: bucket}",
    ),
    "nested-mixture-with-hard-labels": (
        "kd: {type: forward_kl, heads: [next], target: outer, temperature: 2.0}\n"
        "js: {type: jsd, heads: [next], target: outer, weight: 0.5}",
        f"{LABELS}\n{TEACHER}\n{TEACHER2}\n{SMOOTH}\n"
        "inner: {type: mixture, sources: [teacher, smooth], weights: [0.5, 0.5]}\n"
        "outer: {type: mixture, sources: [inner, teacher2, labels], weights: [0.4, 0.5, 0.1]}",
    ),
    "label_smoothing-mixture-and-labels": (
        "lm: {type: cross_entropy, heads: [next], target: labels, weight: 0.5}\n"
        "ce: {type: cross_entropy, heads: [next], target: mix, temperature: 1.5}\n"
        "kl: {type: forward_kl, heads: [next], target: smooth}",
        f"{LABELS}\n{TEACHER}\n{SMOOTH}\nmix: {{type: mixture, sources: [smooth, teacher], weights: [0.5, 0.5]}}",
    ),
}


# a registered kind without a case above gets a plain one (against a teacher, if it takes a target)
for _kind in (*TARGET_KINDS, *TARGETLESS_KINDS):
    if not any(f"type: {_kind}," in losses for losses, _ in LOSS_CASES.values()):
        _target = ", target: teacher" if _kind in TARGET_KINDS else ""
        LOSS_CASES[_kind] = (
            f"t: {{type: {_kind}, heads: [next]{_target}{yaml_fields(_kind)}}}",
            TEACHER if _target else "",
        )


def single_head_yaml(losses: str, sources: str, vocab: int = 1000) -> str:
    return graph_yaml(losses, sources=sources, vocab=vocab) if sources else _no_sources_yaml(losses, vocab)


def _no_sources_yaml(losses: str, vocab: int) -> str:
    lines = "".join(f"\n  {line}" for line in losses.splitlines())
    return f"version: 1\nvocab_size: {vocab}\nheads:\n  next: {{offset: 1}}\nlosses:{lines}\n"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_kind_matches_reference(case, dtype):
    losses, sources = LOSS_CASES[case]
    spec = spec_of(single_head_yaml(losses, sources))
    inputs = make_inputs(spec, (5,), seed=len(case))
    pair = run_pair(spec, inputs, dtype)
    assert_pair_matches(pair, what=case)
    # the case really has masked rows and real (nonzero) terms: a comparison of zeros proves nothing
    assert 0 < int(pair.reference.out.metrics["next"]["tokens"]) < 5
    assert all(abs(float(v)) > 1e-3 for v in pair.reference.out.values.values()), pair.reference.out.values


# Every kind against every distribution target, at V = 4500: more than one tile even for the widest
# tile (4096), so the online softmax rescales across tiles; float32 only (the dtypes are covered above).
# The kinds come from the registry: those that take hard labels also run against `labels`, and those of
# the student alone without a target.
TARGETS = {
    "teacher": TEACHER,
    "label_smoothing": f"{LABELS}\n{SMOOTH}",
    "mixture": "\n".join(
        [LABELS, TEACHER, SMOOTH, "mix: {type: mixture, sources: [teacher, smooth], weights: [0.7, 0.3]}"]
    ),
    "topk_renormalize": "cached: {type: topk_teacher, k: 24, tail: renormalize}",
    "topk_bucket": "cached: {type: topk_teacher, k: 24, tail: bucket}",
}
TARGET_NAME = {"teacher": "teacher", "label_smoothing": "smooth", "mixture": "mix"}
SWEEP = (
    [(kind, target) for kind in TARGET_KINDS for target in TARGETS]
    + [(kind, "labels") for kind in LABEL_KINDS]
    + [(kind, None) for kind in TARGETLESS_KINDS]
)


def test_the_cases_cover_every_source_kind():
    assert_covers_source_kinds((sources for _, sources in LOSS_CASES.values()), "LOSS_CASES of test_fused_backend.py")
    assert_covers_source_kinds(TARGETS.values(), "TARGETS of test_fused_backend.py")


@pytest.mark.parametrize(("kind", "target"), SWEEP, ids=[f"{k}-{t}" if t else k for k, t in SWEEP])
def test_every_kind_and_target_across_tiles(kind, target):
    if target is None:
        losses, sources = f"t: {{type: {kind}, heads: [next], weight: 0.5}}", ""
    else:
        name = TARGET_NAME.get(target, "labels" if target == "labels" else "cached")
        temperature = "" if target == "topk_bucket" or not takes_temperature(kind) else ", temperature: 1.7"
        losses = f"t: {{type: {kind}, heads: [next], target: {name}{temperature}}}"
        sources = LABELS if target == "labels" else TARGETS[target]
    spec = spec_of(single_head_yaml(losses, sources, vocab=4500))
    pair = run_pair(spec, make_inputs(spec, (3,), seed=3), torch.float32)
    assert_pair_matches(pair, what=f"{kind} against {target}")
    assert abs(float(pair.reference.out.values["t/next"])) > 1e-3


# --------------------------------------------------------------------------------------------------
# Several heads, several teachers, temperatures, head weights.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", [p for p in EXAMPLES if p.name != "mtp_distill.yaml"], ids=lambda p: p.stem)
def test_example_graphs_at_full_vocab(example):
    """The example graphs as written (V = 32000, teachers of 32064 tokens, top-k), on 2 positions in bf16."""
    spec = spec_of(example)
    pair = run_pair(spec, make_inputs(spec, (1, 2), seed=7, ignore_fraction=0.0), torch.bfloat16)
    assert_pair_matches(pair, what=example.name)
    assert_metrics_match(pair)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mtp_distill_example_three_heads(dtype):
    """examples/mtp_distill.yaml: CE on 3 heads with head_weights, KD at T=2 (T^2-scaled) and z-loss on `next`."""
    spec = spec_of(MTP_DISTILL)
    inputs = make_inputs(spec, (2, 7), seed=11)
    pair = run_pair(spec, inputs, dtype)
    assert_pair_matches(pair, what="mtp_distill")
    assert_metrics_match(pair)
    out = pair.fused.out
    assert list(out.values) == ["lm/next", "distill/next", "z/next", "lm/mtp2", "lm/mtp3"]
    assert out.weights["lm/mtp2"] == 0.5 and out.weights["lm/mtp3"] == 0.25
    assert set(pair.fused.grads) == {"next", "mtp2", "mtp3"}
    # later heads lose positions at the end of the sequence
    tokens = [int(out.metrics[h]["tokens"]) for h in ("next", "mtp2", "mtp3")]
    assert tokens[0] > tokens[2] > 0


TWO_TEMPERATURES = graph_yaml(
    """
lm: {type: cross_entropy, heads: [next], target: labels}
hot: {type: forward_kl, heads: [next], target: big, temperature: 2.0, temperature_scaling: true, weight: 0.7}
cold: {type: forward_kl, heads: [next], target: small, temperature: 0.5, weight: 0.3}
z: {type: z_loss, heads: [next], weight: 1.0e-3}
""",
    sources=f"{LABELS}\nbig: {{type: teacher}}\nsmall: {{type: teacher}}",
    vocab=1271,  # 3 streams: tiles of 1024, so two tiles, the last one partial
)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_teachers_at_two_temperatures_on_one_head(dtype):
    spec = spec_of(TWO_TEMPERATURES)
    graph = lossgraph.compile(spec, backend="triton")
    assert len(graph.fusion.launches) == 1
    pair = run_pair(spec, make_inputs(spec, (10,), seed=5), dtype)
    assert_pair_matches(pair, what="two temperatures")
    assert_metrics_match(pair)
    assert set(pair.fused.out.metrics["next"]) == {"tokens", "accuracy", "agreement/big", "agreement/small"}


FIVE_TEACHERS = graph_yaml(
    "\n".join(
        ["lm: {type: cross_entropy, heads: [next], target: labels, weight: 0.5}"]
        + [
            f"kd{i}: {{type: forward_kl, heads: [next], target: t{i}, temperature: {t}, weight: {w}}}"
            for i, (t, w) in enumerate([(1.0, 0.2), (2.0, 0.1), (1.0, 0.3), (0.7, 0.25), (2.0, 0.15)])
        ]
        + ["ent: {type: entropy, heads: [next], weight: -0.02}"]
    ),
    sources="\n".join([LABELS] + [f"t{i}: {{type: teacher}}" for i in range(5)]),
    vocab=1000,
)


@pytest.mark.parametrize("dtype", DTYPES)
def test_head_split_into_two_launches(dtype):
    """5 dense teachers on one head: 4 in the first launch, the 5th in a second that adds to the gradient."""
    spec = spec_of(FIVE_TEACHERS)
    graph = lossgraph.compile(spec, backend="triton")
    assert len(graph.fusion.for_head("next")) == 2
    pair = run_pair(spec, make_inputs(spec, (8,), seed=9), dtype)
    assert_pair_matches(pair, what="split head")
    assert_metrics_match(pair)
    assert len([k for k in pair.fused.out.metrics["next"] if k.startswith("agreement/")]) == 5


# --------------------------------------------------------------------------------------------------
# Masked rows.
# --------------------------------------------------------------------------------------------------

MASKING = graph_yaml(
    """
lm: {type: cross_entropy, heads: [next, mtp2], target: labels, head_weights: [1.0, 0.5]}
kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0}
rk: {type: reverse_kl, heads: [next], target: cached}
js: {type: jsd, heads: [mtp2], target: smooth, beta: 0.3}
z: {type: z_loss, heads: [next], weight: 0.1}
""",
    sources=f"{LABELS}\n{TEACHER}\n{SMOOTH}\ncached: {{type: topk_teacher, k: 8, tail: bucket}}",
    heads="next: {offset: 1}\nmtp2: {offset: 2}",
    vocab=300,
)


MASKINGS = [("ignore_index", dtype) for dtype in LOW_PRECISION]
MASKINGS += [("loss_mask", torch.float32), ("document_ids", torch.float32), ("loss_mask", torch.bfloat16)]


@pytest.mark.parametrize(("how", "dtype"), MASKINGS, ids=[f"{h}-{DTYPE_IDS[d]}" for h, d in MASKINGS])
def test_masked_rows(how, dtype):
    spec = spec_of(MASKING)
    inputs = make_inputs(spec, (2, 5), seed=21, ignore_fraction=0.3 if how == "ignore_index" else 0.0)
    if how == "loss_mask":
        inputs.loss_mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    elif how == "document_ids":
        inputs.document_ids = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 2]])
    # positions head `next` ignores hold garbage (padding): it must not reach any value or gradient
    ignored = inputs.labels == -100
    if inputs.loss_mask is not None:
        ignored |= inputs.loss_mask == 0
    assert bool(ignored.any()) or how == "document_ids"
    inputs.logits["next"][ignored] = math.nan
    inputs.teachers["teacher"][ignored] = math.inf
    cached = inputs.teachers["cached"]
    indices, logprobs = cached.indices.clone(), cached.logprobs.clone()
    indices[ignored] = 10**6
    logprobs[ignored] = math.nan
    inputs.teachers["cached"] = lossgraph.TopK(indices, logprobs)
    pair = run_pair(spec, inputs, dtype)
    assert_pair_matches(pair, what=how)
    tokens = {h: int(pair.fused.out.metrics[h]["tokens"]) for h in ("next", "mtp2")}
    assert 0 < tokens["mtp2"] < tokens["next"] <= 10, tokens
    # masked rows get an exactly zero gradient
    masked_rows = 0
    for head, grad in pair.fused.grads.items():
        masked = (pair.reference.grads[head] == 0).all(-1).to(grad.device)
        masked_rows += int(masked.sum())
        assert torch.equal(grad[masked], torch.zeros_like(grad[masked])), head
    assert masked_rows >= 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_masked_head_gives_zero_loss_and_exactly_zero_gradient(dtype):
    """With S = 2, head mtp3 (offset 3) has no label inside the sequence: loss 0, gradient exactly 0."""
    spec = spec_of(MTP_DISTILL)
    inputs = make_inputs(spec, (3, 2), seed=4, ignore_fraction=0.0)
    # the masked positions hold garbage that must not leak into the result
    inputs.logits["mtp3"][0, 0, 5] = math.nan
    inputs.logits["mtp3"][1, 1, :] = -math.inf
    pair = run_pair(spec, inputs, dtype)
    assert_pair_matches(pair, what="all-masked mtp3")
    out = pair.fused.out
    assert int(out.metrics["mtp3"]["tokens"]) == 0
    assert float(out.values["lm/mtp3"]) == 0.0 and float(out.terms["lm/mtp3"]) == 0.0
    assert torch.equal(pair.fused.grads["mtp3"], torch.zeros_like(pair.fused.grads["mtp3"]))
    assert float(out.values["lm/next"]) > 0 and float(out.values["lm/mtp2"]) > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_row_masked_gives_zero_loss_no_nan(dtype):
    spec = spec_of(MASKING)
    inputs = make_inputs(spec, (2, 4), seed=8)
    inputs.labels = torch.full((2, 4), -100)
    inputs.logits["next"][0, 1] = math.nan
    inputs.teachers["teacher"][1, 2] = math.nan
    pair = run_pair(spec, inputs, dtype)
    out = pair.fused.out
    assert float(out.loss.detach()) == 0.0
    for key in out.values:
        assert float(out.values[key]) == 0.0 and float(out.terms[key]) == 0.0, key
    for head, grad in pair.fused.grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)), head
    assert_pair_matches(pair, what="all rows masked")


# --------------------------------------------------------------------------------------------------
# -inf logits and huge logits.
# --------------------------------------------------------------------------------------------------

BANNED = graph_yaml(
    """
lm: {type: cross_entropy, heads: [next], target: labels}
z: {type: z_loss, heads: [next], weight: 0.01}
ent: {type: entropy, heads: [next], weight: -0.05}
rkl: {type: reverse_kl, heads: [next], target: teacher, weight: 0.2}
tvd: {type: tvd, heads: [next], target: teacher, weight: 0.3}
fkl: {type: forward_kl, heads: [next], target: masked, temperature: 2.0, weight: 0.4}
jsd: {type: jsd, heads: [next], target: masked, beta: 0.3, weight: 0.5}
ce: {type: cross_entropy, heads: [next], target: masked, temperature: 1.5, weight: 0.1}
""",
    sources=f"{LABELS}\n{TEACHER}\nmasked: {{type: teacher}}",
    vocab=1271,  # 3 streams: tiles of 1024
)


@pytest.mark.parametrize("dtype", DTYPES)
def test_minus_inf_logits_in_student_and_teacher(dtype):
    """Banned tokens: -inf student logits (row 0: the whole first tile), and a teacher that bans them too
    plus tokens of its own. Only combinations with a finite loss: every value is finite and matches, and
    the gradient is finite, matches, and is exactly 0 on banned tokens."""
    spec = spec_of(BANNED)
    rows, vocab = 6, 1271
    inputs = make_inputs(spec, (rows,), seed=13, ignore_fraction=0.0)
    generator = torch.Generator().manual_seed(0)
    banned = torch.rand(rows, vocab, generator=generator) < 0.3
    banned[0, :1024] = True  # a whole tile of -inf: the online max stays -inf for it
    labels = inputs.labels.clone()
    for row in range(rows):
        allowed = (~banned[row]).nonzero().flatten()
        labels[row] = allowed[int(labels[row]) % len(allowed)]
    inputs.labels = labels
    inputs.logits["next"] = inputs.logits["next"].masked_fill(banned, -math.inf)
    teacher_banned = banned | (torch.rand(rows, vocab, generator=generator) < 0.2)
    teacher_banned[torch.arange(rows), labels] = False
    inputs.teachers["masked"] = inputs.teachers["masked"].masked_fill(teacher_banned, -math.inf)
    pair = run_pair(spec, inputs, dtype)
    assert all(math.isfinite(float(v)) for v in pair.reference.out.values.values())
    assert all(math.isfinite(float(v)) for v in pair.fused.out.values.values()), pair.fused.out.values
    grad = pair.fused.grads["next"]
    assert bool(torch.isfinite(grad).all())
    assert torch.equal(grad[banned.to(grad.device)], torch.zeros_like(grad[banned.to(grad.device)]))
    assert_pair_matches(pair, what="-inf logits")
    assert_metrics_match(pair)


HUGE = graph_yaml(
    """
lm: {type: cross_entropy, heads: [next], target: labels}
z: {type: z_loss, heads: [next], weight: 1.0e-6}
kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, weight: 0.5}
jsd: {type: jsd, heads: [next], target: teacher, beta: 0.3, weight: 0.5}
""",
    sources=f"{LABELS}\n{TEACHER}",
    vocab=1000,
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["spread", "offset"])
def test_logits_of_magnitude_1e4(layout, dtype):
    """|z| ~ 1e4: `spread` draws logits and teacher with a standard deviation of 5e3 (near one-hot
    softmaxes), `offset` adds 1e4 to ordinary logits and takes 1e4 from the teacher's (softmaxes that only
    shift invariance keeps sane). Same tolerances as everywhere: the exact answer for these inputs is
    representable, and torch's float32 log_softmax gets it."""
    spec = spec_of(HUGE)
    scale = 5e3 if layout == "spread" else 3.0
    inputs = make_inputs(spec, (8,), seed=17, scale=scale)
    if layout == "offset":
        inputs.logits["next"] = inputs.logits["next"] + 1e4
        inputs.teachers["teacher"] = inputs.teachers["teacher"] - 1e4
    pair = run_pair(spec, inputs, dtype)
    assert all(math.isfinite(float(v)) for v in pair.fused.out.values.values())
    assert bool(torch.isfinite(pair.fused.grads["next"]).all())
    assert_pair_matches(pair, what=f"1e4 logits ({layout})")


# --------------------------------------------------------------------------------------------------
# Vocabulary sizes and vocab maps.
# --------------------------------------------------------------------------------------------------


ODD_VOCABS = [(vocab, dtype) for vocab in (1000, 1271) for dtype in LOW_PRECISION]
ODD_VOCABS += [(32001, torch.float32), (32001, torch.bfloat16)]


@pytest.mark.parametrize(("vocab", "dtype"), ODD_VOCABS, ids=[f"{v}-{DTYPE_IDS[d]}" for v, d in ODD_VOCABS])
def test_odd_vocab_sizes(vocab, dtype):
    losses = (
        "lm: {type: cross_entropy, heads: [next], target: labels}\n"
        "kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0}"
    )
    if vocab != 32001:
        losses += "\nz: {type: z_loss, heads: [next], weight: 1.0e-3}"
        losses += "\nrkl: {type: reverse_kl, heads: [next], target: teacher}"
    spec = spec_of(graph_yaml(losses, sources=f"{LABELS}\n{TEACHER}", vocab=vocab))
    rows = 4 if vocab == 32001 else 8
    inputs = make_inputs(spec, (rows,), seed=vocab)
    inputs.labels[0] = vocab - 1  # the very last token, in the partial last tile
    pair = run_pair(spec, inputs, dtype)
    assert_pair_matches(pair, what=f"V={vocab}")
    assert_metrics_match(pair)


VOCAB_MAPS = {
    "truncate": (
        "teacher: {type: teacher, vocab_size: 1100, vocab_map: truncate}\n"
        "cached: {type: topk_teacher, k: 64, tail: bucket, vocab_size: 1100, vocab_map: truncate}\n"
        "cut: {type: topk_teacher, k: 64, tail: renormalize, vocab_size: 1100, vocab_map: truncate}",
        "rkl: {type: reverse_kl, heads: [next], target: teacher, weight: 0.2}\n"
        "bk: {type: forward_kl, heads: [next], target: cached, weight: 0.3}\n"
        "rn: {type: jsd, heads: [next], target: cut, temperature: 2.0, weight: 0.3}",
    ),
    "pad": ("teacher: {type: teacher, vocab_size: 900, vocab_map: pad}", ""),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mapping", list(VOCAB_MAPS))
def test_vocab_map(mapping, dtype):
    """A teacher with a larger vocab (truncate: extra columns dropped; top-k entries beyond the head's
    vocab dropped) or a smaller one (pad: missing tokens get no mass)."""
    sources, extra = VOCAB_MAPS[mapping]
    losses = (
        "lm: {type: cross_entropy, heads: [next], target: labels}\n"
        "kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0}\n"
        "js: {type: jsd, heads: [next], target: teacher, beta: 0.3}\n"
        "tv: {type: tvd, heads: [next], target: teacher}"
    )
    if extra:
        losses += "\n" + extra
    spec = spec_of(graph_yaml(losses, sources=f"{LABELS}\n{sources}", vocab=1000))
    inputs = make_inputs(spec, (6,), seed=23)
    if mapping == "truncate":
        # the teacher's favourite token lies beyond the head's vocab in some rows; agreement must use the head's
        inputs.teachers["teacher"][:3, 1050] = 50.0
        for name in ("cached", "cut"):
            assert bool((inputs.teachers[name].indices >= 1000).any()), name
    pair = run_pair(spec, inputs, dtype)
    assert_pair_matches(pair, what=f"vocab_map {mapping}")
    assert_metrics_match(pair)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_tiny_vocab_with_topk_covering_it(tail, dtype):
    """V = 7 (one tile of 128, mostly masked lanes) and k = V: the bucket mode has no tail bucket left."""
    spec = spec_of(
        graph_yaml(
            "lm: {type: cross_entropy, heads: [next], target: labels}\n"
            "fk: {type: forward_kl, heads: [next], target: cached}\n"
            "js: {type: jsd, heads: [next], target: cached, weight: 0.5}\n"
            "rk: {type: reverse_kl, heads: [next], target: cached, weight: 0.5}",
            sources=f"{LABELS}\ncached: {{type: topk_teacher, k: 7, tail: {tail}}}",
            vocab=7,
        )
    )
    inputs = make_inputs(spec, (6,), seed=3)
    logprobs = torch.log_softmax(torch.randn(6, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64), -1)
    inputs.teachers["cached"] = lossgraph.TopK(inputs.teachers["cached"].indices, logprobs.float())
    pair = run_pair(spec, inputs, dtype)
    assert_pair_matches(pair, what=f"k = V, {tail}")
    assert all(math.isfinite(float(v)) for v in pair.fused.out.values.values())


LAYOUTS = {
    # rows of a wider buffer (a padded vocab): unit stride on the vocab, row stride V + 5
    "row-padded": lambda x: torch.nn.functional.pad(x, (0, 5))[..., : x.shape[-1]],
    # column-major: no unit stride on the vocab
    "column-major": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_contiguous_logits_and_teachers(layout, dtype):
    spec = spec_of(TWO_TEMPERATURES)
    pair = run_pair(spec, make_inputs(spec, (6,), seed=33), dtype, layout=LAYOUTS[layout])
    assert pair.fused.logits["next"].grad is not None
    assert_pair_matches(pair, what=layout)


@pytest.mark.parametrize(
    ("dtype", "teacher_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)],
    ids=["bf16-student-fp32-teachers", "fp32-student-bf16-teachers", "fp16-student-bf16-teachers"],
)
def test_teachers_in_another_dtype(dtype, teacher_dtype):
    spec = spec_of(TWO_TEMPERATURES)
    pair = run_pair(spec, make_inputs(spec, (6,), seed=35), dtype, teacher_dtype=teacher_dtype)
    assert_pair_matches(pair, what=f"teachers in {teacher_dtype}")
    assert_metrics_match(pair)


def test_empty_batch():
    spec = spec_of(TWO_TEMPERATURES)
    inputs = make_inputs(spec, (6,), seed=37)
    inputs.logits["next"] = inputs.logits["next"][:0]
    inputs.labels = inputs.labels[:0]
    inputs.teachers = {name: t[:0] for name, t in inputs.teachers.items()}
    pair = run_pair(spec, inputs, torch.float32)
    assert float(pair.fused.out.loss.detach()) == 0.0
    assert pair.fused.grads["next"].shape == (0, 1271)
    assert_pair_matches(pair, what="no positions")


# --------------------------------------------------------------------------------------------------
# Weights, schedules, normalization.
# --------------------------------------------------------------------------------------------------

SCHEDULED = graph_yaml(
    """
lm: {type: cross_entropy, heads: [next], target: labels}
kd:
  type: forward_kl
  heads: [next]
  target: teacher
  temperature: 2.0
  weight: {schedule: linear, start: 0.0, end: 1.0, steps: 8, warmup: 2}
ent: {type: entropy, heads: [next], weight: {schedule: linear, start: -0.05, end: 0.0, steps: 6}}
""",
    sources=f"{LABELS}\n{TEACHER}",
    vocab=600,
)
WITHOUT_KD = graph_yaml(
    """
lm: {type: cross_entropy, heads: [next], target: labels}
ent: {type: entropy, heads: [next], weight: {schedule: linear, start: -0.05, end: 0.0, steps: 6}}
""",
    sources=LABELS,
    vocab=600,
)


SCHEDULE_STEPS = [(0, torch.float32), (2, torch.float32), (4, torch.float32), (6, torch.float32), (20, torch.float32)]
SCHEDULE_STEPS += [(0, torch.bfloat16), (6, torch.bfloat16)]


@pytest.mark.parametrize(
    ("step", "dtype"), SCHEDULE_STEPS, ids=[f"step{step}-{DTYPE_IDS[dtype]}" for step, dtype in SCHEDULE_STEPS]
)
def test_weight_schedule_steps(step, dtype):
    """kd's weight is 0 until step 2, 0.25 at 4, then grows; ent's is -0.05 at 0 and 0 from step 6 on.
    A weight-0 term is reported in out.values but adds nothing to the loss or the gradient."""
    spec = spec_of(SCHEDULED)
    inputs = make_inputs(spec, (8,), seed=31)
    pair = run_pair(spec, inputs, dtype, step=step)
    assert_pair_matches(pair, what=f"step {step}")
    out = pair.fused.out
    expected = {"kd/next": min(max((step - 2) / 8, 0.0), 1.0), "ent/next": -0.05 + 0.05 * min(step / 6, 1.0)}
    for key, weight in expected.items():
        assert out.weights[key] == pytest.approx(weight, abs=1e-12), key
        assert float(out.values[key]) > 0.1, key  # computed and reported at every step
        if weight == 0:
            assert float(out.terms[key]) == 0.0, key
    if expected["kd/next"] == 0.0:
        # no gradient from kd: the same as the graph without it (its entropy weight equals ours at `step`)
        without = call(
            lossgraph.compile(spec_of(WITHOUT_KD), backend="triton"), _without_teacher(inputs, dtype), step=step
        )
        assert torch.equal(pair.fused.grads["next"], without.grads["next"])
        assert torch.equal(pair.fused.out.loss.detach(), without.out.loss.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_weight_zero_at_this_step(dtype):
    """At step 0 the only term has weight 0: it is reported, the loss is 0 and the gradient exactly 0."""
    spec = spec_of(
        graph_yaml(
            "kd:\n  type: forward_kl\n  heads: [next]\n  target: teacher\n"
            "  weight: {schedule: linear, start: 0.0, end: 1.0, steps: 10}",
            sources=TEACHER,
            vocab=300,
        )
    )
    pair = run_pair(spec, make_inputs(spec, (6,), seed=39), dtype, step=0)
    assert_pair_matches(pair, what="all weights 0")
    out = pair.fused.out
    assert float(out.values["kd/next"]) > 0.1 and float(out.terms["kd/next"]) == 0.0
    assert float(out.loss.detach()) == 0.0
    assert torch.equal(pair.fused.grads["next"], torch.zeros_like(pair.fused.grads["next"]))


def test_weight_zero_term_with_an_infinite_value():
    """lm has weight 0 and an infinite value (every label is a banned token): reported as inf, adds nothing."""
    spec = spec_of(
        graph_yaml(
            "lm: {type: cross_entropy, heads: [next], target: labels, weight: 0}\n"
            "z: {type: z_loss, heads: [next], weight: 0.01}",
            vocab=300,
        )
    )
    inputs = make_inputs(spec, (6,), seed=43, ignore_fraction=0.0)
    inputs.logits["next"][torch.arange(6), inputs.labels] = -math.inf
    pair = run_pair(spec, inputs, torch.float32)
    out = pair.fused.out
    assert math.isinf(float(out.values["lm/next"])) and float(out.terms["lm/next"]) == 0.0
    assert math.isfinite(float(out.loss.detach()))
    assert bool(torch.isfinite(pair.fused.grads["next"]).all())
    assert_pair_matches(pair, what="weight-0 infinite term")


TEMPERATURE_SCHEDULE = graph_yaml(
    """
lm: {type: cross_entropy, heads: [next], target: labels}
kd:
  type: forward_kl
  heads: [next]
  target: teacher
  temperature: {schedule: linear, start: 1.0, end: 3.0, steps: 10}
  temperature_scaling: true
  weight: 0.5
ce:
  type: cross_entropy
  heads: [next]
  target: teacher
  temperature: {schedule: linear, start: 1.0, end: 3.0, steps: 10}
""",
    sources=f"{LABELS}\n{TEACHER}",
    vocab=600,
)


@pytest.mark.parametrize("step", [0, 5, 15])
def test_temperature_schedule(step):
    """Two terms share a scheduled temperature (1 at step 0, 2 at step 5, 3 from step 10 on)."""
    spec = spec_of(TEMPERATURE_SCHEDULE)
    pair = run_pair(spec, make_inputs(spec, (6,), seed=47), torch.float32, step=step)
    assert_pair_matches(pair, what=f"temperature at step {step}")


def _without_teacher(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    low = low_precision(inputs, dtype)
    low.teachers = {}
    return low


NORMALIZED = """
version: 1
vocab_size: 500
normalization: {normalization}
heads:
  next: {{offset: 1}}
  mtp2: {{offset: 2}}
sources:
  labels: {{type: labels}}
  teacher: {{type: teacher}}
losses:
  lm: {{type: cross_entropy, heads: [next, mtp2], target: labels}}
  kd: {{type: forward_kl, heads: [next], target: teacher, temperature: 2.0, temperature_scaling: true}}
  z: {{type: z_loss, heads: [mtp2], weight: 0.01}}
"""

NUM_ITEMS = {
    "tokens": None,
    "num_items-int": 37,
    "num_items-tensor": torch.tensor(23.0),
    "num_items-per-head": {"next": 40, "mtp2": 11.5},
    "sum": None,
    "batch": None,
}


@pytest.mark.parametrize("variant", list(NUM_ITEMS))
def test_normalization_and_num_items(variant):
    normalization = variant if variant in ("sum", "batch") else "tokens"
    spec = spec_of(NORMALIZED.format(normalization=normalization))
    inputs = make_inputs(spec, (2, 5), seed=41)
    inputs.num_items = NUM_ITEMS[variant]
    if isinstance(inputs.num_items, torch.Tensor):
        inputs.num_items = inputs.num_items.to(DEVICE)
    pair = run_pair(spec, inputs, torch.float32)
    assert_pair_matches(pair, what=variant)
    # the normalizer really is the variant's: lm/next x normalizer is the same sum over tokens in every variant
    tokens = int(pair.fused.out.metrics["next"]["tokens"])
    normalizer = {"tokens": tokens, "num_items-int": 37, "num_items-tensor": 23, "num_items-per-head": 40}
    normalizer.update({"sum": 1, "batch": 10})
    per_token = call(
        lossgraph.compile(spec_of(NORMALIZED.format(normalization="tokens")), backend="torch"),
        upcast(low_precision(make_inputs(spec, (2, 5), seed=41), torch.float32)),
        backward=False,
    )
    expected = float(per_token.out.values["lm/next"]) * tokens / normalizer[variant]
    assert float(pair.fused.out.values["lm/next"]) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Metrics, in-place gradients, determinism.
# --------------------------------------------------------------------------------------------------

METRICS = graph_yaml(
    """
lm: {type: cross_entropy, heads: [next], target: labels}
kd: {type: forward_kl, heads: [next], target: teacher}
tk: {type: forward_kl, heads: [next], target: cached, weight: 0.5}
""",
    sources=f"{LABELS}\n{TEACHER}\ncached: {{type: topk_teacher, k: 8, tail: renormalize}}",
    vocab=300,
)


@pytest.mark.parametrize("dtype", DTYPES)
def test_metrics_equal_between_backends(dtype):
    spec = spec_of(METRICS)
    inputs = make_inputs(spec, (16,), seed=51, scale=1.0)
    # make the student agree with labels and teachers on some rows, so the metrics are not all 0
    logits, labels = inputs.logits["next"], inputs.labels
    rows = torch.arange(16)
    logits[rows[:6], labels[:6].clamp(min=0)] += 20.0
    teacher_top = inputs.teachers["teacher"].argmax(-1)
    logits[rows[6:11], teacher_top[6:11]] += 20.0
    pair = run_pair(spec, inputs, dtype)
    assert_metrics_match(pair)
    metrics = pair.fused.out.metrics["next"]
    for name in ("accuracy", "agreement/teacher"):
        assert 0.0 < float(metrics[name]) < 1.0, (name, float(metrics[name]))
    assert set(metrics) == {"tokens", "accuracy", "agreement/teacher", "agreement/cached"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_grad_overwrites_logits_with_the_gradient(dtype):
    spec = spec_of(MTP_DISTILL)
    inputs = make_inputs(spec, (2, 6), seed=61)
    grad_output = 2.0
    pair = run_pair(spec, inputs, dtype, inplace_grad=True, grad_output=grad_output)
    assert_pair_matches(pair, what="inplace_grad")
    regular = call(lossgraph.compile(spec, backend="triton"), low_precision(inputs, dtype), grad_output=grad_output)
    for head, leaf in pair.fused.logits.items():
        grad = pair.fused.grads[head]
        # the logits' storage now holds the gradient (scaled by grad_output), the same bits as without inplace
        assert torch.equal(leaf.detach(), grad), head
        assert torch.equal(grad, regular.grads[head]), head
        assert not torch.equal(leaf.detach(), low_precision(inputs, dtype).logits[head]), head


def test_inplace_grad_with_heads_that_are_views_of_one_tensor():
    """MTP heads computed together: logits[h] = stacked[h]. The gradient lands in `stacked` itself."""
    spec = spec_of(MTP_DISTILL)
    inputs = low_precision(make_inputs(spec, (2, 5), seed=63), torch.float32)
    heads = ("next", "mtp2", "mtp3")
    stacked = torch.stack([inputs.logits[h] for h in heads]).requires_grad_(True)
    graph = lossgraph.compile(spec, backend="triton", inplace_grad=True)
    # stacked[i] (select), not unbind/chunk: autograd forbids in-place writes to views of multi-output ops
    out = graph({head: stacked[i] for i, head in enumerate(heads)}, labels=inputs.labels, teachers=inputs.teachers)
    out.loss.backward()
    regular = call(lossgraph.compile(spec, backend="triton"), inputs)
    for index, head in enumerate(heads):
        assert torch.equal(stacked.grad[index], regular.grads[head]), head


def test_inplace_grad_needs_unit_stride_on_the_vocab():
    spec = spec_of(TWO_TEMPERATURES)
    inputs = low_precision(make_inputs(spec, (4,), seed=65), torch.float32)
    graph = lossgraph.compile(spec, backend="triton", inplace_grad=True)
    with pytest.raises(lossgraph.BackendError, match="unit stride"):
        call(graph, inputs, layout=LAYOUTS["column-major"])


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_inplace_grad_on_a_split_head_is_still_correct(dtype):
    spec = spec_of(FIVE_TEACHERS)
    pair = run_pair(spec, make_inputs(spec, (6,), seed=71), dtype, inplace_grad=True)
    assert_pair_matches(pair, what="inplace_grad, split head")


DETERMINISM = {
    "mtp_distill-fp32": (MTP_DISTILL, (2, 5), torch.float32),
    "banned-and-three-passes-bf16": (BANNED, (6,), torch.bfloat16),
    "split-head-bf16": (FIVE_TEACHERS, (6,), torch.bfloat16),
    "topk-and-masking-fp16": (MASKING, (2, 5), torch.float16),
}


@pytest.mark.parametrize("case", list(DETERMINISM))
def test_bitwise_deterministic(case):
    """Two identical calls give the same bits: no atomics, a fixed order of every sum."""
    source, lead, dtype = DETERMINISM[case]
    spec = spec_of(source)
    inputs = low_precision(make_inputs(spec, lead, seed=81), dtype)
    graph = lossgraph.compile(spec, backend="triton")
    first, second = call(graph, inputs), call(graph, inputs)
    assert torch.equal(first.out.loss, second.out.loss)
    for key in first.out.values:
        assert torch.equal(first.out.values[key], second.out.values[key]), key
        assert torch.equal(first.out.terms[key], second.out.terms[key]), key
    for head in first.grads:
        assert torch.equal(first.grads[head], second.grads[head]), head


# --------------------------------------------------------------------------------------------------
# torch.compile.
# --------------------------------------------------------------------------------------------------

COMPILED = graph_yaml(
    """
lm: {type: cross_entropy, heads: [next], target: labels}
kd:
  type: forward_kl
  heads: [next]
  target: teacher
  temperature: 2.0
  temperature_scaling: true
  weight: {schedule: linear, start: 0.0, end: 1.0, steps: 5, warmup: 3}
z: {type: z_loss, heads: [next], weight: 1.0e-3}
""",
    sources=f"{LABELS}\n{TEACHER}",
    vocab=300,
)


def _step_function(graph):
    def step_fn(logits, labels, teacher, step):
        return graph({"next": logits}, labels=labels, teachers={"teacher": teacher}, step=step).loss

    return step_fn


def _loss_and_grad(function, inputs: Inputs, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = inputs.logits["next"].detach().clone().requires_grad_(True)
    loss = function(logits, inputs.labels, inputs.teachers["teacher"], step)
    loss.backward()
    return loss.detach(), logits.grad


@pytest.fixture
def dynamo():
    """A fresh dynamo cache and fresh counters (torch._dynamo.reset() leaves the counters as they are)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def test_torch_compile_with_inplace_grad(dynamo):
    """The in-place op under aot_autograd (it mutates the logits): same loss and gradient as eager."""
    spec = spec_of(COMPILED)
    graph = lossgraph.compile(spec, backend="triton", inplace_grad=True)
    inputs = low_precision(make_inputs(spec, (6,), seed=95), torch.float32)
    compiled = torch.compile(_step_function(graph), fullgraph=True, backend="aot_eager")
    loss, grad = _loss_and_grad(compiled, inputs, 6)
    eager_loss, eager_grad = _loss_and_grad(_step_function(graph), inputs, 6)
    assert torch.equal(loss, eager_loss)
    assert torch.equal(grad, eager_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_compile_fullgraph_matches_eager(dynamo, dtype):
    spec = spec_of(COMPILED)
    graph = lossgraph.compile(spec, backend="triton")
    inputs = low_precision(make_inputs(spec, (8,), seed=91), dtype)
    compiled = torch.compile(_step_function(graph), fullgraph=True, backend="aot_eager")
    loss, grad = _loss_and_grad(compiled, inputs, 6)
    eager_loss, eager_grad = _loss_and_grad(_step_function(graph), inputs, 6)
    assert torch.equal(loss, eager_loss)
    assert torch.equal(grad, eager_grad)
    reference = run_pair(spec, make_inputs(spec, (8,), seed=91), dtype, step=6).reference
    tol = FUSED_TOLERANCES[dtype]
    assert_close(loss, reference.out.loss.detach(), rtol=tol.value_rtol, atol=tol.value_atol, what="compiled loss")
    magnitude = float(reference.grads["next"].abs().max())
    assert_close(grad, reference.grads["next"], rtol=tol.grad_rtol, atol=tol.grad_atol * magnitude, what="grad")


def test_torch_compile_weight_schedule_recompiles_at_most_4_times(dynamo):
    """kd's weight is 0 for steps 0..3 and grows to 1 at step 8: the active set changes once. Across
    steps 0..11 the compiled function must not break the graph, recompile at most 4 times, and match
    eager at every step."""
    spec = spec_of(COMPILED)
    graph = lossgraph.compile(spec, backend="triton")
    inputs = low_precision(make_inputs(spec, (6,), seed=93), torch.float32)
    compiled = torch.compile(_step_function(graph), fullgraph=True, backend="aot_eager")
    for step in range(12):
        loss, grad = _loss_and_grad(compiled, inputs, step)
        eager_loss, eager_grad = _loss_and_grad(_step_function(graph), inputs, step)
        assert_close(loss, eager_loss, rtol=1e-6, atol=1e-7, what=f"loss at step {step}")
        assert_close(grad, eager_grad, rtol=1e-6, atol=1e-9, what=f"gradient at step {step}")
    graphs = dynamo["stats"]["unique_graphs"]
    assert 1 <= graphs <= 4, f"{graphs} graphs compiled for 12 steps"


SCHEDULED_TEMPERATURES = graph_yaml(
    """
lm: {type: cross_entropy, heads: [next], target: labels}
kd:
  type: forward_kl
  heads: [next]
  target: teacher
  temperature: {schedule: linear, start: 1.0, end: 3.0, steps: 6}
  teacher_temperature: {schedule: cosine, start: 2.0, end: 1.0, steps: 6}
  temperature_scaling: true
  weight: {schedule: linear, start: 0.5, end: 1.0, steps: 6}
""",
    sources=f"{LABELS}\n{TEACHER}",
    vocab=300,
)


def test_per_call_numbers_reach_the_kernels_as_floats_and_a_compiled_graph_follows_their_schedules(dynamo, monkeypatch):
    """Each slot's 1/T and each term's weights are plain floats from the call to the kernel: an eager call
    builds no tensor from them (so a CUDA-graph capture records them with the launch). Under
    torch.compile they cross the op as one tensor, so a temperature and a weight that change at every
    step compile at most twice (the first step's int, then a dynamic one) and match eager at each step."""
    spec = spec_of(SCHEDULED_TEMPERATURES)
    graph = lossgraph.compile(spec, backend="triton")
    inputs = low_precision(make_inputs(spec, (6,), seed=101), torch.float32)
    built, real_tensor = [], torch.tensor

    def counting_tensor(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith(("lossgraph.runtime.fused", "lossgraph.kernels")):
            built.append(caller)
        return real_tensor(*args, **kwargs)

    seen = []
    real_launch = lossgraph.runtime.fused.launch

    def recording(spec, inputs, *, grad, numbers):
        seen.append([*inputs.inverse_temperatures, *numbers.gradient, *numbers.value_scale, *numbers.loss])
        return real_launch(spec, inputs, grad=grad, numbers=numbers)

    monkeypatch.setattr(torch, "tensor", counting_tensor)
    monkeypatch.setattr(lossgraph.runtime.fused, "launch", recording)
    eager = [_loss_and_grad(_step_function(graph), inputs, step) for step in range(6)]
    assert not built, built
    assert seen and all(type(number) is float for numbers in seen for number in numbers)
    assert len({tuple(numbers) for numbers in seen}) == 6  # every step's numbers differ
    monkeypatch.setattr(torch, "tensor", real_tensor)
    compiled = torch.compile(_step_function(graph), fullgraph=True, backend="aot_eager")
    for step in range(6):
        loss, grad = _loss_and_grad(compiled, inputs, step)
        assert torch.equal(loss, eager[step][0]), step
        assert torch.equal(grad, eager[step][1]), step
    graphs = dynamo["stats"]["unique_graphs"]
    assert graphs <= 2, f"{graphs} graphs compiled for 6 steps"


COMPILED_GRAPHS = {
    "two-heads-topk-smoothing": (MASKING, (2, 5)),
    "split-head": (FIVE_TEACHERS, (6,)),
    "three-heads": (MTP_DISTILL, (2, 5)),
}


@pytest.mark.parametrize("case", list(COMPILED_GRAPHS))
def test_torch_compile_of_other_graphs_matches_eager(dynamo, case):
    """Several heads, top-k teachers, a head split into two launches: fullgraph, and the same bits as eager."""
    source, lead = COMPILED_GRAPHS[case]
    spec = spec_of(source)
    graph = lossgraph.compile(spec, backend="triton")
    inputs = low_precision(make_inputs(spec, lead, seed=97), torch.bfloat16)

    def step_fn(logits, step):
        return graph(logits, labels=inputs.labels, teachers=inputs.teachers, step=step).loss

    compiled = torch.compile(step_fn, fullgraph=True, backend="aot_eager")
    results = []
    for function in (compiled, step_fn):
        leaves = {name: x.detach().clone().requires_grad_(True) for name, x in inputs.logits.items()}
        loss = function(leaves, 3)
        loss.backward()
        results.append((loss.detach(), {name: x.grad for name, x in leaves.items()}))
    (loss, grads), (eager_loss, eager_grads) = results
    assert torch.equal(loss, eager_loss)
    for name in grads:
        assert torch.equal(grads[name], eager_grads[name]), name


def test_torch_compile_under_no_grad_writes_no_gradient(dynamo, monkeypatch):
    """An evaluation step compiled whole: the values-only op, the same loss as eager."""
    spec = spec_of(COMPILED)
    graph = lossgraph.compile(spec, backend="triton")
    inputs = low_precision(make_inputs(spec, (6,), seed=99), torch.float32)
    compiled = torch.compile(_step_function(graph), fullgraph=True, backend="aot_eager")
    seen = _record_launches(monkeypatch)
    with torch.no_grad():
        loss = compiled(inputs.logits["next"], inputs.labels, inputs.teachers["teacher"], 6)
        eager = _step_function(graph)(inputs.logits["next"], inputs.labels, inputs.teachers["teacher"], 6)
    assert seen and all(not gradient and grad is None for gradient, grad in seen), seen
    assert torch.equal(loss, eager)


# --------------------------------------------------------------------------------------------------
# No gradient asked for: nothing N x V is allocated or written.
# --------------------------------------------------------------------------------------------------


def _record_launches(monkeypatch) -> list[tuple[bool, object]]:
    """(spec.gradient, grad buffer) of every fused launch from now on."""
    seen: list[tuple[bool, object]] = []
    real = lossgraph.runtime.fused.launch

    def recording(spec, inputs, *, grad, numbers):
        seen.append((spec.gradient, grad))
        return real(spec, inputs, grad=grad, numbers=numbers)

    monkeypatch.setattr(lossgraph.runtime.fused, "launch", recording)
    return seen


NO_GRADIENT = ["no_grad", "no_grad-inplace_grad", "detached-logits"]


@pytest.mark.parametrize("how", NO_GRADIENT)
@pytest.mark.parametrize("source", ["split-head", "three-heads"])
def test_without_gradient_the_kernels_write_nothing_n_by_v(how, source, monkeypatch):
    """Under torch.no_grad (also with inplace_grad), or for logits that need no gradient, every launch
    runs the kernel without gradient, gets no gradient buffer and leaves the logits as they were; the
    values and metrics are those of a call with gradient."""
    spec, lead = {"split-head": (FIVE_TEACHERS, (6,)), "three-heads": (MTP_DISTILL, (2, 5))}[source]
    spec = spec_of(spec)
    inputs = low_precision(make_inputs(spec, lead, seed=101), torch.float32)
    expected = call(lossgraph.compile(spec, backend="triton"), inputs)
    graph = lossgraph.compile(spec, backend="triton", inplace_grad=how.endswith("inplace_grad"))
    before = {name: x.clone() for name, x in inputs.logits.items()}
    seen = _record_launches(monkeypatch)
    with torch.set_grad_enabled(how == "detached-logits"):  # there: gradients on, logits that need none
        out = graph(inputs.logits, labels=inputs.labels, teachers=inputs.teachers)
    assert seen and all(not gradient and grad is None for gradient, grad in seen), seen
    assert not out.loss.requires_grad
    for name, logits in inputs.logits.items():
        assert torch.equal(logits, before[name]), name
    assert_close(out.loss, expected.out.loss.detach(), rtol=1e-6, atol=1e-7, what="loss")
    for key, value in expected.out.values.items():
        assert_close(out.values[key], value, rtol=1e-6, atol=1e-7, what=key)
    for head, metrics in expected.out.metrics.items():
        for name, value in metrics.items():
            assert torch.equal(out.metrics[head][name], value), (head, name)


def test_with_gradient_every_launch_writes_one(monkeypatch):
    spec = spec_of(FIVE_TEACHERS)
    inputs = low_precision(make_inputs(spec, (6,), seed=103), torch.float32)
    seen = _record_launches(monkeypatch)
    call(lossgraph.compile(spec, backend="triton"), inputs)
    assert len(seen) == 2 and all(gradient and grad is not None for gradient, grad in seen), seen


@requires_gpu
def test_a_training_step_replays_from_a_cuda_graph():
    """The call and its backward hold no host synchronization and no per-call host state the device
    reads, so a training step can be captured in a CUDA graph: replaying it on new inputs gives what an
    eager step gives."""
    spec = spec_of(
        graph_yaml(
            "lm: {type: cross_entropy, heads: [next], target: labels}\n"
            "kd: {type: forward_kl, heads: [next], target: teacher, temperature: 2.0, weight: 0.5}",
            sources=f"{LABELS}\n{TEACHER}",
            vocab=32000,
        )
    )
    graph = lossgraph.compile(spec, backend="triton")
    rows = 256
    logits = torch.randn(rows, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 32000, (rows,), device="cuda")
    teacher = torch.randn(rows, 32000, device="cuda", dtype=torch.bfloat16)

    def step():
        logits.grad = None
        out = graph({"next": logits}, labels, {"teacher": teacher})
        out.loss.backward()
        return out.loss.detach(), logits.grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture stream: kernels compiled, caches filled
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    captured = torch.cuda.CUDAGraph()
    with torch.cuda.graph(captured):
        loss, grad = step()
    with torch.no_grad():
        logits.copy_(torch.randn_like(logits))
        teacher.copy_(torch.randn_like(teacher))
        labels.copy_(torch.randint_like(labels, 32000))
    captured.replay()
    replayed_loss, replayed_grad = loss.clone(), grad.clone()
    expected_loss, expected_grad = step()
    assert torch.equal(replayed_loss, expected_loss), (replayed_loss, expected_loss)
    assert torch.equal(replayed_grad, expected_grad)


@requires_gpu
def test_no_grad_allocates_no_n_by_v_buffer_on_the_gpu():
    """Peak memory of a call under torch.no_grad stays far below one N x V float32 buffer."""
    spec = spec_of(graph_yaml(LOSS_CASES["forward_kl-teacher-T2-scaled"][0], sources=TEACHER, vocab=32000))
    rows = 512
    logits = torch.randn(rows, 32000, device="cuda")
    teacher = torch.randn(rows, 32000, device="cuda")
    graph = lossgraph.compile(spec, backend="triton")
    with torch.no_grad():
        graph({"next": logits}, teachers={"teacher": teacher})  # kernels compiled and cached
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        graph({"next": logits}, teachers={"teacher": teacher})
        torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < logits.numel() * logits.element_size() / 8, extra
