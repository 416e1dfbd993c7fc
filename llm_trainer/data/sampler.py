"""`ShardedSampler`: a deterministic, seekable, rank-sharded sampler.

The epoch order is a pseudo-random permutation of ``range(num_samples)`` computed *per position* by a keyed Feistel
network with cycle walking (a bijection on ``[0, 2^k)`` restricted to ``[0, n)``), so

- position ``p`` of epoch ``e`` is found in O(1) time and memory — no ``randperm(n)`` array (which would be 8 bytes per
  sample in every process), and resuming at any position reads nothing before it;
- the order depends only on ``(seed, epoch, n)``: the same on every machine, Python, numpy and torch version.

Sharding: the global order is split round-robin, rank ``r`` taking positions ``r, r + W, r + 2W, ...``, so ranks are
disjoint. ``drop_last=False`` pads the tail by repeating the start of the order so every rank gets the same number of
samples (DDP needs equal step counts); ``drop_last=True`` drops the last ``n mod W`` positions instead.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["ShardedSampler", "feistel_permutation"]

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_ROUNDS = 6


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _round_keys(seed: int, epoch: int) -> list[np.uint64]:
    base = np.array([(seed * 0x2545F4914F6CDD1D + epoch * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF], np.uint64)
    keys = []
    for r in range(_ROUNDS):
        base = _splitmix(base + np.uint64(r + 1))
        keys.append(base[0])
    return keys


def feistel_permutation(positions: np.ndarray, n: int, seed: int, epoch: int = 0) -> np.ndarray:
    """Image of ``positions`` (ints in ``[0, n)``) under the (seed, epoch)-keyed permutation of ``range(n)``."""
    p = np.asarray(positions, dtype=np.uint64)
    if n <= 1:
        return p.astype(np.int64)
    bits = max(2, int(n - 1).bit_length())
    bits += bits & 1
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = _round_keys(seed, epoch)

    def perm(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_splitmix(right ^ k) & mask)
        return (left << half) | right

    with np.errstate(over="ignore"):
        y = perm(p)
        out = y >= np.uint64(n)
        while out.any():  # cycle walking: at most a few rounds, the domain is < 4n
            y[out] = perm(y[out])
            out = y >= np.uint64(n)
    return y.astype(np.int64)


class ShardedSampler(Sampler[int]):
    """Indices of this rank's samples for the current epoch, from position ``start`` on.

    ``ShardedSampler(num_samples, rank, world_size, seed, shuffle, start=0, drop_last=False)``. Call
    ``set_epoch(e)`` (optionally with ``start``) before each epoch. ``len(sampler)`` counts the indices still to come;
    ``sampler[k]`` is this rank's k-th index of the epoch (O(1)). To resume after ``k`` of this rank's samples were
    consumed in epoch ``e``: ``set_epoch(e, start=k)``."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True, *,
                 start: int = 0, drop_last: bool = False):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_samples, self.rank, self.world_size = int(num_samples), int(rank), int(world_size)
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        if self.drop_last:
            self.per_rank = self.num_samples // self.world_size
        else:
            self.per_rank = -(-self.num_samples // self.world_size)
        self.total_size = self.per_rank * self.world_size
        self.epoch = 0
        self.start = 0
        self.set_start(start)

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start must be in [0, {self.per_rank}] (samples per rank), got {start}")
        self.start = int(start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = int(epoch)
        self.set_start(start)

    def __len__(self) -> int:
        return self.per_rank - self.start

    def _indices(self, ks: np.ndarray) -> np.ndarray:
        pos = ks * self.world_size + self.rank          # global positions in the (padded) epoch order
        pos = pos % max(self.num_samples, 1)            # padding repeats the start of the order
        if not self.shuffle:
            return pos.astype(np.int64)
        return feistel_permutation(pos, self.num_samples, self.seed, self.epoch)

    def __getitem__(self, k: int) -> int:
        if not 0 <= k < self.per_rank:
            raise IndexError(f"position {k} out of range [0, {self.per_rank})")
        return int(self._indices(np.array([k], np.int64))[0])

    def __iter__(self) -> Iterator[int]:
        block = 8192
        for s in range(self.start, self.per_rank, block):
            yield from self._indices(np.arange(s, min(self.per_rank, s + block), dtype=np.int64)).tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed, "num_samples": self.num_samples,
                "world_size": self.world_size}

    def __repr__(self) -> str:
        return (f"ShardedSampler(num_samples={self.num_samples}, rank={self.rank}, world_size={self.world_size}, "
                f"seed={self.seed}, shuffle={self.shuffle}, epoch={self.epoch}, start={self.start}, "
                f"drop_last={self.drop_last})")
