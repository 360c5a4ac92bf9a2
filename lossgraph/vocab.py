"""Reductions over the vocabulary dimension, on one device or across a vocab-parallel group.

The reference math sums, normalizes and gathers over the last dimension of `[N, V]` tensors only
through a `Vocab`, so the same formulas run whether one device holds the whole vocabulary (`Vocab`)
or each rank of a tensor-parallel group holds a slice of it (`lossgraph.parallel.VocabShard`).
"""

from __future__ import annotations

import torch


class Vocab:
    """The whole vocabulary on this device: columns [0, size) are global ids [0, size)."""

    def __init__(self, size: int):
        self.size = size  # columns held here
        self.total = size  # columns of the whole vocabulary
        self.start = 0  # global id of the first column held here

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over the vocabulary: [N, V] -> [N]."""
        return values.sum(-1)

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        """log sum_j exp(x_j) over the vocabulary: [N, V] -> [N, 1]."""
        return torch.logsumexp(x, dim=-1, keepdim=True)

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x, dim=-1)

    def local(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(column of each global id here, whether this device holds it); ids outside are column 0."""
        held = (ids >= self.start) & (ids < self.start + self.size)
        return torch.where(held, ids - self.start, 0), held

    def take(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x at global ids [N, k]; NaN for an id outside the whole vocabulary (an unchecked bad input)."""
        columns, held = self.local(ids)
        values = torch.where(held, x.gather(1, columns), 0.0)
        return torch.where((ids >= 0) & (ids < self.total), values, torch.nan)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Global id of each row's maximum (the first one on ties)."""
        return x.argmax(-1) + self.start
