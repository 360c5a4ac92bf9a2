"""A kind's fragments cannot silently miscompile their kernel (kernels/scope.py).

- An expression a fragment returns lands as one operand: the squared Hellinger distance, a plugin kind
  registered here whose gradient `0.5 * q * B - 0.5 * rp * rq` has no parentheses, gets the right
  gradient (once it was pasted as `g += w * 0.5 * q * B - 0.5 * rp * rq`, 30% off).
- Each term's locals live in its namespace: two Hellinger terms in one launch both name their locals
  `rp` and `rq`, and neither reads the other's.
- A fragment that reads a name that is not in scope, or assigns a kernel variable, or returns what is
  not one expression, fails at generation with an error naming the kind, the fragment and the name:
  `FragmentError` from the generator, `KindError` through the Python API and `lossgraph kernel`.
"""

from __future__ import annotations

import ast
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
from fused_cases import (
    FUSED_TOLERANCES,
    assert_pair_matches,
    graph_yaml,
    interpreter_warnings,
    make_inputs,
    requires_fused,
    run_pair,
)
from helpers import assert_close
from lossgraph.kernels import names
from lossgraph.kernels.codegen import KernelGenerator
from lossgraph.kernels.fragments import ROW_SUMS, FragmentError, LossFragments, TargetFragments
from lossgraph.kernels.scope import factor, parse_expression
from lossgraph.kernels.signature import DenseTeacher, KernelSpec, KernelTerm
from pydantic import Field

import lossgraph
from lossgraph.compiler.fusion import plan_fusion
from lossgraph.kinds import LossKind, register_loss_kind, unregister_loss_kind
from lossgraph.kinds.sources.mixture import KMixture
from lossgraph.kinds.sources.teacher import KDense
from lossgraph.spec.nodes import TargetLoss

pytestmark = interpreter_warnings

# --------------------------------------------------------------------------------------------------
# The plugin kind: the squared Hellinger distance, written as an outside author would.
# --------------------------------------------------------------------------------------------------


class HellingerLoss(TargetLoss):
    """Squared Hellinger distance between the target and the student: 1 - sum_j sqrt(p_j q_j)."""

    type: Literal["hellinger"] = Field(description="Loss kind.")


class HellingerFragments(LossFragments):
    """l = 1 - B, B = sum_j sqrt(p_j q_j) (a row sum of a second read); dl/ds_j = 0.5 q_j B -
    0.5 sqrt(p_j q_j). Plain local names, and expressions without parentheses around them."""

    name = "hellinger"

    def formulas(self, term):
        return {"row sums": "b = sum_j sqrt(p_j q_j)", "gradient": "dl/ds_j = 0.5 q_j b - 0.5 sqrt(p_j q_j)"}

    def value_stage(self, term):
        return ROW_SUMS

    def row_sum_names(self, term):
        return ("b",)

    def roots(self, k, term) -> tuple[str, str]:
        rp = k.cached("rp", f"tl.sqrt({k.p(term.target, term.target_slot)})")
        rq = k.cached("rq", f"tl.sqrt({k.q(term.slot)})")
        return rp, rq

    def row_sums(self, k, t, term):
        rp, rq = self.roots(k, term)
        return (f"{rp} * {rq}",)

    def value_from_row_sums(self, k, t, term):
        return f"1.0 - {names.row_sum('b', t)}"

    def gradient(self, k, t, term):
        rp, rq = self.roots(k, term)
        return f"0.5 * {k.q(term.slot)} * {names.row_sum('b', t)} - 0.5 * {rp} * {rq}"


class Hellinger(LossKind):
    name = "hellinger"
    model = HellingerLoss
    fragments = HellingerFragments()
    formula = ("ℓ = 1 − Σ_j √(p_j q_j)",)
    example = "h: {type: hellinger, heads: [next], target: teacher}"
    checks = ("`target` may not be the `labels` source.",)
    accepts_hard_labels = False

    def divergence(self, log_p, log_q, term):
        return 1.0 - torch.exp(0.5 * (log_p + log_q)).sum(-1)


VOCAB = 96
SOURCES = "labels: {type: labels}\nteacher: {type: teacher}\nteacher2: {type: teacher}"
# two Hellinger terms (two temperature slots, two teachers) and cross-entropy in one launch
LOSSES = (
    "h: {type: hellinger, heads: [next], target: teacher, temperature: 2.0}\n"
    "h2: {type: hellinger, heads: [next], target: teacher2, weight: 0.5}\n"
    "lm: {type: cross_entropy, heads: [next], target: labels}"
)


