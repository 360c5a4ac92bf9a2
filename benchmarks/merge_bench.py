"""Merge the JSON files of `lossgraph bench` runs (one per case) into one, and print the summary table.

    python benchmarks/merge_bench.py OUT.json PART.json [PART.json ...]

benchmarks/gpu_session.sh runs each case in a process of its own, so that a case that runs out of time
keeps what it measured (`lossgraph bench --json` rewrites its file after every measurement). Each case
keeps the copy bandwidth its own process measured, from which its floor was computed. The table is the
one docs/performance.md shows: per case the floor, then the median of each implementation and, where
measured, its peak extra memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [
    ("lossgraph fused", "lossgraph fused"),
    ("lossgraph reference", "lossgraph reference"),
    ("torch eager (fp32)", "torch eager"),
    ("torch.compile", "torch.compile"),
    ("Liger-Kernel CE + KL", "Liger CE + KL"),
    ("Liger fused-linear JSD", "Liger CE + KL"),  # case e: a JSD, the same matmuls
    # case f: "torch eager" and "torch.compile" are TRL's loss with its k3 estimate; these, the exact KL
    ("torch eager (fp32), exact KL", "torch eager, exact KL"),
    ("torch.compile, exact KL", "torch.compile, exact KL"),
]


def merge(parts: list[Path]) -> dict:
    merged: dict = {"environment": None, "copy_bandwidth_bytes_per_second": None, "cases": []}
    bandwidths = []
    for path in parts:
        if not path.is_file():  # a case that never got to write its file
            continue
        payload = json.loads(path.read_text(encoding="utf-8"))
        merged["environment"] = merged["environment"] or payload["environment"]
        bandwidths.append(payload["copy_bandwidth_bytes_per_second"])
        for case in payload["cases"]:
            case["copy_bandwidth_bytes_per_second"] = payload["copy_bandwidth_bytes_per_second"]
            merged["cases"].append(case)
    if bandwidths:
        merged["copy_bandwidth_bytes_per_second"] = sorted(bandwidths)[len(bandwidths) // 2]
    return merged


def _cell(measurement: dict | None) -> str:
    if measurement is None:
        return ""
    if measurement.get("median_ms") is None:
        return measurement.get("note") or ""
    text = f"{measurement['median_ms']:.3f} ms"
    extra = measurement.get("peak_extra_bytes")
    if extra is not None:
        text += f", +{extra / 2**30:.2f} GiB"
    return text


def table(merged: dict) -> str:
    headers = ["case", "floor", *dict.fromkeys(label for _, label in COLUMNS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for case in merged["cases"]:
        found = {m["implementation"]: m for m in case["measurements"]}
        floor = f"{case['floor_ms']:.3f} ms"
        if case.get("floor") == "four matmuls / matmul rate":
            floor += " (4 matmuls)"
        cells = dict.fromkeys(headers[2:], "")
        for implementation, label in COLUMNS:
            if implementation in found:
                cells[label] = _cell(found[implementation])
        lines.append("| " + " | ".join([case["case"], floor, *cells.values()]) + " |")
    return "\n".join(lines)


def main(arguments: list[str]) -> int:
    if len(arguments) < 1:
        print(__doc__, file=sys.stderr)
        return 2
    out, parts = Path(arguments[0]), [Path(p) for p in arguments[1:]]
    merged = merge(parts)
    out.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    info = merged["environment"] or {}
    print(f"\n{info.get('card', '?')}; torch {info.get('torch', '?')}, triton {info.get('triton', '-')}")
    print(table(merged))
    print(f"wrote {out} ({len(merged['cases'])} case(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
