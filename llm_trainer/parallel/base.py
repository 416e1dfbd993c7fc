"""The Backend contract (docs/architecture.md): how the one training loop talks to single-process, DDP and
DeepSpeed execution without branching on which one it has.

The loop drives a backend like this (one optimizer step = one accumulation window of ``k`` micro-batches)::

    model = backend.wrap(model, optimizer, micro_batch_size=b, grad_accum=k, grad_clip=c)
    for i, batch in enumerate(window):
        ctx = backend.no_sync() if i < k - 1 else contextlib.nullcontext()
        with ctx, backend.autocast():
            out = model(**batch)
            loss = loss_sum / global_num_tokens          # tokens of the WHOLE window on ALL ranks
            backend.backward(loss)
    grad_norm = backend.clip(c)     # torch backends clip here; DeepSpeed clips inside step()
    grad_norm = backend.step()      # always returns the pre-clip global grad norm (or None if unknown)
    backend.zero_grad()

Gradient semantics (identical for every backend): after the last ``backward`` of a window the gradient the
optimizer sees is the **sum** over ranks and micro-batches of ``d loss / d theta``. The loop normalises each
micro-batch loss by the global token count of the window, so that sum is exactly the gradient of the global mean
loss -- uneven token counts per rank or per micro-batch are weighted correctly. Backends therefore must not
average over ranks (DDP and DeepSpeed do by default; see ddp.py and deepspeed.py for how each undoes it) and must
not divide by the number of accumulation steps (DeepSpeed does by default).

Frozen models (reference, teacher) come from ``frozen_replica``; chunked log-probs project hidden states through
``output_projection``. Trainers never ask which backend or ZeRO stage they run on.

Collectives: ``all_reduce``, ``broadcast_object``, ``barrier``, ``full_state_dict``, ``save``, ``load``,
``frozen_replica``, entering ``output_projection`` and entering/leaving ``gathered_for_generation`` must be called
by every rank.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .env import DistEnv
from .frozen import (built_module, cast_floating_params, check_replica_args, detached_copy, freeze,
                     head_parameters)

__all__ = ["Backend", "head_projection", "normalize_dtype", "torch_dtype"]

_DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "32": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "16": "fp16",
}
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT, "prod": dist.ReduceOp.PRODUCT,
}


def normalize_dtype(dtype: str | torch.dtype | None) -> str:
    """'fp32' | 'bf16' | 'fp16' from a string alias or a torch dtype (None -> 'fp32')."""
    if dtype is None:
        return "fp32"
    if isinstance(dtype, torch.dtype):
        for name, value in _TORCH_DTYPES.items():
            if value == dtype:
                return name
        raise ValueError(f"unsupported training dtype {dtype}; use float32, bfloat16 or float16")
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {dtype!r}; use 'fp32', 'bf16' or 'fp16'")
    return _DTYPE_ALIASES[key]


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    return _TORCH_DTYPES[normalize_dtype(dtype)]


def head_projection(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``hidden -> logits`` through ``model``'s LM head: its ``lm_head`` module (LoRA and ZeRO-3 hooks apply), else
    its tied embedding weight (``model.lm_head_weight()``)."""
    weight, bias = head_parameters(model)
    return lambda h: F.linear(h, weight, bias)