@pytest.fixture
def hellinger():
    register_loss_kind(Hellinger())
    yield
    unregister_loss_kind("hellinger")


def hellinger_spec(*slots: int) -> KernelSpec:
    """A kernel with a Hellinger term per slot, term t against dense teacher t."""
    terms = tuple(KernelTerm(HellingerFragments(), KDense(t), slot) for t, slot in enumerate(slots))
    return KernelSpec(terms=terms, slot_is_one=(True, False), dense=(DenseTeacher("same"),) * len(slots))


def statements(source: str, pattern: str) -> list[str]:
    """The stripped lines of `source` that match `pattern`."""
    return [line.strip() for line in source.splitlines() if re.search(pattern, line)]


def test_a_compound_gradient_lands_as_one_operand():
    source = KernelGenerator(hellinger_spec(1)).source()
    grad, weight, b = names.GRAD, names.gradient_weight(0), names.row_sum("b", 0)
    (line,) = statements(source, rf"^\s*{grad} \+= {weight}")
    assert line == f"{grad} += {weight} * (0.5 * q_1 * {b} - 0.5 * hellinger_0__rp * hellinger_0__rq)"
    # the value is its own statement; the row sum a call's argument
    assert f"{names.value(0)} = 1.0 - {b}" in statements(source, rf"{names.value(0)} = ")
    assert statements(source, rf"{b}_lanes \+=") == [f"{b}_lanes += lane_sum(hellinger_0__rp * hellinger_0__rq, VEC)"]


def test_two_terms_of_a_kind_keep_their_own_locals():
    source = KernelGenerator(hellinger_spec(1, 0)).source()
    for t, slot in ((0, 1), (1, 0)):
        q, grad, weight, b = f"q_{slot}", names.GRAD, names.gradient_weight(t), names.row_sum("b", t)
        assert f"hellinger_{t}__rq = tl.sqrt({q})" in source
        (line,) = statements(source, rf"^\s*{grad} \+= {weight}")
        assert line == f"{grad} += {weight} * (0.5 * {q} * {b} - 0.5 * hellinger_{t}__rp * hellinger_{t}__rq)"
    teachers = statements(source, r"__rp = ")
    assert len({line.split(" = ")[0] for line in teachers}) == 2  # one local per term, in each tile loop
    assert not re.search(r"^\s*(rp|rq) = ", source, re.MULTILINE)  # no name outside a term's namespace


def hellinger_by_hand(logits: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor):
    """The float64 truth, written here: the mean over unmasked positions of 1 - sum_j sqrt(p_j q_j)."""
    q = torch.softmax(logits / temperature, dim=-1)
    p = torch.softmax(teacher / temperature, dim=-1)
    per_position = 1.0 - torch.sqrt(p * q).sum(-1)
    return per_position[mask].sum() / mask.sum()


@requires_fused
def test_fused_gradient_matches_the_float64_formula_and_the_reference(hellinger):
    spec = lossgraph.loads(graph_yaml(LOSSES, vocab=VOCAB, sources=SOURCES))
    (launch,) = plan_fusion(lossgraph.compile(spec, backend="torch").plan).launches
    assert [term.key for term in launch.terms] == ["h/next", "h2/next", "lm/next"]  # one kernel
    inputs = make_inputs(spec, (2, 5), seed=11)
    pair = run_pair(spec, inputs, torch.float32)
    assert_pair_matches(pair, what="hellinger")

    # against the formula, on the fused side's own fp32 inputs in float64
    logits = inputs.logits["next"].float().double().requires_grad_(True)
    labels = inputs.labels
    mask = labels >= 0
    teachers = {name: inputs.teachers[name].float().double() for name in ("teacher", "teacher2")}
    first = hellinger_by_hand(logits, teachers["teacher"], 2.0, mask)
    second = hellinger_by_hand(logits, teachers["teacher2"], 1.0, mask)
    log_q = torch.log_softmax(logits, dim=-1)
    cross_entropy = -log_q[mask].gather(1, labels[mask][:, None]).sum() / mask.sum()
    (expected,) = torch.autograd.grad(first + 0.5 * second + cross_entropy, logits)
    tol = FUSED_TOLERANCES[torch.float32]
    values = pair.fused.out.values
    assert_close(values["h/next"].cpu().double(), first.detach(), rtol=tol.value_rtol, atol=tol.value_atol, what="h")
    assert_close(values["h2/next"].cpu().double(), second.detach(), rtol=tol.value_rtol, atol=tol.value_atol, what="h2")
    gradient = pair.fused.grads["next"].cpu().double()
    assert_close(gradient, expected, rtol=tol.grad_rtol, atol=tol.grad_atol, what="hellinger gradient")


