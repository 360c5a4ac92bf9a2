"""The GPU session's benchmark plumbing, checked on the CPU: results saved after every measurement,
torch.compile measured last, per-case JSON files merged into the docs' table, a script bash accepts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lossgraph.apps.bench import copy_bandwidth, run_case, standard_cases

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from merge_bench import merge, table  # noqa: E402


def test_every_measurement_is_checkpointed_and_torch_compile_goes_last(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda function: function)  # its compilation is not the point
    case = standard_cases(tokens=16, vocab=128)[0]
    seen: list[list[str]] = []
    device = torch.device("cpu")
    result = run_case(
        case,
        dtype="fp32",
        device=device,
        repeats=1,
        warmup=0,
        bandwidth=copy_bandwidth(device, megabytes=1),
        checkpoint=lambda partial: seen.append([m.implementation for m in partial.measurements]),
    )
    names = [m.implementation for m in result.measurements]
    assert names[-1] == "torch.compile", names
    assert seen == [names[: i + 1] for i in range(len(names))]


def _payload(case: str, bandwidth: float, measurements: list[dict]) -> dict:
    return {
        "environment": {"card": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0", "device": "cuda"},
        "copy_bandwidth_bytes_per_second": bandwidth,
        "cases": [
            {
                "case": case,
                "description": "",
                "tokens": 8192,
                "vocab": 128256,
                "floor_bytes": 1,
                "floor_ms": 1.5351,
                "measurements": measurements,
                "floor": "four matmuls / matmul rate" if case == "e" else "bytes / copy bandwidth",
            }
        ],
    }


def test_per_case_files_merge_into_the_docs_table(tmp_path):
    fused = {"implementation": "lossgraph fused", "median_ms": 6.1054, "peak_extra_bytes": int(1.96 * 2**30)}
    compiled = {"implementation": "torch.compile", "median_ms": 7.09, "peak_extra_bytes": None}
    failed = {"implementation": "Liger-Kernel CE + KL", "median_ms": None, "note": "failed: OutOfMemoryError"}
    (tmp_path / "a.json").write_text(json.dumps(_payload("a", 4.3e12, [fused, compiled, failed])))
    (tmp_path / "e.json").write_text(json.dumps(_payload("e", 4.1e12, [fused])))
    merged = merge([tmp_path / "a.json", tmp_path / "missing.json", tmp_path / "e.json"])
    assert [case["case"] for case in merged["cases"]] == ["a", "e"]
    assert merged["cases"][0]["copy_bandwidth_bytes_per_second"] == 4.3e12
    text = table(merged)
    assert "| a | 1.535 ms | 6.105 ms, +1.96 GiB |  |  | 7.090 ms | failed: OutOfMemoryError |" in text, text
    assert "| e | 1.535 ms (4 matmuls) | 6.105 ms, +1.96 GiB |" in text, text
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "merge_bench.py"),
            str(tmp_path / "all.json"),
            *map(str, [tmp_path / "a.json", tmp_path / "e.json"]),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "NVIDIA H200; torch 2.11.0+cu130" in result.stdout and "wrote" in result.stdout
    assert len(json.loads((tmp_path / "all.json").read_text())["cases"]) == 2


def test_case_f_gets_columns_for_the_exact_kl_peers(tmp_path):
    k3 = {"implementation": "torch.compile", "median_ms": 9.0, "peak_extra_bytes": None}
    exact = {"implementation": "torch.compile, exact KL", "median_ms": 12.0, "peak_extra_bytes": None}
    (tmp_path / "f.json").write_text(json.dumps(_payload("f", 4.3e12, [k3, exact])))
    header, _, row = table(merge([tmp_path / "f.json"])).splitlines()
    assert header.endswith("| Liger CE + KL | torch eager, exact KL | torch.compile, exact KL |"), header
    assert row == "| f | 1.535 ms |  |  |  | 9.000 ms |  |  | 12.000 ms |", row


def test_the_session_script_parses():
    result = subprocess.run(
        ["bash", "-n", str(ROOT / "benchmarks" / "gpu_session.sh")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_host_overhead_proxy_runs_on_the_cpu(tmp_path):
    """benchmarks/host_overhead.py, as CI can run it: the CPU proxy with the kernel launches stubbed."""
    out = tmp_path / "host.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "host_overhead.py"),
            "--device",
            "cpu",
            "--calls",
            "5",
            "--rounds",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "host time per call" in result.stdout and "CPU proxy, kernel launches stubbed" in result.stdout
    numbers = json.loads(out.read_text())
    assert numbers["vocab"] == 1024 and len(numbers["medians_ms"]) == 2
    assert all(0 < median < 1000 for median in numbers["medians_ms"])


def test_the_host_overhead_benchmark_refuses_a_cpu_run_through_compiled_kernels():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--device", "cpu"],
        capture_output=True,
        text=True,
        check=False,
        env={key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"},
    )
    assert result.returncode == 2 and "TRITON_INTERPRET=1" in result.stdout


def test_the_fused_linear_breakdown_runs_on_the_cpu(tmp_path):
    """benchmarks/linear_breakdown.py's plumbing on tiny sizes (the reference loss; no GPU numbers)."""
    out = tmp_path / "linear.json"
    arguments = "--device cpu --tokens 64 --vocab 256 --hidden 32 --repeats 1 --chunks 16,64".split()
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "linear_breakdown.py"), *arguments, "--json", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert set(report["phases_ms"]) == {
        "student logits (matmul)",
        "teacher logits (matmul)",
        "loss kernel (loss + logits gradient)",
        "hidden gradient (matmul)",
        "weight gradient (addmm into V x H)",
    }
    assert [entry["chunk"] for entry in report["sweep"]] == [16, 64]
    assert "sum of the phases" in result.stdout and "chunk rows" in result.stdout
