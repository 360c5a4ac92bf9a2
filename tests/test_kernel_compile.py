"""Every generated kernel compiles ahead of time for an H100 (sm_90), without spilling to local memory.

The fused tests run the kernels in Triton's interpreter, which accepts code that the GPU compiler
rejects (a shape mismatch in a reduction, a Python-only construct, a dtype the hardware lacks).
`triton.compile` with a CUDA target lowers a kernel all the way to a cubin with the ptxas that Triton
ships, on a machine without a GPU, so these tests catch that code, and `cuobjdump --dump-resource-usage`
tells whether registers spilled (LOCAL > 0: a kernel that would run far below its bandwidth).

The kernels compile in a child process: with TRITON_INTERPRET=1 (as `make test` sets) `@triton.jit`
gives interpreter objects that cannot be compiled. The child is this file, run as a script.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import run_compiler_script
from kind_table import LABEL_KINDS, ROLLOUT_KINDS, TARGET_KINDS, TARGETLESS_KINDS, takes_temperature, truth

triton = pytest.importorskip("triton", reason="compiling the fused kernels needs the triton package")

from lossgraph.kernels.layout import kernel_layout  # noqa: E402
from lossgraph.kernels.signature import DenseTeacher, KernelSpec, KernelTerm, KTopK  # noqa: E402

from lossgraph.document import check_file  # noqa: E402
from lossgraph.kinds import loss_kind  # noqa: E402
from lossgraph.kinds.class_weights import KWeighted  # noqa: E402
from lossgraph.kinds.sources.label_smoothing import KSmoothed  # noqa: E402
from lossgraph.kinds.sources.labels import KLabels  # noqa: E402
from lossgraph.kinds.sources.mixture import KMixture  # noqa: E402
from lossgraph.kinds.sources.rollout import KRollout  # noqa: E402
from lossgraph.kinds.sources.teacher import KDense  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
PRODUCTION_VOCAB = 128256
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

# --------------------------------------------------------------------------------------------------
# The kernels to compile: every launch of every example, and a synthetic list covering every kind and
# target (each kind against each target it takes, at a temperature slot that is not 1 unless the
# target needs 1), gradient-inactive terms, accumulating launches and vocab maps.
# --------------------------------------------------------------------------------------------------

SMOOTHED = KSmoothed(0.1)
TARGETS = {
    "labels": KLabels(),
    "label_smoothing": SMOOTHED,
    "dense": KDense(0),
    "mixture-dense-smoothed": KMixture(((0.6, KDense(0)), (0.4, SMOOTHED))),
    "mixture-two-dense": KMixture(((0.3, KDense(0)), (0.7, KDense(1)))),
    "topk-renormalize": KTopK(0, "renormalize"),
    "topk-bucket": KTopK(0, "bucket"),
}


def kernel_term(kind: str, target, slot: int, *, active: bool = True) -> KernelTerm:
    """A term of `kind` through its registered fragments, with the constants of a node that sets the
    fields of tests/kind_table.py (a jsd term with beta 0.3)."""
    loss = loss_kind(kind)
    fields = {"type": kind, "heads": ["next"], **getattr(truth(kind), "fields", {})}
    node = loss.model.model_validate({**fields, "target": "t"} if loss.takes_target else fields)
    return KernelTerm(loss.fragments, target, slot, constants=loss.constants(node), active=active)


def rollout_term(kind: str, target: KRollout, slot: int, **fields) -> KernelTerm:
    """A term of a rollout kind (policy_gradient, kl_estimate) with the node's `fields`."""
    loss = loss_kind(kind)
    node = loss.model.model_validate({"type": kind, "heads": ["next"], "target": "t", **fields})
    return KernelTerm(loss.fragments, target, slot, constants=loss.constants(node))


