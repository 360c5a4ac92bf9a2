"""Compile every fused launch of the standard cases (or of loss-graph files) for sm_90 and print what
each costs: tile, warps, registers, spills, theoretical occupancy, and per pass the SASS instructions
and MUFU operations per element and the barriers per tile. Needs no GPU (Triton's ptxas and cuobjdump).

    python benchmarks/kernel_report.py                 # cases a-d and f at their production vocab
    python benchmarks/kernel_report.py graph.yaml      # every launch of a graph
    python benchmarks/kernel_report.py --json out.json
    python benchmarks/kernel_report.py --plugin my_kinds graph.yaml   # a graph using a plugin's kinds

Run it without TRITON_INTERPRET (the interpreter's kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lossgraph.kernels.report import report

from lossgraph.apps.bench import rl_case, standard_cases
from lossgraph.document import check_file, check_text
from lossgraph.errors import ConfigError, LossGraphError, PluginError
from lossgraph.kinds import plugins


def launches(name: str, context) -> dict[str, tuple[object, int]]:
    """{launch id: (kernel spec, vocab)} of a checked graph."""
    vocab = {head.name: head.vocab_size for head in context.plan.heads}
    return {
        f"{name}/{launch.head}/{launch.index + 1}": (launch.kernel_spec(), vocab[launch.head])
        for launch in context.fusion.launches
    }


def collect(paths: list[Path]) -> dict[str, tuple[object, int]]:
    found: dict[str, tuple[object, int]] = {}
    if not paths:
        for case in [*standard_cases(), rl_case()]:
            found.update(launches(f"case-{case.name}", check_text(case.yaml(), f"case-{case.name}.yaml").context))
    for path in paths:
        checked = check_file(path)
        if checked.context is None:  # invalid: its problems, not a traceback (an unknown type: says how plugins load)
            raise ConfigError(checked.diagnostics)
        found.update(launches(path.stem, checked.context))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="*", type=Path, help="loss-graph files (default: the standard cases)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="logits dtype")
    parser.add_argument("--json", type=Path, help="also write the reports to this file")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="load this plugin's kinds (repeatable; installed plugins and LOSSGRAPH_PLUGINS load anyway)",
    )
    args = parser.parse_args()
    try:
        plugins.load(args.plugin)
    except PluginError as exc:
        print(f"kernel_report: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_report: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    try:
        collected = collect(args.graphs)
    except ConfigError as exc:
        print("\n".join(d.format() for d in exc.diagnostics), file=sys.stderr)
        return 1
    except LossGraphError as exc:  # a file that cannot be read
        print(f"kernel_report: {exc}", file=sys.stderr)
        return 2
    results = {}
    columns = f"{'launch':28} {'tile':>5} {'warps':>5} {'regs':>4} {'spill':>5} {'occ':>5}"
    print(f"{columns}  per pass: SASS/el MUFU/el BAR/tile")
    for launch, (spec, vocab) in collected.items():
        # a phased launch (cross-row quantities: GSPO, an entropy quantile) runs its stats and apply kernels
        for phase in ("stats", "apply") if spec.phased else ("single",):
            name = launch if phase == "single" else f"{launch}/{phase}"
            cost = report(spec, phase, vocab=vocab, dtype=args.dtype)
            results[name] = cost.as_dict()
            passes = "  ".join(f"{p.instructions:6.1f} {p.mufu:4.2f} {p.barriers_per_tile:3d}" for p in cost.passes)
            print(
                f"{name:28} {cost.block:5d} {cost.warps:5d} {cost.registers:4d} {cost.spill_bytes:5d} "
                f"{cost.occupancy:5.2f}  {passes}   total {cost.instructions_per_element:.1f} SASS/el"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
