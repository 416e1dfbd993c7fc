"""KVCache: per-layer key/value tensors `[B, kv_heads, T, head_dim]`, growing by concatenation or preallocated."""
from __future__ import annotations

import torch


class KVCache:
    """Key/value cache for incremental decoding.

    `max_length=None`: each `update` concatenates (simple, reallocates every step).
    `max_length=N`: buffers of N positions are allocated on the first update of each layer and filled in place
    (no reallocation while decoding); exceeding N raises.
    """

    def __init__(self, max_length: int | None = None):
        if max_length is not None and max_length <= 0:
            raise ValueError(f"KVCache.max_length must be positive, got {max_length}")
        self.max_length = max_length
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions (0 when empty)."""
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0

    @property
    def batch_size(self) -> int | None:
        return self.keys[0].shape[0] if self.keys else None

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `k`/`v` `[B, H, S, D]` for `layer_idx`; return all cached keys/values of that layer."""
        if layer_idx > len(self.keys):
            raise ValueError(f"KVCache: layer {layer_idx} updated before layer {len(self.keys)}")
        S = k.shape[2]
        if layer_idx == len(self.keys):  # first update of this layer
            if self.max_length is None:
                self.keys.append(k)
                self.values.append(v)
            else:
                self._check_room(0, S)
                shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
                kb, vb = k.new_empty(shape), v.new_empty(shape)
                kb[:, :, :S], vb[:, :, :S] = k, v
                self.keys.append(kb)
                self.values.append(vb)
            self.lengths.append(S)
        else:
            start = self.lengths[layer_idx]
            if self.max_length is None:
                self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)
                self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
            else:
                self._check_room(start, S)
                self.keys[layer_idx][:, :, start:start + S] = k
                self.values[layer_idx][:, :, start:start + S] = v
            self.lengths[layer_idx] = start + S
        n = self.lengths[layer_idx]
        return self.keys[layer_idx][:, :, :n], self.values[layer_idx][:, :, :n]

    def _check_room(self, start: int, add: int) -> None:
        if start + add > self.max_length:
            raise ValueError(f"KVCache is full: {start} + {add} positions exceed max_length={self.max_length}")

    def repeat_interleave(self, n: int) -> KVCache:
        """Repeat every batch row `n` times in place (share a prefilled prompt across a group of samples)."""
        self.keys = [k.repeat_interleave(n, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(n, dim=0) for v in self.values]
        return self

    def index_select(self, index: torch.Tensor) -> KVCache:
        """Keep/reorder batch rows by `index` in place (e.g. drop finished sequences)."""
        self.keys = [k.index_select(0, index.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, index.to(v.device)) for v in self.values]
        return self

    def crop(self, length: int) -> KVCache:
        """Forget cached positions beyond `length`."""
        for i, n in enumerate(self.lengths):
            self.lengths[i] = min(n, length)
            if self.max_length is None:
                self.keys[i] = self.keys[i][:, :, :length]
                self.values[i] = self.values[i][:, :, :length]
        return self