def _rollout_spec() -> KernelSpec:
    """The rollout kinds with every objective and estimator, on a rollout with old and reference log-probs
    (at a slot that is not 1) and on an on-policy one, beside cross-entropy; the aggregated ones in a
    second term group."""
    full, on_policy = KRollout(0, True, True), KRollout(1, False, False)
    terms = (
        kernel_term("cross_entropy", KLabels(), 0),
        rollout_term("policy_gradient", full, 1, epsilon_high=0.28, delta=4.0),
        rollout_term("policy_gradient", full, 1, objective="cispo", epsilon_high=5.0),
        *(rollout_term("kl_estimate", full, 1, estimator=estimator) for estimator in ("k1", "k2", "k3")),
        rollout_term("policy_gradient", on_policy, 0, aggregation="sequence_mean"),
        rollout_term("policy_gradient", on_policy, 0, objective="cispo", epsilon_high=0.5),
    )
    return KernelSpec(terms=terms, slot_is_one=(True, False), row_groups=2, term_groups=(0, 0, 0, 0, 0, 0, 1, 0))


def _dense_count(target) -> int:
    if isinstance(target, KDense):
        return target.teacher + 1
    if isinstance(target, KMixture):
        return max(_dense_count(part) for _, part in target.parts)
    return 0


def _target_spec(name: str, *, active: bool = True, accumulate: bool = False, mapping: str = "same") -> KernelSpec:
    """Every kind that takes target `name`, as the terms of one kernel."""
    target = TARGETS[name]
    kinds = LABEL_KINDS if name == "labels" else TARGET_KINDS
    slot = 0 if name == "topk-bucket" else 1  # a bucket tail cannot be re-tempered: slot 0 is T = 1
    terms = tuple(kernel_term(kind, target, slot, active=active) for kind in kinds)
    return KernelSpec(
        terms=terms,
        slot_is_one=(True, False),
        dense=tuple(DenseTeacher(mapping) for _ in range(_dense_count(target))),
        topk=(64,) if isinstance(target, KTopK) else (),
        accumulate=accumulate,
    )


def synthetic_specs() -> dict[str, KernelSpec]:
    specs = {f"target-{name}": _target_spec(name) for name in TARGETS}
    # the kinds without a target: at a temperature slot that is not 1 where the kind takes a temperature,
    # and once more gradient-inactive
    tempered = [kind for kind in TARGETLESS_KINDS if takes_temperature(kind)]
    specs["no-target"] = KernelSpec(
        terms=(
            *(kernel_term(kind, None, 1 if kind in tempered else 0) for kind in TARGETLESS_KINDS),
            *(kernel_term(kind, None, 0, active=False) for kind in tempered),
        ),
        slot_is_one=(True, False),
    )
    specs["inactive-dense"] = _target_spec("dense", active=False)
    specs["inactive-topk-bucket"] = _target_spec("topk-bucket", active=False)
    specs["values-only-topk-bucket"] = replace(_target_spec("topk-bucket"), gradient=False)
    specs["values-only-mixture-two-dense"] = replace(_target_spec("mixture-two-dense"), gradient=False)
    specs["accumulate-dense"] = _target_spec("dense", accumulate=True)
    specs["accumulate-topk-renormalize"] = _target_spec("topk-renormalize", accumulate=True)
    specs["softcap-labels"] = replace(_target_spec("labels"), softcap=30.0)
    specs["softcap-topk-bucket"] = replace(_target_spec("topk-bucket"), softcap=30.0)
    specs["softcap-accumulate-dense"] = replace(_target_spec("dense", accumulate=True), softcap=30.0)
    specs["scale-labels"] = replace(_target_spec("labels"), logits_scale=0.25)
    specs["scale-softcap-topk-bucket"] = replace(_target_spec("topk-bucket"), logits_scale=0.25, softcap=30.0)
    specs["rollout"] = _rollout_spec()
    specs["truncate-dense"] = _target_spec("dense", mapping="truncate")
    specs["pad-mixture"] = _target_spec("mixture-two-dense", mapping="pad")
    # class-weighted cross-entropy (two vectors: smoothed labels at T != 1, plain labels) beside a z-loss
    specs["class-weights"] = KernelSpec(
        terms=(
            kernel_term("cross_entropy", KWeighted(0.1, 0), 1),
            kernel_term("cross_entropy", KWeighted(0.0, 1), 0),
            kernel_term("z_loss", None, 0),
        ),
        slot_is_one=(True, False),
        row_groups=2,
        term_groups=(1, 1, 0),
    )
    # the widest launch: four dense teachers at two temperatures, two top-k teachers, labels
    specs["widest"] = KernelSpec(
        terms=(
            kernel_term("cross_entropy", KLabels(), 0),
            *(kernel_term("forward_kl", KDense(i), i % 2) for i in range(4)),
            kernel_term("jsd", KMixture(((0.5, KDense(0)), (0.5, KDense(3)))), 1),
            kernel_term("reverse_kl", KTopK(0, "bucket"), 0),
            kernel_term("tvd", KTopK(1, "renormalize"), 1),
            kernel_term("z_loss", None, 0),
        ),
        slot_is_one=(True, False),
        dense=(DenseTeacher("same"),) * 4,
        topk=(64, 32),
    )
    return specs


