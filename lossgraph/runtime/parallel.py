"""Beyond one GPU: vocab-parallel heads and global token normalization, over torch.distributed.

Vocab parallel (tensor parallel on the LM head): rank r of a group of R holds columns
[r V/R, (r+1) V/R) of every head's and dense teacher's logits; labels and top-k indices stay global
token ids. Every rank ends with the same loss and the slice of the gradient for its own columns.

- The fused backend keeps the slices: each rank's first pass produces partial softmax statistics
  (max, sum-exp, ...), which are all-reduced once per head (max first, then the sums rescaled to the
  common max); the last pass computes the terms and the local gradient slice.
- The reference backend (the ground truth) gathers the slices into full rows and runs the ordinary
  math; the gather's backward hands each rank the slice of the gradient for its columns.

Data parallel: with `normalize_across`, each head's count of unmasked tokens is all-reduced, so the
loss is normalized by the global count and the gradient does not depend on how tokens are split.

DTensor inputs (torchtitan-style tensor parallelism: `ColwiseParallel(use_local_output=False)` on the
LM head hands out logits as a DTensor sharded on the vocab, `Shard(-1)`): such a head is vocab parallel
over the group of its mesh dimension, and the rank's columns follow from its mesh coordinate. lossgraph
works on `to_local()` inside autograd, so the gradient goes back as a DTensor with the same placement.

Collectives follow the group: every tensor a collective here takes (token counts, softmax statistics,
argmax ids, vocab slices) is handed to torch.distributed on the device its group's backend works on
(CUDA for NCCL, the CPU for gloo), and the result comes back to the device the tensor came from. With
matching devices (CUDA tensors on an NCCL group, CPU tensors on a gloo group) nothing is copied.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InputError


def group_size(group) -> int:
    """The size of `group`, with a clear error when torch.distributed is not set up."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError("vocab_parallel_group / normalize_across need torch.distributed to be initialized first")
    return dist.get_world_size(group)


