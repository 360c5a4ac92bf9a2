"""What a generated kernel costs on an H100/H200, read from its sm_90 machine code without a GPU.

`triton.compile` with a CUDA target lowers a kernel to a cubin with the ptxas that Triton ships, on any
machine; `cuobjdump` (in Triton's wheel too) prints its SASS and resource usage. From them, per launch:
registers, spills, theoretical occupancy, and for each pass over the row (each tile loop that loads the
logits) the SASS instructions, MUFU operations (exp, log) and barriers per tile on the path most tiles
take (`common_path`), divided by the elements each thread handles per tile. These numbers are
deterministic, so tests can hold budgets on them; the GPU's timings stay the final word.

Compiling needs Triton's real JIT: run this where TRITON_INTERPRET is not set (the tests use a child
process).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from . import names
from .fragments import TargetFragments
from .launcher import kernel_module, tile_shape
from .signature import KernelSpec

SM90_REGISTERS = 65536  # per SM
SM90_MAX_WARPS = 64  # resident warps per SM
SM90_MAX_BLOCKS = 32
SM90_SHARED_BYTES = 227 * 1024  # usable shared memory per SM
REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256

_POINTERS = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class PassCost:
    """One tile loop of the kernel, per element a thread handles."""

    instructions: float
    mufu: float
    barriers_per_tile: int
    shuffles_per_tile: int
    branches: int  # forward branches inside the loop: 2 where the body is written twice (the test, the jump over)


@dataclass(frozen=True)
class KernelReport:
    block: int
    warps: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    occupancy: float  # resident warps / 64 per SM
    passes: tuple[PassCost, ...]

    @property
    def instructions_per_element(self) -> float:
        """Summed over the passes: what the issue rate pays per logit."""
        return sum(p.instructions for p in self.passes)

    @property
    def mufu_per_element(self) -> float:
        return sum(p.mufu for p in self.passes)

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "instructions_per_element": self.instructions_per_element,
            "mufu_per_element": self.mufu_per_element,
        }


def cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def argument_types(arg_names: list[str], pointer: str, forms: dict[str, str] | None = None) -> dict[str, str]:
    """Triton types of a generated kernel's arguments, by name; `forms`: those a plugin form's kernel
    targets declare (`TargetFragments.kernel_argument_types`). An unknown name fails loudly."""
    types = {}
    forms = forms or {}
    for name in arg_names:
        if name in forms:
            types[name] = forms[name]
        elif name in ("BLOCK_V", "VEC"):
            types[name] = "constexpr"
        elif name in ("z_ptr", "grad_ptr") or re.fullmatch(r"t\d+_ptr", name):
            types[name] = pointer
        elif name == "statf_ptr":
            types[name] = "*fp64"
        elif name in ("loss_ptr", "row_scale_ptr", "red_ptr") or re.fullmatch(r"(k\d+_logp|topz\d+)_ptr", name):
            types[name] = "*fp32"
        elif re.fullmatch(r"cw(_sum)?\d+_ptr", name):  # class weights [V_total] and their sum
            types[name] = "*fp32"
        elif name in ("label_ptr", "pred_ptr", "stati_ptr") or re.fullmatch(r"(tpred\d+|k\d+_index)_ptr", name):
            types[name] = "*i64"
        elif re.fullmatch(r"(inverse_temperature|weight|value_scale|loss_weight)_\d+", name):
            types[name] = "fp32"
        elif name in ("V", "vocab_start", "V_total") or re.fullmatch(r"stride_\w+|vocab_t\d+", name):
            types[name] = "i32"
        else:
            raise ValueError(f"unknown kernel argument {name!r}: teach kernels/report.py its type")
    return types


def compile_sm90(spec: KernelSpec, phase: str = "single", vocab: int = 128256, dtype: str = "bf16"):
    """The kernel of `spec` compiled for sm_90 with the tile the launcher picks at `vocab`; returns
    (compiled kernel, BLOCK_V, num_warps)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel_module(spec, phase).fused_head_kernel
    block, warps, vec = tile_shape(vocab, spec.tile_streams, _BYTES[dtype])
    forms = {
        name: kind
        for term in spec.terms
        if isinstance(term.target, TargetFragments)
        for name, kind in term.target.kernel_argument_types().items()
    }
    forms.update((names.row_input(t, name), "*fp32") for t, name in spec.row_inputs)
    types = argument_types(fn.arg_names, _POINTERS[dtype], forms)
    # as Triton's JIT specializes a launch: pointers from torch's allocator and sizes, strides and
    # offsets that are multiples of 16 (a vocab divisible by 16) are marked so, which lets it vectorize
    aligned = {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(fn.arg_names)
        if types[name].startswith("*") or (types[name] == "i32" and vocab % 16 == 0)
    }
    source = ASTSource(fn=fn, signature=types, constexprs={"BLOCK_V": block, "VEC": vec}, attrs=aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    return kernel, block, warps


def cuobjdump_output(cubin: bytes, flag: str) -> str:
    """What `cuobjdump FLAG` prints for a cubin (`-sass`, `--dump-resource-usage`)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(cuobjdump()), flag, file.name], capture_output=True, text=True, check=True).stdout


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


class Instruction(NamedTuple):
    address: int
    opcode: str
    operands: str
    predicated: bool  # runs under a predicate (@P0 ...): a branch so marked may fall through


def sass_instructions(sass: str) -> list[Instruction]:
    """Every instruction of cuobjdump's SASS listing, in address order."""
    return [
        Instruction(int(m.group(1), 16), m.group(3), m.group(4), m.group(2) is not None)
        for m in _INSTRUCTION.finditer(sass)
    ]


def _branch_target(instruction: Instruction) -> int | None:
    if not instruction.opcode.startswith("BRA"):
        return None
    target = re.search(r"0x([0-9a-f]+)", instruction.operands)
    return None if target is None else int(target.group(1), 16)


def tile_loops(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The bodies of the loops that read global memory, in address order: the passes over the row.

    A loop is a backward branch; the generated kernels have no nested loops, and the one loop that
    loads nothing (zeroing the gradient of a masked row) is left out.
    """
    loops = []
    for index, instruction in enumerate(instructions):
        start = _branch_target(instruction)
        if start is None or start >= instruction.address:
            continue
        body = [entry for entry in instructions[: index + 1] if entry.address >= start]
        if any(entry.opcode.startswith("LDG") for entry in body):
            loops.append(body)
    return sorted(loops, key=lambda body: body[0].address)


def common_path(body: list[Instruction]) -> list[Instruction]:
    """The instructions one trip through a loop body executes on its cheapest path.

    A body may branch forward: a tile loop that reads the label is written twice, and only the tile
    holding the label's column takes the longer copy (`tiles.Tiles.tile_body`). That is the
    only branch the generator writes inside a loop, so the cheapest path is the one every other tile
    takes, the per-element cost at scale. (A body with other branches would be counted on its
    cheapest path too, which would under-count it: `PassCost.branches` says how many there are.)
    """
    position = {entry.address: index for index, entry in enumerate(body)}
    best: list[list[Instruction]] = [[] for _ in range(len(body) + 1)]
    for index in range(len(body) - 1, -1, -1):
        entry = body[index]
        target = _branch_target(entry)
        if index == len(body) - 1 or target is None or target not in position or target < entry.address:
            onward = best[index + 1] if index < len(body) - 1 else []
        elif entry.predicated:
            onward = min(best[index + 1], best[position[target]], key=len)
        else:
            onward = best[position[target]]
        best[index] = [entry, *onward]
    return best[0]


def occupancy(registers: int, warps: int, shared_bytes: int) -> float:
    """Theoretical occupancy on sm_90: resident warps per SM / 64."""
    per_warp = -(-registers * 32 // REGISTER_GRANULE) * REGISTER_GRANULE
    by_registers = SM90_REGISTERS // (per_warp * warps) if per_warp else SM90_MAX_BLOCKS
    by_shared = SM90_SHARED_BYTES // shared_bytes if shared_bytes else SM90_MAX_BLOCKS
    blocks = min(by_registers, by_shared, SM90_MAX_BLOCKS, SM90_MAX_WARPS // warps)
    return blocks * warps / SM90_MAX_WARPS


def report(spec: KernelSpec, phase: str = "single", vocab: int = 128256, dtype: str = "bf16") -> KernelReport:
    """Compile `spec` for sm_90 and read its costs (see the module docstring)."""
    kernel, block, warps = compile_sm90(spec, phase, vocab, dtype)
    cubin = kernel.asm["cubin"]
    usage = cuobjdump_output(cubin, "--dump-resource-usage")
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = max(int(v) for v in re.findall(r"LOCAL:(\d+)", usage))
    shared = max(int(v) for v in re.findall(r"SHARED:(\d+)", usage))
    per_thread = block / (32 * warps)
    passes = []
    for body in tile_loops(sass_instructions(cuobjdump_output(cubin, "-sass"))):
        opcodes = [entry.opcode for entry in common_path(body)]
        passes.append(
            PassCost(
                instructions=round(len(opcodes) / per_thread, 2),
                mufu=round(sum(op.startswith("MUFU") for op in opcodes) / per_thread, 2),
                barriers_per_tile=sum(op.startswith("BAR") for op in opcodes),
                shuffles_per_tile=sum(op.startswith("SHFL") for op in opcodes),
                branches=sum(
                    entry.opcode.startswith("BRA") and (_branch_target(entry) or 0) > entry.address for entry in body
                ),
            )
        )
    return KernelReport(block, warps, registers, spills, shared, occupancy(registers, warps, shared), tuple(passes))