class Backend(ABC):
    """One execution strategy. Subclasses: SingleBackend, DDPBackend, DeepSpeedBackend."""

    name: str = "base"
    can_discard_gradients: bool = True   # zero_grad() after backward without step() drops the window
    can_load_other_world_size: bool = True   # save() writes full, unpartitioned state any world size can load

    def __init__(self, env: DistEnv, device: torch.device, dtype: str | torch.dtype | None = "fp32") -> None:
        self.env = env
        self.device = torch.device(device)
        self.dtype = normalize_dtype(dtype)
        self.model: torch.nn.Module | None = None        # what wrap() returned
        self.optimizer: torch.optim.Optimizer | None = None  # the client optimizer (param_groups drive the LR)
        self.last_grad_norm: float | None = None
        self._in_no_sync = False

    # -- identity ---------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, device={self.device}, "
                f"dtype={self.dtype})")

    @property
    def description(self) -> str:
        """One line for the launch banner, e.g. ``ddp/gloo, fp32, cpu``."""
        return f"{self.name}, {self.dtype}, {self.device.type}"

    # -- model lifecycle --------------------------------------------------------------------------------------
    def model_init_context(self, hidden_size: int | None = None) -> contextlib.AbstractContextManager:
        """Context to construct the model in (ZeRO-3: partitioned at construction, ``hidden_size`` resolves its
        'auto' sizes). Default: nothing special."""
        return contextlib.nullcontext()

    @abstractmethod
    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *,
             micro_batch_size: int = 1, grad_accum: int = 1, grad_clip: float | None = None,
             **kwargs: Any) -> torch.nn.Module:
        """Move/wrap ``model`` for this backend; returns the module to call for forward passes."""

    def unwrap(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """The user's plain module inside whatever wrapper (parameters may still be partitioned under ZeRO-3)."""
        model = self._model(model)
        return getattr(model, "module", model)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (nothing for fp32 or when the engine casts the model)."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Wrap the forward+backward of every micro-batch but the last of an accumulation window."""
        if self._in_no_sync:
            raise RuntimeError("no_sync() is not re-entrant")
        self._in_no_sync = True
        try:
            yield
        finally:
            self._in_no_sync = False

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate d loss/d theta; see the module docstring for the summing semantics."""

    @abstractmethod
    def clip(self, max_norm: float | None) -> float | None:
        """Clip the accumulated gradients to ``max_norm`` and return the pre-clip global norm, or None when the
        backend clips inside :meth:`step` (DeepSpeed; then ``step()`` returns the norm)."""

    @abstractmethod
    def step(self) -> float | None:
        """Apply the optimizer update for the window; returns the pre-clip global gradient norm if known."""

    @abstractmethod
    def zero_grad(self) -> None:
        ...

    @contextlib.contextmanager
    def gathered_for_generation(self, model: torch.nn.Module | None = None) -> Iterator[torch.nn.Module]:
        """Yield a plain module with full weights for generation/eval (collective under ZeRO-3)."""
        yield self.unwrap(model)

    def full_state_dict(self, model: torch.nn.Module | None = None, *, fp32_master: bool = False,
                        copy: bool = True) -> dict[str, torch.Tensor]:
        """Full CPU state dict on the main rank, ``{}`` elsewhere. Collective: call on every rank.
        ``fp32_master``: the optimizer's fp32 master weights where they differ from the module's (DeepSpeed
        bf16/fp16); torch backends keep fp32 parameters, so it changes nothing there. ``copy=False``: tensors
        already on the CPU are returned as (detached) views of the live parameters, not copies — for a caller
        that only reads them right away, such as an export (no second copy of the model in memory)."""
        if not self.is_main:
            self.barrier()
            return {}
        sd = {k: v.detach().to("cpu", copy=copy) for k, v in self.unwrap(model).state_dict().items()}
        self.barrier()
        return sd

    # -- frozen models and the output projection ----------------------------------------------------------
    def frozen_replica(self, *, source: torch.nn.Module | None = None,
                       build: Callable[[], torch.nn.Module] | None = None) -> torch.nn.Module:
        """A frozen model for inference next to the trained one (DPO/GRPO/PPO reference, KD teacher).

        Exactly one of ``source`` -- a module whose CURRENT weights are copied (the plain trained module or its
        wrapper; e.g. the initial policy) -- and ``build`` -- a zero-argument callable that constructs a module,
        loads its weights and returns the module, called inside :meth:`model_init_context` (a teacher, or a
        reference from another path). Returns a module in eval mode with ``requires_grad=False`` everywhere and
        gradient checkpointing off, on this backend's device, its floating-point parameters in the dtype the
        backend's forward runs in (torch backends: fp32 + :meth:`autocast`; DeepSpeed: the engine's dtype). Call it like
        the trained model (same kwargs, same output object). Torch backends and ZeRO 0-2: a plain module (a
        hook-free detached deep copy of ``source``, or what ``build`` made; no wrapper, it is never trained).
        ZeRO-3 overrides this with a partitioned inference engine. Collective: every rank calls it."""
        check_replica_args(source, build)
        replica = detached_copy(self.unwrap(source)) if source is not None else built_module(build)
        freeze(replica)
        cast_floating_params(replica, self.frozen_param_dtype())
        return replica.to(self.device)

    def frozen_param_dtype(self) -> torch.dtype:
        """Parameter dtype of frozen replicas: torch backends keep fp32 parameters and autocast the forward."""
        return torch.float32

    @contextlib.contextmanager
    def output_projection(self, model: torch.nn.Module) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Yield ``project(hidden [..., H]) -> logits [..., V]``: the LM head of ``model`` (``model.lm_head``, or
        the tied embedding weight via ``model.lm_head_weight()``) applied to final hidden states, for chunked
        log-probs without a full ``[B, S, V]`` logits tensor. ``model`` is the language model itself (its
        wrapper is unwrapped): ``PolicyValueModel.policy``, a ``VlmModel``, a frozen replica.

        ``project`` may be called any number of times inside the context (different numbers of chunks on
        different ranks are fine: it runs no collective) and also later, by activation-checkpoint recomputation
        in backward. Gradients reach the head weight (for tied embeddings, summed with the embedding's own) as
        the full-logits forward would give them. With DDP or ZeRO, the loss on every rank must depend on at
        least one ``project`` output (project an empty ``[0, H]`` chunk when a rank has no token), or the head's
        gradient would be missing from the all-reduce on that rank. Call it inside :meth:`autocast` like the
        forward. Collective under ZeRO-3 (every rank enters); here: the parameters themselves."""
        weight, bias = head_parameters(self.unwrap(model))
        yield lambda hidden: F.linear(hidden, weight, bias)

    # -- checkpoints ------------------------------------------------------------------------------------------
    @abstractmethod
    def save(self, directory: str, client_state: dict | None = None) -> None:
        """Write a resumable checkpoint (model + optimizer [+ scaler] + client_state) into ``directory``."""

    @abstractmethod
    def load(self, directory: str) -> dict:
        """Restore what :meth:`save` wrote; returns the client_state. Raises if there is nothing to load."""

    # -- collectives ------------------------------------------------------------------------------------------
    def _dist_ready(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce of ``tensor`` ('sum' | 'mean' | 'max' | 'min' | 'product'); returns it."""
        op = op.lower()
        if op not in _REDUCE_OPS and op not in ("mean", "avg"):
            raise ValueError(f"unknown reduce op {op!r}")
        if not self._dist_ready():
            return tensor
        if tensor.device != self.device and dist.get_backend() == "nccl":   # NCCL reduces device tensors only
            moved = tensor.to(self.device)
            dist.all_reduce(moved, op=_REDUCE_OPS.get(op, dist.ReduceOp.SUM))
            tensor.copy_(moved)
        else:
            dist.all_reduce(tensor, op=_REDUCE_OPS.get(op, dist.ReduceOp.SUM))
        if op in ("mean", "avg"):
            if tensor.is_floating_point():
                tensor.div_(self.world_size)
            else:
                tensor.floor_divide_(self.world_size)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self._dist_ready():
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self._dist_ready():
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self._dist_ready():
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group this backend created (no-op otherwise)."""

    # -- helpers ----------------------------------------------------------------------------------------------
    def _model(self, model: torch.nn.Module | None) -> torch.nn.Module:
        model = model if model is not None else self.model
        if model is None:
            raise RuntimeError(f"{type(self).__name__}: call wrap(model, optimizer) first")
        return model