@dataclass(frozen=True)
class VocabShard:
    """The columns of a vocab of `total` tokens that this rank of `group` holds: [start, start + size)."""

    total: int
    group: object

    @property
    def ranks(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def size(self) -> int:
        return self.total // self.ranks

    @property
    def start(self) -> int:
        return dist.get_rank(self.group) * self.size


def is_dtensor(value) -> bool:
    """Whether `value` is a torch.distributed DTensor. No DTensor exists before torch.distributed.tensor is
    imported, so this imports nothing (and costs nothing) for plain tensors."""
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return cls is not None and isinstance(value, cls)


def same_ranks(first, second) -> bool:
    """Whether two process groups hold the same ranks (collectives over either give the same results)."""
    return first is second or dist.get_process_group_ranks(first) == dist.get_process_group_ranks(second)


def _placements(tensor) -> str:
    return "(" + ", ".join(repr(p) for p in tensor.placements) + ("," if len(tensor.placements) == 1 else "") + ")"


def dtensor_vocab_group(tensor, what: str, vocab_size: int):
    """The process group a DTensor's last (vocab) dimension is split over, None for a replicated one.

    Accepted: every mesh dimension `Replicate()`, or one `Shard(-1)` (the vocab split evenly over that
    mesh dimension's ranks, as ColwiseParallel gives logits) and `Replicate()` on the others. Anything else
    (positions split over ranks, partial sums, the vocab split twice) is an InputError that names `what`,
    the placements and what to pass instead.
    """
    placements = _placements(tensor)
    last = tensor.dim() - 1
    sharded = None
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            continue
        name = type(placement).__name__
        if placement.is_partial():
            raise InputError(
                f"{what} is a DTensor with placements {placements}: it holds partial sums over mesh dimension "
                f"{mesh_dim}, not logits; pass it redistributed to Replicate() or to Shard(-1) on that dimension "
                "(the vocab split over the ranks, as ColwiseParallel(use_local_output=False) gives it)"
            )
        if name == "Shard" and placement.dim % tensor.dim() == last and sharded is None:
            sharded = mesh_dim
            continue
        if name == "Shard" and placement.dim % tensor.dim() != last:
            part = "batch rows" if placement.dim % tensor.dim() == 0 and tensor.dim() == 3 else "positions"
            raise InputError(
                f"{what} is a DTensor with placements {placements}: its {part} (dim {placement.dim}) are split "
                "over the ranks, and lossgraph takes DTensors split on the last (vocab) dimension, Shard(-1), or "
                "replicated. Redistribute it to Shard(-1) or Replicate(), or, for data parallel, pass "
                f"{what}.to_local() with this rank's labels and compile with normalize_across=<that group>"
            )
        raise InputError(
            f"{what} is a DTensor with placements {placements}; lossgraph takes DTensors split once on the last "
            "(vocab) dimension, Shard(-1), with Replicate() on every other mesh dimension, or replicated: "
            "redistribute it to one of these"
        )
    if sharded is None:
        return None
    mesh = tensor.device_mesh
    group = mesh.get_group(sharded)
    ranks = mesh.size(sharded)
    if vocab_size % ranks:
        raise InputError(
            f"{what} is a DTensor split over {ranks} ranks on the vocab, but the vocab ({vocab_size}) does not "
            f"split evenly over {ranks} ranks: vocab parallel needs a vocab_size divisible by the ranks"
        )
    coordinate = mesh.get_coordinate()
    if coordinate is None or coordinate[sharded] != dist.get_rank(group):
        raise InputError(
            f"{what}: this rank's coordinate on mesh dimension {sharded} ({coordinate}) is not its rank in that "
            "dimension's process group; pass logits.to_local() and vocab_parallel_group= a group in mesh order"
        )
    return group


# The device types each backend works on natively (gloo also accepts CUDA tensors, through host copies
# of its own); a backend not named here takes the device types its configuration lists.
_HOME = {"nccl": ("cuda",), "gloo": ("cpu",), "mpi": ("cpu",), "ucc": ("cpu", "cuda"), "xccl": ("xpu",)}
_HOMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> its backends' device types


def backend_config(group) -> str:
    """torch.distributed's backend configuration of `group`, e.g. "cuda:nccl" or "cpu:gloo,cuda:gloo"."""
    return dist.get_backend_config(group)


def _home_types(group) -> frozenset[str]:
    """The device types whose tensors the collectives of `group` take without a copy (cached per group)."""
    key = dist.group.WORLD if group is None else group
    try:
        return _HOMES[key]
    except (KeyError, TypeError):  # TypeError: a group that takes no weak reference (not cached)
        pass
    homes = set()
    for entry in backend_config(group).split(","):
        device_type, _, backend = entry.strip().rpartition(":")
        homes.update(_HOME.get(backend.lower(), (device_type or "cpu",)))
    found = frozenset(homes)
    try:
        _HOMES[key] = found
    except TypeError:
        pass
    return found


def collective_device(group, device: torch.device) -> torch.device:
    """Where a collective over `group` takes tensors that live on `device`: `device` itself when the
    group's backend works there, else that backend's device (the current CUDA device for NCCL, the
    CPU for gloo)."""
    homes = _home_types(group)
    if device.type in homes:
        return device
    if "cuda" in homes:
        return torch.device("cuda", torch.cuda.current_device())
    if "cpu" in homes:
        return torch.device("cpu")
    return device


class GatherVocab(torch.autograd.Function):
    """Concatenate every rank's vocab slice into full rows; backward keeps this rank's columns.

    Whatever is computed from the full rows is computed identically on every rank (each holds a copy
    of the loss), so the gradient of this rank's slice is its columns of the full gradient.
    """

    @staticmethod
    def forward(ctx, part: torch.Tensor, shard: VocabShard) -> torch.Tensor:
        ctx.columns = (shard.start, shard.size)
        device = collective_device(shard.group, part.device)
        local = part.detach().to(device).contiguous()
        pieces = [torch.empty_like(local) for _ in range(shard.ranks)]
        dist.all_gather(pieces, local, group=shard.group)
        return torch.cat(pieces, dim=-1).to(part.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start, size = ctx.columns
        return grad[..., start : start + size], None


def all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    """A reduced copy of `tensor` (not differentiable), on `tensor`'s device; the collective itself runs
    on the device the group's backend takes."""
    device = collective_device(group, tensor.device)
    total = tensor.detach().to(device, copy=True)
    dist.all_reduce(total, op=op, group=group)
    return total.to(tensor.device)


def combine_statistics(generator, statistics, group):
    """Combine every rank's per-row statistics of a vocab-parallel launch into whole-vocab ones.

    Three collectives: the maxima (and argmax values) with MAX; every sum, rescaled from its rank's
    max to the common one, with SUM (exp(m_r - m) S_r sums to S; a centered moment also moves by
    (m_r - m) per unit of mass); the argmax ids with MIN among the ranks that hold the maximum.
    """
    from ..kernels.launcher import SliceStatistics

    entries = generator.float_stats()
    floats = statistics.floats
    # columns are taken and written one by one: indexing with a Python list would sync with the GPU
    peaks = [c for c, (_, kind, _) in enumerate(entries) if kind in ("max", "argmax")]
    highest = all_reduce(_columns(floats, peaks), dist.ReduceOp.MAX, group)
    combined = floats.clone()
    _set_columns(combined, peaks, highest)
    factor, shift = {}, {}
    for c, (_, kind, state) in enumerate(entries):
        if kind == "max":
            local, overall = floats[:, c], combined[:, c]
            empty = torch.isneginf(local)  # nothing finite in this slice: it contributes nothing
            factor[state] = torch.where(empty, 0.0, torch.exp(local - overall))
            shift[state] = torch.where(empty, 0.0, local - overall)
    sums = {state: floats[:, c] for c, (_, kind, state) in enumerate(entries) if kind == "sum_exp"}
    added = [c for c, (_, kind, _) in enumerate(entries) if kind in ("sum_exp", "scaled", "moment", "sum")]
    parts = []
    for c in added:
        _, kind, state = entries[c]
        value = floats[:, c]
        if kind in ("sum_exp", "scaled"):
            value = value * factor[state]
        elif kind == "moment":
            value = factor[state] * (value + shift[state] * sums[state])
        parts.append(value[:, None])
    widths = [z.shape[1] for z in statistics.topk_logits]
    total = all_reduce(torch.cat([*parts, *statistics.topk_logits], dim=1), dist.ReduceOp.SUM, group)
    _set_columns(combined, added, total[:, : len(added)])
    # the kernels address these buffers as contiguous [N, width] rows
    topk_logits = [part.to(torch.float32).contiguous() for part in total[:, len(added) :].split(widths, dim=1)]
    values = [c for c, (_, kind, _) in enumerate(entries) if kind == "argmax"]
    holds_max = _columns(floats, values) == _columns(combined, values)
    candidates = torch.where(holds_max, statistics.ints, torch.iinfo(torch.int64).max)
    ints = all_reduce(candidates, dist.ReduceOp.MIN, group)
    return SliceStatistics(combined, ints, topk_logits)


def _columns(tensor: torch.Tensor, columns: list[int]) -> torch.Tensor:
    return torch.stack([tensor[:, c] for c in columns], dim=1)


def _set_columns(tensor: torch.Tensor, columns: list[int], values: torch.Tensor) -> None:
    for index, column in enumerate(columns):
        tensor[:, column] = values[:, index]


def global_counts(counts: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Each head's count of unmasked tokens summed over the group, in one all-reduce."""
    return list(all_reduce(torch.stack(counts), dist.ReduceOp.SUM, group).unbind(0))