def example_specs() -> dict[str, KernelSpec]:
    specs = {}
    for path in EXAMPLES:
        for launch in check_file(path).context.fusion.launches:
            specs[f"{path.stem}-{launch.head}-{launch.index + 1}"] = launch.kernel_spec()
    return specs


def cases() -> dict[str, tuple[KernelSpec, str, str]]:
    """id -> (spec, pointer type of the logits, gradient and teachers, phase)."""
    all_cases = {name: (spec, "*bf16", "single") for name, spec in {**example_specs(), **synthetic_specs()}.items()}
    all_cases["target-mixture-dense-smoothed-fp32"] = (
        synthetic_specs()["target-mixture-dense-smoothed"],
        "*fp32",
        "single",
    )
    all_cases["widest-fp32"] = (synthetic_specs()["widest"], "*fp32", "single")
    # the vocab-parallel phases of these synthetic launches and of every example launch that has a pass 2
    split = {
        name: synthetic_specs()[name] for name in ("widest", "scale-softcap-topk-bucket", "class-weights", "rollout")
    }
    for name, spec in {**split, **example_specs()}.items():
        phases = ["stats", "apply"] + (["reduce"] if kernel_layout(spec).reduction_terms else [])
        if name not in split and "reduce" not in phases:
            continue
        for phase in phases:
            all_cases[f"{name}-{phase}"] = (spec, "*bf16", phase)
    return all_cases


def test_synthetic_specs_cover_every_kind_and_target():
    """The synthetic list holds every kind, every target class, both tails, and every kind x target pair."""
    seen = set()

    def visit(target):
        if isinstance(target, KMixture):
            for _, part in target.parts:
                visit(part)
        return type(target).__name__ + (f"-{target.tail}" if isinstance(target, KTopK) else "")

    for spec in synthetic_specs().values():
        for term in spec.terms:
            seen.add((term.loss.name, visit(term.target) if term.target is not None else None))
    assert {kind for kind, _ in seen} >= {*TARGET_KINDS, *TARGETLESS_KINDS, *ROLLOUT_KINDS}
    targets = {"KSmoothed", "KDense", "KMixture", "KTopK-renormalize", "KTopK-bucket"}
    assert {(kind, target) for kind in TARGET_KINDS for target in targets} <= seen
    assert {(kind, "KLabels") for kind in LABEL_KINDS} | {(kind, None) for kind in TARGETLESS_KINDS} <= seen


# --------------------------------------------------------------------------------------------------
# Compiling (in the child process).
# --------------------------------------------------------------------------------------------------


