"""Optimizers: weight-decay parameter groups, Lion, and `build_optimizer` from an `OptimConfig`.

Weight-decay policy (`build_param_groups`): only trainable parameters are included. A parameter is decayed when
its full shape has ≥ 2 dimensions (linear/conv weights, the untied LM head; under ZeRO-3 the full shape is
``ds_shape``, the local tensor being a 1-D partition) and is not the weight of an ``nn.Embedding``
(unless ``decay_embeddings=True``). Biases, norm scales and other 1-D/0-D tensors are never decayed. A tied
LM head shares the embedding Parameter and so follows the embedding rule. Embeddings are excluded by default
because decay pulls rare tokens' rows towards zero regardless of use (as in LLaMA-style recipes); set
``OptimConfig.decay_embeddings`` to decay them too (nanoGPT style).

Precision (`OptimConfig.state_dtype`, `build_optimizer`): the moment buffers are fp32 by default; ``"bf16"`` keeps
them in bfloat16 (Adam: 8 → 4 bytes of state per parameter; Lion: 4 → 2), computing every update in fp32 and
rounding only the stored moments. Parameters held in bf16/fp16 get fp32 master copies in the optimizer state
(``"master"``): the update is applied to the master and the parameter is its rounded copy, so updates smaller than
the parameter's rounding step are not lost. With fp32 state and fp32 parameters `build_optimizer` returns
``torch.optim.AdamW`` itself; otherwise this module's :class:`AdamW` (same update, same state keys, so checkpoints
move between the two).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["AdamW", "Lion", "build_param_groups", "build_optimizer", "STATE_DTYPES"]

#: `OptimConfig.state_dtype` names → dtypes of the optimizer's moment buffers.
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _full_ndim(p: torch.Tensor) -> int:
    """Dimensions of the parameter's full shape: a ZeRO-3-partitioned parameter is a 1-D (often empty) local
    shard whose real shape is ``ds_shape``; deciding decay by ``p.ndim`` would exclude every matrix under ZeRO-3."""
    return len(getattr(p, "ds_shape", p.shape))


NO_DECAY_ATTR = "_llm_trainer_no_decay"
"""A parameter with this attribute set is never weight-decayed (e.g. an LM head whose old rows are frozen by a
gradient mask: decoupled decay would still shrink them)."""


def build_param_groups(model: nn.Module | Iterable, weight_decay: float,
                       decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group (empty groups are dropped).

    `model` may be an ``nn.Module`` (embeddings are recognised by module type) or an iterable of parameters
    (then only the ≥2-D rule applies). Parameters marked with ``NO_DECAY_ATTR`` are never decayed. Each group carries a ``group_name`` ('decay' / 'no_decay') and the
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
        decays = _full_ndim(p) >= 2 and id(p) not in embedding_ids and not getattr(p, NO_DECAY_ATTR, False)
        target = decay if decays else no_decay
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


class _PrecisionMixin:
    """Moment buffers in ``state_dtype`` (updates computed in fp32) and fp32 master copies of low-precision
    parameters, for optimizers whose per-parameter state holds ``MOMENTS``."""

    MOMENTS: tuple[str, ...] = ()

    def _check_state_dtype(self, state_dtype: torch.dtype) -> None:
        if state_dtype not in STATE_DTYPES.values():
            raise ValueError(f"{type(self).__name__}: state_dtype must be one of {list(STATE_DTYPES.values())}, "
                             f"got {state_dtype!r}")

    def _zeros(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        return torch.zeros(p.shape, dtype=group["state_dtype"], device=p.device)

    @staticmethod
    def _master(p: torch.Tensor, state: dict) -> torch.Tensor:
        """The fp32 tensor the update is applied to: the parameter itself when fp32, else its master copy."""
        if p.dtype == torch.float32:
            return p
        if "master" not in state:
            state["master"] = p.detach().float()
        return state["master"]

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, which casts every floating-point state tensor to its parameter's dtype; the moments are
        then restored in this optimizer's ``state_dtype`` (the one it was built with, not the saved one) and the
        masters in fp32, from the saved tensors."""
        saved = state_dict["state"]
        configured = [g["state_dtype"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, dtype in zip(self.param_groups, configured):
            group["state_dtype"] = dtype
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for pid, (p, group) in zip(saved_ids, params):
            for key, value in saved.get(pid, {}).items():
                if key in self.MOMENTS or key == "master":
                    dtype = torch.float32 if key == "master" else group["state_dtype"]
                    self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)


class AdamW(_PrecisionMixin, torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2), per parameter at
    step t, in fp32 whatever the storage dtypes:

        θ = θ·(1 − lr·λ)
        m = β1·m + (1 − β1)·g            v = β2·v + (1 − β2)·g²
        θ = θ − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

    — torch.optim.AdamW's formula and state keys (``step``, ``exp_avg``, ``exp_avg_sq``). ``state_dtype``: dtype
    of m and v (fp32 or bf16); bf16/fp16 parameters are updated through fp32 masters (module docstring).
    """

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, state_dtype: torch.dtype = torch.float32):
        if not lr >= 0.0:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must be in [0, 1), got {betas!r}")
        if not eps > 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"AdamW: eps must be > 0 and weight_decay >= 0, got {eps!r}, {weight_decay!r}")
        self._check_state_dtype(state_dtype)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      state_dtype=state_dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"], state["exp_avg_sq"] = self._zeros(p, group), self._zeros(p, group)
                theta, grad = self._master(p, state), p.grad.float()
                m, v = state["exp_avg"].float(), state["exp_avg_sq"].float()  # the buffers themselves when fp32
                state["step"] += 1
                t = float(state["step"])
                theta.mul_(1.0 - lr * wd)
                m.lerp_(grad, 1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = v.sqrt().div_((1.0 - beta2**t) ** 0.5).add_(eps)
                theta.addcdiv_(m, denom, value=-lr / (1.0 - beta1**t))
                for key, value in (("exp_avg", m), ("exp_avg_sq", v)):
                    if state[key] is not value:
                        state[key].copy_(value)
                if theta is not p:
                    p.copy_(theta)
        return loss


class Lion(_PrecisionMixin, torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2), per parameter:

        c = β1·m + (1 − β1)·g
        θ = θ − lr·(sign(c) + λ·θ)          (decoupled weight decay λ, applied to the old θ)
        m = β2·m + (1 − β2)·g

    Paper defaults: β = (0.9, 0.99); use a 3–10× smaller lr and 3–10× larger weight decay than AdamW.
    State per parameter: ``exp_avg`` (m) in ``state_dtype`` (fp32 or bf16; the update is computed in fp32);
    bf16/fp16 parameters are updated through fp32 masters (module docstring). ``maximize`` flips the gradient sign.
    """

    MOMENTS = ("exp_avg",)

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, maximize: bool = False, state_dtype: torch.dtype = torch.float32):
        if not lr >= 0.0:
            raise ValueError(f"Lion: lr must be >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lion: betas must be in [0, 1), got {betas!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay!r}")
        self._check_state_dtype(state_dtype)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize,
                                      state_dtype=state_dtype))

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
                grad = p.grad.float()  # the gradient itself when fp32
                if grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                if group.get("maximize", False):
                    grad = -grad
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = self._zeros(p, group)
                theta, exp_avg = self._master(p, state), state["exp_avg"].float()
                update = exp_avg.mul(beta1).add_(grad, alpha=1.0 - beta1).sign_()
                if wd != 0.0:
                    theta.mul_(1.0 - lr * wd)
                theta.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)
                if exp_avg is not state["exp_avg"]:
                    state["exp_avg"].copy_(exp_avg)
                if theta is not p:
                    p.copy_(theta)
        return loss


