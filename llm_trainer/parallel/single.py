"""Single-process backend (CPU or one CUDA device) and the torch-optimizer machinery DDP shares with it."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch

from .. import checkpoint as ckpt
from .base import Backend, torch_dtype
from .env import DistEnv, read_env

__all__ = ["SingleBackend", "default_device"]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def default_device(env: DistEnv) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


class _TorchOptimBackend(Backend):
    """Backward/clip/step/save/load for backends whose optimizer is a plain torch optimizer."""

    def __init__(self, env: DistEnv, device: torch.device, dtype: str | torch.dtype | None = "fp32") -> None:
        super().__init__(env, device, dtype)
        self.scaler: torch.amp.GradScaler | None = None
        self._unscaled = False
        self._clipped = False
        if self.dtype == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)

    # -- precision --------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in bf16/fp16 (parameters, gradients and optimizer state stay fp32)."""
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch_dtype(self.dtype))

    # -- optimisation -----------------------------------------------------------------------------------------
    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unwrap().parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def clip(self, max_norm: float | None) -> float | None:
        if self.optimizer is None:
            raise RuntimeError("clip() needs the optimizer given to wrap()")
        if self.scaler is not None and not self._unscaled:
            self.scaler.unscale_(self.optimizer)
            self._unscaled = True
        limit = max_norm if max_norm is not None and max_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self._params(), limit)
        self.last_grad_norm = float(norm)
        self._clipped = True
        return self.last_grad_norm

    def step(self) -> float | None:
        if self.optimizer is None:
            raise RuntimeError("step() needs the optimizer given to wrap()")
        if self._in_no_sync:
            raise RuntimeError("step() inside no_sync(): the last micro-batch of a window must synchronise")
        if not self._clipped:
            self.last_grad_norm = None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self._unscaled = False
        self._clipped = False
        return self.last_grad_norm

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.unwrap().zero_grad(set_to_none=True)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save(self, directory: str, client_state: dict | None = None) -> None:
        """Main rank writes ``model.safetensors`` (the weights) and ``optimizer.pt`` (optimizer and grad-scaler
        state and ``client_state``: tensors and plain containers only); the others wait. Multi-node runs need
        ``directory`` on a shared file system. Every rank returns (or raises) together."""
        try:
            if self.is_main:
                os.makedirs(directory, exist_ok=True)
                ckpt.save_model_state(self.unwrap().state_dict(), os.path.join(directory, MODEL_FILE))
                state = {"format": "llm_trainer.torch_backend.v2", "world_size": self.world_size,
                         "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                         "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                         "client_state": dict(client_state or {})}
                ckpt.save_tensor_state(state, os.path.join(directory, OPTIMIZER_FILE))
        finally:
            self.barrier()

    def load(self, directory: str) -> dict:
        """Every rank reads the files (shared file system) and restores model, optimizer and scaler; nothing is
        unpickled (``weights_only=True``)."""
        path = os.path.join(directory, MODEL_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {MODEL_FILE} in {directory!r}: not a checkpoint of "
                                    f"{type(self).__name__}")
        self.unwrap().load_state_dict(ckpt.load_model_state(path))
        state = ckpt.load_tensor_state(os.path.join(directory, OPTIMIZER_FILE))
        if self.optimizer is not None:
            if state.get("optimizer") is None:
                raise ValueError(f"checkpoint {directory!r} has no optimizer state")
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.barrier()
        return state.get("client_state", {})


class SingleBackend(_TorchOptimBackend):
    """One process on ``device`` (default: CUDA if available, else CPU). No process group."""

    name = "single"

    def __init__(self, dtype: str | torch.dtype | None = "fp32", device: str | torch.device | None = None,
                 env: DistEnv | None = None) -> None:
        env = env or read_env()
        if env.world_size > 1:
            env = DistEnv()  # a deliberate single-process run inside a launcher: act alone
        super().__init__(env, torch.device(device) if device is not None else default_device(env), dtype)

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *,
             micro_batch_size: int = 1, grad_accum: int = 1, grad_clip: float | None = None,
             **kwargs: Any) -> torch.nn.Module:
        model.to(self.device)
        self.model, self.optimizer = model, optimizer
        return model