def local_memory(cubin: bytes) -> int | None:
    """Bytes of local memory per thread (register spills) of a cubin, or None without cuobjdump."""
    from lossgraph.kernels.report import cuobjdump_output

    if not CUOBJDUMP.exists():
        return None
    usage = cuobjdump_output(cubin, "--dump-resource-usage")
    found = re.findall(r"\bLOCAL:(\d+)", usage)
    if not found:
        raise ValueError(f"no LOCAL in cuobjdump output:\n{usage}")
    return max(int(value) for value in found)


def compile_all(out: Path) -> None:
    """Compile every case for sm_90 and write {id: {ok, error, local, block, warps}} to `out`."""
    from lossgraph.kernels.report import compile_sm90
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, (spec, pointer, phase) in cases().items():
        entry: dict[str, object] = {}
        try:
            kernel, block, warps = compile_sm90(spec, phase, PRODUCTION_VOCAB, pointer[1:])
            entry.update(block=block, warps=warps)
            entry["local"] = local_memory(kernel.asm["cubin"])
            entry["ok"] = True
        except Exception as error:  # reported by the test of that case
            entry.update(ok=False, error=f"{type(error).__name__}: {error}"[:4000])
        results[name] = entry
    from lossgraph.kernels.scale import BLOCK, scale_in_place_kernel

    for pointer in ("*fp32", "*bf16", "*fp16"):  # the backward's in-place scale
        try:
            signature = {"buffer_ptr": pointer, "scale_ptr": "*fp32", "elements": "i64", "BLOCK": "constexpr"}
            source = ASTSource(fn=scale_in_place_kernel, signature=signature, constexprs={"BLOCK": BLOCK})
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
            results[f"scale-{pointer[1:]}"] = {"ok": True}
        except Exception as error:
            results[f"scale-{pointer[1:]}"] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:4000]}
    out.write_text(json.dumps(results))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict]:
    """Results of compiling every case (in one child process, where TRITON_INTERPRET is unset)."""
    out = tmp_path_factory.mktemp("aot") / "results.json"
    return run_compiler_script([__file__, out], out)


CASES = list(cases())


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_scale_kernel_compiles_for_sm90(compiled, dtype):
    entry = compiled[f"scale-{dtype}"]
    assert entry["ok"], entry.get("error")


@pytest.mark.parametrize("case", CASES)
def test_kernel_compiles_for_sm90(compiled, case):
    entry = compiled[case]
    assert entry["ok"], f"{case} does not compile for sm_90:\n{entry.get('error')}"


@pytest.mark.parametrize("case", CASES)
def test_kernel_does_not_spill(compiled, case):
    entry = compiled[case]
    if not entry["ok"]:
        pytest.fail(f"{case} does not compile (see test_kernel_compiles_for_sm90)")
    if entry["local"] is None:
        pytest.skip(f"no cuobjdump at {CUOBJDUMP}: cannot read the cubin's resource usage")
    assert entry["local"] == 0, f"{case} spills {entry['local']} bytes per thread to local memory"


@pytest.mark.parametrize("name", sorted({**example_specs(), **synthetic_specs()}))
def test_the_layout_tells_what_each_generated_read_streams(name):
    """The planner's byte estimates come from the layout, not from generated source: the dense
    teachers each read of the row loads in the generated kernel are the layout's `pass_reads`."""
    from lossgraph.kernels.codegen import KernelGenerator

    spec = {**example_specs(), **synthetic_specs()}[name]
    source = KernelGenerator(spec).source()
    live = source.split("    else:\n", 1)[1]  # the rows that take a loss (the masked branch comes first)
    loops = re.split(r"for \w+ in range\(0, (?:V, BLOCK_V|tiles)\):", live)[1:]
    teacher_loads = r"\bteacher(\d+)_logits = tl\.load\(teacher\d+_row"
    reads = tuple(frozenset(int(i) for i in re.findall(teacher_loads, loop)) for loop in loops)
    assert reads == kernel_layout(spec).pass_reads


if __name__ == "__main__":
    compile_all(Path(sys.argv[1]))