def build_optimizer(model_or_params: nn.Module | Iterable, optim_config) -> torch.optim.Optimizer:
    """AdamW ('adam'/'adamw') or Lion ('lion') over `build_param_groups` with the config's resolved betas, eps
    and weight decay. Pre-built parameter groups (a list of dicts) are used as given. The initial lr is
    ``optim_config.initial_lr``; the scheduler sets the lr of every step. ``optim_config.state_dtype`` sets the
    moments' dtype (module docstring).

    fp32 state over fp32 parameters: ``torch.optim.AdamW``, ``fused`` only when every parameter is on CUDA and
    ``auto_optimize_optimizer`` is set (otherwise torch picks foreach/for-loop). bf16 state, or any bf16/fp16
    parameter (which then needs an fp32 master copy): this module's :class:`AdamW`."""
    cfg = optim_config
    if isinstance(model_or_params, (list, tuple)) and model_or_params and isinstance(model_or_params[0], dict):
        groups = list(model_or_params)
    else:
        groups = build_param_groups(model_or_params, cfg.resolved_weight_decay(), cfg.decay_embeddings)
    betas = cfg.resolved_betas()
    lr = float(cfg.initial_lr)
    state_dtype = STATE_DTYPES[cfg.state_dtype]
    if cfg.optim_type == "lion":
        return Lion(groups, lr=lr, betas=betas, weight_decay=cfg.resolved_weight_decay(), state_dtype=state_dtype)
    if state_dtype != torch.float32 or any(p.dtype != torch.float32 for g in groups for p in g["params"]):
        return AdamW(groups, lr=lr, betas=betas, eps=cfg.eps, weight_decay=cfg.resolved_weight_decay(),
                     state_dtype=state_dtype)
    all_cuda = all(p.is_cuda for g in groups for p in g["params"])
    fused = bool(cfg.auto_optimize_optimizer and all_cuda)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg.eps, weight_decay=cfg.resolved_weight_decay(),
                             fused=fused)