# --------------------------------------------------------------------------------------------------
# Expressions as operands (kernels/scope.py).
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "as_factor"),
    [
        ("q1", "q1"),
        ("tl.where(a > 0, a, 0.0)", "tl.where(a > 0, a, 0.0)"),
        ("-1.0", "-1.0"),
        ("2.0 * lse_s0", "2.0 * lse_s0"),  # a product's factors join the weight's (folded per row)
        ("0.7 * tl.where(q > 0, q, 0.0)", "0.7 * tl.where(q > 0, q, 0.0)"),
        ("q / s", "q / s"),
        ("0.5 * q * B - 0.5 * rp * rq", "(0.5 * q * B - 0.5 * rp * rq)"),
        ("a - b", "(a - b)"),
        ("a % b * c", "(a % b * c)"),  # % does not re-associate with the weight's product
        ("a if c else b", "(a if c else b)"),
        ("a ** 2", "(a ** 2)"),
        ("not a", "(not a)"),
    ],
)
def test_factor_parenthesizes_what_would_not_bind_as_one_operand(expression, as_factor):
    assert factor(expression, parse_expression(expression)) == as_factor
    weight = 3.0
    values = {"q1": 0.25, "a": 1.5, "b": 0.5, "c": 2.0, "lse_s0": 0.75, "q": 0.2, "s": 4.0, "B": 0.9, "rp": 0.3}
    values |= {"rq": 0.6, "tl": type("tl", (), {"where": staticmethod(lambda c, x, y: x if c else y)})}
    pasted = eval(f"{weight!r} * {factor(expression, parse_expression(expression))}", {}, values)
    assert pasted == pytest.approx(weight * eval(expression, {}, values))


@pytest.mark.parametrize("text", ["a, b", "x = 1", "a b", "(x := 1)", "lambda: 1", ""])
def test_what_is_not_one_value_is_refused(text):
    with pytest.raises(ValueError, match="not one"):
        parse_expression(text)


# --------------------------------------------------------------------------------------------------
# Scope: a fragment's mistakes fail at generation, naming the kind, the fragment and the name.
# --------------------------------------------------------------------------------------------------


class UndefinedName(HellingerFragments):
    def gradient(self, k, t, term):
        return f"0.5 * {k.q(term.slot)} * B_undefined"


class AssignsKernelVariable(HellingerFragments):
    def gradient(self, k, t, term):
        k.emit(f"{names.GRAD} = 0.0")
        return "0.0"


class LocalAfterItsLoop(HellingerFragments):
    """Reads rq, a local of pass 2's tile loop, once that loop has ended."""

    def value_from_row_sums(self, k, t, term):
        return f"1.0 - {names.row_sum('b', t)} * rq"


class EmitsAnUndefinedName(HellingerFragments):
    def row_sums(self, k, t, term):
        k.emit("half = 0.5 * missing")
        return ("half",)


class ReturnsATuple(HellingerFragments):
    def value_from_row_sums(self, k, t, term):
        return f"1.0, {names.row_sum('b', t)}"


class HidesAKernelVariable(HellingerFragments):
    """Assigns a local `q_1` in pass 2, then asks for the kernel's q_1 (k.q(1))."""

    def row_sums(self, k, t, term):
        k.emit("q_1 = 0.0")
        return super().row_sums(k, t, term)


class AssignsAKernelVariableItRead(HellingerFragments):
    """Asks for the kernel's q_1, then assigns `q_1`."""

    def row_sums(self, k, t, term):
        summands = super().row_sums(k, t, term)
        k.emit("q_1 = 0.0")
        return summands


