"""ZeRO-3 pieces of the DeepSpeed backend's frozen replicas and output projection (parameters partitioned across
ranks; a parameter's ``data`` is empty outside the forward of the module that owns it).

Output projection. Chunked log-probs project hidden states onto the vocabulary chunk by chunk, after the model's
forward has released the head weight, and ranks project different numbers of chunks, so a per-chunk gather would
deadlock. :func:`gathered_projection` gathers the head once (every rank), keeps a full copy for the chunks, and
hands the copy's gradient back to the partitioned parameter through :class:`_GatheredHead`. PyTorch accumulates a
gradient into a parameter only when the parameter has its full shape, i.e. while DeepSpeed has it gathered; so the
module that owns the weight is also called once on an empty input (the *anchor*), and the backward of the copy
flows into that call: DeepSpeed's own backward hooks re-gather the parameter there, sum the gradient with the
module's (zero) one and reduce-scatter it like any other. The extra cost is one gather in forward and one in
backward, as for the full-logits forward, and one full copy of the head while the graph lives.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["gathered_projection", "copy_into_partitioned", "rebuild_like"]


class _GatheredHead(torch.autograd.Function):
    """Full copies of parameters that are gathered while it runs; backward passes their gradients through
    unchanged and gives the anchor a zero gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, *params: torch.Tensor):
        ctx.anchor_meta = (anchor.shape, anchor.dtype, anchor.device)
        return tuple(p.detach().clone() for p in params)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        shape, dtype, device = ctx.anchor_meta
        anchor_grad = torch.zeros(shape, dtype=dtype, device=device) if ctx.needs_input_grad[0] else None
        return (anchor_grad, *grads)


def _owner(model: nn.Module, weight: nn.Parameter) -> nn.Module:
    for module in model.modules():
        if any(p is weight for p in module.parameters(recurse=False)):
            return module
    raise ValueError(f"the head weight is not a parameter of {type(model).__name__}")


def _empty_call(module: nn.Module, weight: nn.Parameter, device: torch.device) -> torch.Tensor:
    """``module`` applied to an empty batch: through DeepSpeed's hooks, at no compute cost."""
    if isinstance(module, nn.Embedding):
        return module(torch.empty(0, dtype=torch.long, device=device))
    if isinstance(module, nn.Linear):
        return module(torch.empty(0, module.in_features, dtype=weight.dtype, device=device))
    raise TypeError(f"the head weight belongs to a {type(module).__name__}; under ZeRO-3 the output projection "
                    f"supports an nn.Linear head or a tied nn.Embedding")


def gathered_projection(model: nn.Module, weight: nn.Parameter, bias: nn.Parameter | None,
                        device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``project(hidden) = hidden @ W^T (+ b)`` from one gather of the ZeRO-3 head (collective)."""
    import deepspeed
    params = [weight] if bias is None else [weight, bias]
    # the anchor call also settles DeepSpeed's prefetcher: it may have the head in flight (it follows the module
    # order of earlier steps, which include this call), and a gather over an in-flight parameter is refused
    anchor = _empty_call(_owner(model, weight), weight, device)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        full = _GatheredHead.apply(anchor, *params)
    w, b = full[0], (full[1] if bias is not None else None)
    return lambda hidden: F.linear(hidden, w, b)


def rebuild_like(module: nn.Module) -> nn.Module:
    """A new module of the same architecture (``type(module)(module.config)``, what ``LlmModel`` and ``VlmModel``
    take), to be built inside ``zero.Init``; checks that its parameters match ``module``'s by name and shape."""
    config = getattr(module, "config", None)
    hint = ("under ZeRO-3, frozen_replica(source=...) rebuilds the module as type(source)(source.config) and copies "
            "the weights; pass build= (a callable constructing the model and loading its weights) instead")
    if config is None:
        raise TypeError(f"{type(module).__name__} has no config: {hint}")
    replica = type(module)(config)
    want = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
    got = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in replica.named_parameters()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise TypeError(f"{type(module).__name__}(config) differs from the source module (e.g. LoRA adapters) in "
                        f"{diff}: {hint}")
    return replica


def copy_into_partitioned(source: nn.Module, target: nn.Module, rank: int) -> None:
    """``target <- source`` parameter by parameter, each pair gathered in turn (collective: every rank calls it;
    rank 0 copies, DeepSpeed re-partitions the target from rank 0's copy, the source is only read). Buffers are
    never partitioned: copied directly."""
    import deepspeed
    targets = dict(target.named_parameters())
    for name, p in source.named_parameters():
        q = targets[name]
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None), \
                deepspeed.zero.GatheredParameters([q], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    q.data.copy_(p.data)
    buffers = dict(target.named_buffers())
    with torch.no_grad():
        for name, b in source.named_buffers():
            buffers[name].copy_(b)
