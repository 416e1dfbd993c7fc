"""KVCache: per-layer key/value tensors `[B, kv_heads, T, head_dim]`, growing by concatenation or preallocated;
StaticKVCache: fixed-shape buffers written at a device-side position (decoding under CUDA graphs)."""
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


class StaticKVCache:
    """Fixed-shape key/value buffers for decoding one token per step under CUDA graphs
    (`torch.compile(mode="reduce-overhead")`, see `llm_trainer.generation`).

    Per layer `[B, kv_heads, max_length, head_dim]`, zero where nothing was written (masked keys then weigh 0,
    never NaN). `update` writes the step's keys/values at `position` — a 1-element device tensor that the caller
    advances in place, so one captured graph serves every step — and returns the whole buffers; the caller's
    attention mask hides the positions not written yet. No Python-side length changes between steps.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.position = torch.zeros(1, dtype=torch.long, device=keys[0].device)

    @classmethod
    def like(cls, cache: KVCache, max_length: int) -> StaticKVCache:
        """Zeroed buffers of `max_length` positions shaped like the layers of `cache` (batch, heads, dtype)."""
        def zeros(t: torch.Tensor) -> torch.Tensor:
            return t.new_zeros((t.shape[0], t.shape[1], max_length, t.shape[3]))

        return cls([zeros(k) for k in cache.keys], [zeros(v) for v in cache.values])

    def fits(self, cache: KVCache, max_length: int) -> bool:
        """Whether these buffers can take `cache` (same layers, batch, heads, dtype, device) with `max_length`."""
        return len(self.keys) == len(cache.keys) and all(
            b.shape == (t.shape[0], t.shape[1], max_length, t.shape[3]) and b.dtype == t.dtype and b.device == t.device
            for b, t in zip(self.keys + self.values, cache.keys + cache.values))

    def load(self, cache: KVCache) -> StaticKVCache:
        """Copy `cache` (a prefilled prompt) into the first positions, zero the rest; `position` = its length."""
        n = cache.get_seq_length()
        if n > self.keys[0].shape[2]:
            raise ValueError(f"StaticKVCache: {n} cached positions exceed max_length={self.keys[0].shape[2]}")
        for buffers, source in ((self.keys, cache.keys), (self.values, cache.values)):
            for b, t in zip(buffers, source):
                b[:, :, :n].copy_(t[:, :, :n])
                b[:, :, n:].zero_()
        self.position.fill_(n)
        return self

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`/`v` `[B, H, 1, D]` at `position` of `layer_idx`; return that layer's whole buffers."""
        self.keys[layer_idx].index_copy_(2, self.position, k)
        self.values[layer_idx].index_copy_(2, self.position, v)
        return self.keys[layer_idx], self.values[layer_idx]
