"""CPU fast path of `llm_trainer.generation.generate`: oneDNN-prepacked and fused linear weights for one call.

Decoding multiplies a few rows by every weight matrix at each step; on CPU these matmuls are memory-bound, and
MKL repacks the weight at every call. `PrepackedLinears` serves plain `nn.Linear` modules from copies reordered
into oneDNN's blocked layout for the duration of one `generate` call (and fuses q/k/v and gate/up).
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CPU_PREPACK_MIN_NUMEL", "CPU_PREPACK_MIN_NEW_TOKENS", "CPU_PREPACK_MIN_ROWS", "PrepackedLinears",
           "pack_weight", "packed_linear", "prepack_supported"]

#: CPU fast path: during `generate`, fp32 `nn.Linear` weights of at least this many elements (and a tied output
#: projection) are served from copies reordered into oneDNN's blocked layout, which makes the small-batch matmuls
#: of decoding faster (they are memory-bound, and MKL would repack the weight at every call). The copies are made
#: at the start of every call (never cached: a `param.data.copy_()` does not bump the tensor version, so a cache
#: could serve stale weights) and dropped at its end; generations shorter than `CPU_PREPACK_MIN_NEW_TOKENS` skip
#: it (the reordering would not pay off). Attention q/k/v and MLP gate/up are packed as one concatenated weight
#: each (one matmul instead of three / two: `Attention.fused_qkv`, `MLP.fused_gate_up`). With fewer than
#: `CPU_PREPACK_MIN_ROWS` rows (batch-1 decoding is a matrix-vector product, which the reordering does not speed up)
#: nothing is reordered; only the q/k/v and gate/up concatenations are made. Set `CPU_PREPACK_MIN_NUMEL = None` to
#: disable all of it.
CPU_PREPACK_MIN_NUMEL: int | None = 1 << 16
CPU_PREPACK_MIN_NEW_TOKENS: int = 16
CPU_PREPACK_MIN_ROWS: int = 2


def prepack_supported() -> bool:
    return (CPU_PREPACK_MIN_NUMEL is not None and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_weight(weight: torch.Tensor, batch: int) -> torch.Tensor | None:
    """A oneDNN-packed copy of ``weight``, or None when the fast path does not apply."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2 \
            or hasattr(weight, "ds_id") or CPU_PREPACK_MIN_NUMEL is None or weight.numel() < CPU_PREPACK_MIN_NUMEL:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch)
    except (RuntimeError, NotImplementedError):  # a build or CPU without this path: plain F.linear
        return None


class PrepackedLinears:
    """Within one `generate` call (the model is not run by anything else meanwhile), serve plain `nn.Linear` modules
    from packed copies of their current weights; the original forwards are restored on exit."""

    def __init__(self, model: nn.Module, batch: int, enabled: bool):
        self.model, self.batch, self.enabled, self.patched = model, batch, enabled, []

    def __enter__(self):
        self.fused = []
        if not self.enabled or not prepack_supported():
            return self
        from llm_trainer.model.layers import MLP, Attention

        # Attention q/k/v and MLP gate/up: one packed concatenated weight each (one matmul instead of 3 / 2; each
        # output column is the same dot product as before). Other plain linears: packed one by one.
        fused_linears: set[int] = set()
        for m in self.model.modules():
            if isinstance(m, Attention):
                attr, parts = "fused_qkv", (m.q_proj, m.k_proj, m.v_proj)
            elif isinstance(m, MLP):
                attr, parts = "fused_gate_up", (m.gate_proj, m.up_proj)
            else:
                continue
            if getattr(m, attr, None) is not None or not all(_plain_linear(p) for p in parts):
                continue
            fn = _fused_packed(parts, self.batch)
            if fn is not None:
                setattr(m, attr, fn)
                self.fused.append((m, attr))
                fused_linears.update(id(p) for p in parts)
        for m in self.model.modules():
            if not _plain_linear(m) or id(m) in fused_linears or self.batch < CPU_PREPACK_MIN_ROWS:
                continue
            packed = pack_weight(m.weight, self.batch)
            if packed is not None:
                m.forward = functools.partial(packed_linear, packed, m.bias)
                self.patched.append(m)
        return self

    def __exit__(self, *exc):
        for m in self.patched:
            m.__dict__.pop("forward", None)
        for m, attr in self.fused:
            setattr(m, attr, None)
        self.patched, self.fused = [], []
        return False


def _plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and "forward" not in m.__dict__


def _fused_packed(linears: Sequence[nn.Linear], batch: int):
    """A callable computing ``cat([l(x) for l in linears], -1)`` with one matmul over the concatenated weight
    (oneDNN-packed for ``batch >= CPU_PREPACK_MIN_ROWS``), or None (not applicable: not on CPU, mixed
    dtypes/devices/bias presence, ZeRO-3 partitioned weights, or no packing on this build)."""
    ws = [m.weight for m in linears]
    if any(hasattr(w, "ds_id") or w.dtype != ws[0].dtype or w.device != ws[0].device or w.dim() != 2
           or w.shape[1] != ws[0].shape[1] for w in ws):
        return None
    has_bias = [m.bias is not None for m in linears]
    if any(has_bias) and not all(has_bias):
        return None
    bias = torch.cat([m.bias.detach() for m in linears]) if all(has_bias) else None
    if batch < CPU_PREPACK_MIN_ROWS:
        w = ws[0]
        if w.device.type != "cpu" or CPU_PREPACK_MIN_NUMEL is None:
            return None
        return functools.partial(F.linear, weight=torch.cat([w.detach() for w in ws]), bias=bias)
    packed = pack_weight(torch.cat([w.detach() for w in ws]), batch)
    if packed is None:
        return None
    return functools.partial(packed_linear, packed, bias)
