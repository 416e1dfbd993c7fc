"""Keeping ranks in step: every loop that runs forward passes outside the training step (evaluation, reference
scoring, rollouts' micro-batches) must run the *same number* of passes on every rank, because under ZeRO-3 a
forward pass is collective (it gathers partitioned parameters) and DDP/DeepSpeed reduce gradients in lock-step.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")

__all__ = ["rank_shard", "even_batches", "global_max", "mean_over_ranks", "sum_over_ranks"]


def rank_shard(n: int, backend) -> list[int]:
    """Indices ``rank, rank + W, ...`` of ``n`` items: this rank's share of an evaluation set (every item once)."""
    return list(range(backend.rank, n, backend.world_size))


def global_max(backend, n: int) -> int:
    """The largest ``n`` over all ranks."""
    t = torch.tensor([float(n)], dtype=torch.float64)
    backend.all_reduce(t, "max")
    return int(t[0])


def even_batches(backend, items: Sequence[T], batch_size: int, filler: T) -> Iterator[tuple[list[T], bool]]:
    """This rank's ``items`` in batches of ``batch_size`` as ``(batch, is_padding)``. Every rank yields the same
    number of batches: a rank that runs out yields ``([filler], True)`` — run the forward pass (the collective)
    and discard its result."""
    n = global_max(backend, math.ceil(len(items) / batch_size))
    for b in range(n):
        chunk = list(items[b * batch_size:(b + 1) * batch_size])
        yield (chunk, False) if chunk else ([filler], True)


def sum_over_ranks(backend, sums: dict[str, float]) -> dict[str, float]:
    """Element-wise sum of ``sums`` over ranks (keys of rank 0; a key a rank lacks counts 0 there)."""
    keys = backend.broadcast_object(sorted(sums))
    t = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64)
    backend.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def mean_over_ranks(backend, values: dict[str, Any]) -> dict[str, float]:
    """Mean of ``values`` over ranks (each rank reports its own, e.g. rollout statistics)."""
    return {k: v / backend.world_size for k, v in sum_over_ranks(backend, values).items()}
