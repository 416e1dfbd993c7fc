"""Optimizers: weight-decay parameter groups, Lion, and `build_optimizer` from an `OptimConfig`.

Weight-decay policy (`build_param_groups`): only trainable parameters are included. A parameter is decayed when
its full shape has ≥ 2 dimensions (linear/conv weights, the untied LM head; under ZeRO-3 the full shape is
``ds_shape``, the local tensor being a 1-D partition) and is not the weight of an ``nn.Embedding``
(unless ``decay_embeddings=True``). Biases, norm scales and other 1-D/0-D tensors are never decayed. A tied
LM head shares the embedding Parameter and so follows the embedding rule. Embeddings are excluded by default
because decay pulls rare tokens' rows towards zero regardless of use (as in LLaMA-style recipes); set
``OptimConfig.decay_embeddings`` to decay them too (nanoGPT style).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["Lion", "build_param_groups", "build_optimizer"]


def _full_ndim(p: torch.Tensor) -> int:
    """Dimensions of the parameter's full shape: a ZeRO-3-partitioned parameter is a 1-D (often empty) local
    shard whose real shape is ``ds_shape``; deciding decay by ``p.ndim`` would exclude every matrix under ZeRO-3."""
    return len(getattr(p, "ds_shape", p.shape))


def build_param_groups(model: nn.Module | Iterable, weight_decay: float,
                       decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group (empty groups are dropped).

    `model` may be an ``nn.Module`` (embeddings are recognised by module type) or an iterable of parameters
    (then only the ≥2-D rule applies). Each group carries a ``group_name`` ('decay' / 'no_decay') and the
    parameter ``names`` (strings; kept in the optimizer state dict, useful to debug a resume).
    """
    if isinstance(model, nn.Module):
        embedding_ids = set()
        if not decay_embeddings:
            embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        named = list(model.named_parameters())  # named_parameters() already de-duplicates shared (tied) params
    else:
        embedding_ids = set()
        seen: set[int] = set()
        named = []
        for i, p in enumerate(model):
            if isinstance(p, dict):
                raise TypeError("build_param_groups: got parameter groups already; pass a module or parameters")
            if id(p) not in seen:
                seen.add(id(p))
                named.append((f"param_{i}", p))
    decay, no_decay = ([], []), ([], [])
    for name, p in named:
        if not p.requires_grad:
            continue
        target = decay if (_full_ndim(p) >= 2 and id(p) not in embedding_ids) else no_decay
        target[0].append(p)
        target[1].append(name)
    groups = []
    if decay[0]:
        groups.append({"params": decay[0], "weight_decay": float(weight_decay), "group_name": "decay",
                       "names": decay[1]})
    if no_decay[0]:
        groups.append({"params": no_decay[0], "weight_decay": 0.0, "group_name": "no_decay",
                       "names": no_decay[1]})
    if not groups:
        raise ValueError("build_param_groups: the model has no trainable parameters (all requires_grad=False)")
    return groups


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2), per parameter:

        c = β1·m + (1 − β1)·g
        θ = θ − lr·(sign(c) + λ·θ)          (decoupled weight decay λ, applied to the old θ)
        m = β2·m + (1 − β2)·g

    Paper defaults: β = (0.9, 0.99); use a 3–10× smaller lr and 3–10× larger weight decay than AdamW.
    State per parameter: ``exp_avg`` (m). ``maximize`` flips the gradient sign.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, maximize: bool = False):
        if not lr >= 0.0:
            raise ValueError(f"Lion: lr must be >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lion: betas must be in [0, 1), got {betas!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                if group.get("maximize", False):
                    grad = -grad
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                update = exp_avg.mul(beta1).add_(grad, alpha=1.0 - beta1).sign_()
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                p.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)
        return loss


def build_optimizer(model_or_params: nn.Module | Iterable, optim_config) -> torch.optim.Optimizer:
    """AdamW ('adam'/'adamw') or Lion ('lion') over `build_param_groups` with the config's resolved betas, eps
    and weight decay. Pre-built parameter groups (a list of dicts) are used as given. The initial lr is
    ``optim_config.initial_lr``; the scheduler sets the lr of every step.

    ``fused`` AdamW is used only when every parameter is on CUDA and ``auto_optimize_optimizer`` is set;
    otherwise torch picks foreach/for-loop (``fused=False`` on CPU)."""
    cfg = optim_config
    if isinstance(model_or_params, (list, tuple)) and model_or_params and isinstance(model_or_params[0], dict):
        groups = list(model_or_params)
    else:
        groups = build_param_groups(model_or_params, cfg.resolved_weight_decay(), cfg.decay_embeddings)
    betas = cfg.resolved_betas()
    lr = float(cfg.initial_lr)
    if cfg.optim_type == "lion":
        return Lion(groups, lr=lr, betas=betas, weight_decay=cfg.resolved_weight_decay())
    all_cuda = all(p.is_cuda for g in groups for p in g["params"])
    fused = bool(cfg.auto_optimize_optimizer and all_cuda)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg.eps, weight_decay=cfg.resolved_weight_decay(),
                             fused=fused)