@pytest.mark.parametrize(
    ("fragments", "method", "message"),
    [
        (UndefinedName, "gradient", "names `B_undefined`, which is not in scope here"),
        (AssignsKernelVariable, "gradient", "assigns `grad`, which is in scope here"),
        (LocalAfterItsLoop, "value_from_row_sums", "reads its local `rq`, which is not defined at this point"),
        (EmitsAnUndefinedName, "row_sums", "names `missing`, which is not in scope here"),
        (ReturnsATuple, "value_from_row_sums", "a tuple, not one value"),
        (HidesAKernelVariable, "row_sums", "its local `q_1` hides the kernel variable `q_1` that k.q returns"),
        (AssignsAKernelVariableItRead, "row_sums", "assigns `q_1`, which is in scope here"),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else None,
)
def test_a_fragments_mistake_fails_at_generation(fragments, method, message):
    spec = KernelSpec(
        terms=(KernelTerm(fragments(), KDense(0), 1),), slot_is_one=(True, False), dense=(DenseTeacher("same"),)
    )
    with pytest.raises(FragmentError) as error:
        KernelGenerator(spec).source()
    assert str(error.value).startswith(f"loss kind 'hellinger' (term 0), fragment `{method}`: ")
    assert message in str(error.value)


UNDEFINED_PLUGIN = '''
"""A plugin kind whose gradient names a variable nothing defines."""

from typing import Literal

from pydantic import Field

from lossgraph.kinds.losses.forward_kl import ForwardKL, ForwardKLFragments
from lossgraph.spec.nodes import TargetLoss


class UndefinedLoss(TargetLoss):
    """Forward KL with a broken gradient."""

    type: Literal["undefined_name"] = Field(description="Loss kind.")


class UndefinedFragments(ForwardKLFragments):
    name = "undefined_name"

    def gradient(self, k, t, term):
        return f"{k.q(term.slot)} - B_undefined"


class Undefined(ForwardKL):
    name = "undefined_name"
    model = UndefinedLoss
    fragments = UndefinedFragments()
    example = "u: {type: undefined_name, heads: [next], target: teacher}"


KIND = Undefined()
'''
UNDEFINED_GRAPH = graph_yaml(
    "u: {type: undefined_name, heads: [next], target: teacher}",
    vocab=VOCAB,
    sources="labels: {type: labels}\nteacher: {type: teacher}",
)
UNDEFINED_MESSAGE = "loss kind 'undefined_name' (term 0), fragment `gradient`: names `B_undefined`"


@pytest.fixture
def undefined_plugin(tmp_path: Path, monkeypatch, registry_restored) -> Path:
    """The plugin module importable as `undefined_kind`; returns a graph that uses it."""
    (tmp_path / "undefined_kind.py").write_text(textwrap.dedent(UNDEFINED_PLUGIN), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "undefined_kind", raising=False)
    graph = tmp_path / "undefined.yaml"
    graph.write_text(UNDEFINED_GRAPH, encoding="utf-8")
    return graph


def test_the_kernel_command_says_which_kind_fragment_and_name(cli, undefined_plugin: Path):
    result = cli("--plugin", "undefined_kind", "kernel", undefined_plugin)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {UNDEFINED_MESSAGE}, which is not in scope here")
    assert "Traceback" not in result.output and result.stdout == ""


@requires_fused
def test_the_python_api_raises_a_kind_error(undefined_plugin: Path):
    import undefined_kind

    register_loss_kind(undefined_kind.KIND)
    spec = lossgraph.load(undefined_plugin)
    inputs = make_inputs(spec, (4,), seed=1)
    graph = lossgraph.compile(spec, backend="triton")
    with pytest.raises(lossgraph.KindError, match=re.escape(UNDEFINED_MESSAGE)):
        # the gradient's fragment is generated for a call that asks for the gradient
        logits = inputs.logits["next"].float().requires_grad_(True)
        graph({"next": logits}, labels=inputs.labels, teachers={name: t.float() for name, t in inputs.teachers.items()})


def test_built_in_kernels_hold_no_name_outside_a_namespace_or_the_kernels_own():
    """Every local of a built-in kind's fragments is in its term's namespace: no `val{t}`-style names."""
    from test_kernel_compile import synthetic_specs

    for spec in synthetic_specs().values():
        tree = ast.parse(KernelGenerator(spec).source())
        assigned = {
            node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
        }
        assert not {name for name in assigned if re.fullmatch(r"(val|mass|lm|sg|sgt|c|lM|lMt|gv|low|q_label)\d+", name)}


class _ExpressionWriter:
    """A writer that hands back the expression a target caches, to evaluate it."""

    def cached(self, name, expression):
        return expression

    def constant_id(self, value):
        return 0


@dataclass(frozen=True)
class _SumTarget(TargetFragments):
    """A target form whose tile expressions are sums, not names."""

    def p(self, k, slot):
        return "0.25 + 0.25"

    def log_p(self, k, slot):
        return "-1.0 - 1.0"


def test_a_mixture_takes_each_part_as_one_operand():
    mixture = KMixture(((0.5, _SumTarget()), (0.5, _SumTarget())))
    writer = _ExpressionWriter()
    assert eval(mixture.p(writer, 0)) == pytest.approx(0.5)  # 0.5 * 0.25 + 0.25 + ... would be 0.75
    log_p = mixture.log_p(writer, 0).replace("log_add_exp", "_log_add_exp")
    assert eval(log_p, {"_log_add_exp": lambda a, b: math.log(math.exp(a) + math.exp(b))}) == pytest.approx(-2.0)
