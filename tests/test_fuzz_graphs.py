"""Random valid loss graphs, run on both backends: the fused kernels agree with the float64 reference.

Hypothesis draws a graph (loss kinds, targets of every source kind, temperatures, betas, weights, a
second head), inputs of several spreads (up to logits of +-90), and a dtype, and compares values, terms,
loss and gradients with the reference run on the same values in float64. `make test` runs a small
derandomized slice; `make fuzz` runs many more (GRAPH_FUZZ_EXAMPLES, default 300).
"""

from __future__ import annotations

import os
import re

import torch
from fused_cases import FUSED_TOLERANCES, assert_values_match, make_inputs, requires_fused, run_pair, spec_of
from fused_cases import interpreter_warnings as interpreter_noise
from helpers import assert_close
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kind_table import LABEL_KINDS, TARGET_KINDS, TARGETLESS_KINDS, assert_covers_source_kinds, takes_temperature, truth

pytestmark = [requires_fused, *interpreter_noise]

EXAMPLES = int(os.environ.get("GRAPH_FUZZ_EXAMPLES", "12"))

# which targets each registered kind takes (labels only where the kind takes hard labels)
DISTRIBUTIONS = ("smooth", "teacher", "cached", "blend")
TARGETS = {
    **{kind: (("labels",) if kind in LABEL_KINDS else ()) + DISTRIBUTIONS for kind in TARGET_KINDS},
    **{kind: (None,) for kind in TARGETLESS_KINDS},
}
TEMPERATURES = (1.0, 1.0, 2.0, 0.5, 0.25)


@st.composite
def loss_nodes(draw) -> tuple[list[str], set[str], str]:
    """(loss lines, sources they read, the top-k tail)."""
    tail = draw(st.sampled_from(["bucket", "renormalize"]))
    lines, used = ["lm: {type: cross_entropy, heads: [next], target: labels}"], {"labels"}
    for index in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(sorted(TARGETS)))
        target = draw(st.sampled_from(TARGETS[kind]))
        fields = [f"type: {kind}", "heads: [next]"]
        if target is not None:
            fields.append(f"target: {target}")
            used.add(target)
            if target == "blend":
                used.update({"teacher", "smooth"})
            if target == "smooth":
                used.add("labels")
        fixed_at_one = not takes_temperature(kind) or (target == "cached" and tail == "bucket")
        if not fixed_at_one:
            temperature = draw(st.sampled_from(TEMPERATURES))
            fields.append(f"temperature: {temperature}")
            if temperature != 1.0 and target is not None and draw(st.booleans()):
                fields.append("temperature_scaling: true")
        for name, choices in getattr(truth(kind), "field_choices", {}).items():
            fields.append(f"{name}: {draw(st.sampled_from(choices))}")
        fields.append(f"weight: {draw(st.sampled_from([1.0, 0.5, 0.0, 2.0]))}")
        lines.append(f"l{index}: {{{', '.join(fields)}}}")
    if draw(st.booleans()):  # a multi-token-prediction head with its own labels term
        lines.append("mtp: {type: cross_entropy, heads: [mtp2], target: labels}")
    return lines, used, tail


SOURCES = {
    "labels": "labels: {type: labels}",
    "smooth": "smooth: {type: label_smoothing, source: labels, epsilon: 0.1}",
    "teacher": "teacher: {type: teacher}",
    "cached": "cached: {type: topk_teacher, k: K, tail: TAIL}",
    "blend": "blend: {type: mixture, sources: [teacher, smooth], weights: [0.7, 0.3]}",
}


def test_the_sources_cover_every_source_kind():
    assert_covers_source_kinds(SOURCES.values(), "SOURCES of tests/test_fuzz_graphs.py")


def document(lines: list[str], used: set[str], tail: str, vocab: int, k: int) -> str:
    heads = "next: {offset: 1}" + ("\n  mtp2: {offset: 2}" if any(line.startswith("mtp:") for line in lines) else "")
    sources = "\n  ".join(SOURCES[name] for name in SOURCES if name in used).replace("K", str(k)).replace("TAIL", tail)
    losses = "\n  ".join(lines)
    return f"version: 1\nvocab_size: {vocab}\nheads:\n  {heads}\nsources:\n  {sources}\nlosses:\n  {losses}\n"


QUICK = EXAMPLES <= 12  # the slice `make test` runs: the same examples every time, reported unshrunk


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=QUICK,
    phases=[Phase.explicit, Phase.generate] if QUICK else list(Phase),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    nodes=loss_nodes(),
    vocab=st.sampled_from([2, 7, 64, 1000, 1271]),
    scale=st.sampled_from([1.0, 3.0, 30.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 1000),
)
def test_random_graph_agrees_with_the_reference(nodes, vocab, scale, dtype, seed):
    lines, used, tail = nodes
    text = document(lines, used, tail, vocab, k=min(vocab, 8))
    spec = spec_of(text)
    inputs = make_inputs(spec, (2, 5), seed=seed, scale=scale)
    pair = run_pair(spec, inputs, dtype)
    what = f"\n{text}scale={scale} dtype={dtype} seed={seed}\n"
    assert_values_match(pair, what=what)
    # a log-probability formed from scaled logits of magnitude ~4 x scale / T carries about
    # ulp(4 x scale / T) of absolute error (reverse KL's q (log q - log p - l) feels it most), so past
    # the suite's usual spread (3 at T = 1) the gradient tolerance grows with scale / T
    tolerance = FUSED_TOLERANCES[dtype]
    coolest = min([1.0, *(float(t) for t in re.findall(r"temperature: ([0-9.]+)", text))])
    spread = max(1.0, scale / (3.0 * coolest))
    for name, expected in pair.reference.grads.items():
        magnitude = float(expected.abs().max()) if expected.numel() else 0.0
        atol = tolerance.grad_atol * spread * max(magnitude, 1e-30)
        assert_close(pair.fused.grads[name], expected, rtol=tolerance.grad_rtol, atol=atol, what=f"{what} {name}")
