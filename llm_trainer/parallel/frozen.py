"""Backend-independent pieces of frozen models and of the output projection (see ``Backend.frozen_replica`` and
``Backend.output_projection``): freezing, a hook-free detached copy, casting, finding the LM head."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

__all__ = ["check_replica_args", "built_module", "freeze", "detached_copy", "cast_floating_params",
           "head_parameters", "model_hidden_size"]

# The hook tables wrappers fill (DDP, DeepSpeed engines, ZeRO-3 parameter fetching); a replica starts without them.
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def check_replica_args(source: nn.Module | None, build: Callable[[], nn.Module] | None) -> None:
    """``frozen_replica`` takes exactly one of ``source`` (a module to copy) and ``build`` (a constructor)."""
    if (source is None) == (build is None):
        raise ValueError("frozen_replica needs exactly one of source= (a module whose current weights are copied) "
                         "and build= (a zero-argument callable that constructs the module and loads its weights)")
    if source is not None and not isinstance(source, nn.Module):
        raise TypeError(f"frozen_replica(source=...) must be an nn.Module, got {type(source).__name__}")
    if build is not None and not callable(build):
        raise TypeError(f"frozen_replica(build=...) must be callable, got {type(build).__name__}")


def built_module(build: Callable[[], nn.Module]) -> nn.Module:
    """Call ``build`` and check that it returned a module."""
    module = build()
    if not isinstance(module, nn.Module):
        raise TypeError(f"frozen_replica(build=...) must return an nn.Module, got {type(module).__name__} "
                        f"(a loader that fills the model in place returns None: return the model itself)")
    return module


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, ``requires_grad=False`` everywhere, gradient checkpointing off (where the module has it)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    if hasattr(module, "set_gradient_checkpointing"):
        module.set_gradient_checkpointing(False)
    return module


def detached_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters are detached clones (no gradients, no parameter hooks) and whose modules carry
    no forward/backward hooks: the hooks a DDP or DeepSpeed wrapper put on ``module`` belong to that wrapper's
    state (calling them from the copy would drive the training engine). Tied parameters stay tied."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
    for m in module.modules():
        for table in _HOOK_TABLES:
            hooks = m.__dict__.get(table)
            if hooks is not None:
                memo[id(hooks)] = OrderedDict()
    return copy.deepcopy(module, memo)


def cast_floating_params(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating-point parameters to ``dtype``; buffers keep theirs (e.g. rotary tables stay fp32), as the
    DeepSpeed engine casts a module for bf16/fp16 training."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return module


def head_parameters(model: nn.Module) -> tuple[nn.Parameter, nn.Parameter | None]:
    """``(weight [V, H], bias or None)`` of the LM head: ``model.lm_head`` when it exists, else the tied embedding
    weight from ``model.lm_head_weight()``. The head must be a plain ``nn.Linear`` (what ``LlmModel`` builds)."""
    head = getattr(model, "lm_head", None)
    if head is not None:
        if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
            raise TypeError(f"{type(model).__name__}.lm_head is a {type(head).__name__}; the output projection "
                            f"supports a plain nn.Linear head (or tied embeddings via lm_head_weight())")
        return head.weight, head.bias
    weight_of = getattr(model, "lm_head_weight", None)
    if weight_of is None:
        raise TypeError(f"{type(model).__name__} has neither lm_head nor lm_head_weight(): pass the language model "
                        f"itself (e.g. PolicyValueModel.policy, VlmModel or VlmModel.llm)")
    return weight_of(), None


def model_hidden_size(model: nn.Module) -> int | None:
    """``config.hidden_size`` of the model, or of its first submodule that has one (e.g. a policy inside a
    policy+value module); None when no module carries such a config."""
    for m in model.modules():
        size = getattr(getattr(m, "config", None), "hidden_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    return None
