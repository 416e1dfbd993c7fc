"""A streaming ``.safetensors`` writer: tensors go to the file one at a time, straight from their memory.

`safetensors.torch.save_file` first converts every tensor of the file to a ``bytes`` copy and then writes them, so
saving a model briefly holds it twice. Here the header is computed from shapes and dtypes alone, then each tensor's
bytes are written from its own storage; a :class:`DeferredTensor` (e.g. a LoRA-merged weight) is computed just
before it is written and dropped after, so a merged export never holds more than one merged weight at a time.

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` padded with spaces to a
multiple of 8 bytes, then the tensors' bytes back to back (ordered, as the reference writer orders them, by dtype
size, largest first, then name — every tensor stays aligned to its element size).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Mapping, Union

import torch

__all__ = ["DeferredTensor", "materialize", "write_safetensors"]

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class DeferredTensor:
    """A tensor of known ``shape`` and ``dtype`` that ``compute()`` produces when it is needed."""

    def __init__(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, compute: Callable[[], torch.Tensor]):
        self.shape, self.dtype, self._compute = torch.Size(shape), dtype, compute

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def materialize(self) -> torch.Tensor:
        t = self._compute()
        if t.shape != self.shape or t.dtype != self.dtype:
            raise RuntimeError(f"a deferred tensor computed {tuple(t.shape)} {t.dtype}, announced "
                               f"{tuple(self.shape)} {self.dtype}")
        return t


TensorLike = Union[torch.Tensor, DeferredTensor]


def materialize(state: Mapping[str, TensorLike]) -> dict[str, torch.Tensor]:
    """``state`` with every :class:`DeferredTensor` computed (for writers that need the whole dict at once)."""
    return {k: v.materialize() if isinstance(v, DeferredTensor) else v for k, v in state.items()}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, TensorLike],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU tensors or :class:`DeferredTensor`) to ``path`` in the safetensors format, fsynced."""
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            raise ValueError(f"{path}: tensor {name!r} is on {t.device}; move it to the CPU first")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            t = tensors[name]
            data = t.materialize() if isinstance(t, DeferredTensor) else t.detach()
            data = data.contiguous().reshape(-1)
            if data.numel():
                f.write(memoryview(data.view(torch.uint8).numpy()))
            del data
        f.flush()
        os.fsync(f.fileno())
