"""Execution backends behind one interface: single process, torch DDP, DeepSpeed (see base.Backend)."""
from __future__ import annotations

import sys
import warnings
from typing import Literal

import torch

from .base import Backend, normalize_dtype, torch_dtype
from .ds_config import (
    DsActivationCheckpointingConfig, DsBf16Config, DsConfig, DsFlopsProfilerConfig, DsFp16Config,
    DsOffloadConfig, DsZero0Config, DsZero1Config, DsZero2Config, DsZero3Config, DsZeROConfig,
)
from .env import DistEnv, launcher_backend, read_env
from .single import SingleBackend

__all__ = [
    "Backend", "SingleBackend", "DDPBackend", "DeepSpeedBackend", "get_backend", "DistEnv", "read_env",
    "normalize_dtype", "torch_dtype", "deepspeed_available",
    "DsConfig", "DsZeROConfig", "DsZero0Config", "DsZero1Config", "DsZero2Config", "DsZero3Config",
    "DsOffloadConfig", "DsFp16Config", "DsBf16Config", "DsActivationCheckpointingConfig", "DsFlopsProfilerConfig",
]

BackendKind = Literal["auto", "single", "ddp", "deepspeed"]


def deepspeed_available() -> bool:
    from .deepspeed import deepspeed_available as _available
    return _available()


def __getattr__(name: str):  # DDP/DeepSpeed modules load on first use (DeepSpeed's import is slow)
    if name == "DDPBackend":
        from .ddp import DDPBackend
        return DDPBackend
    if name == "DeepSpeedBackend":
        from .deepspeed import DeepSpeedBackend
        return DeepSpeedBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_backend(ds_config: DsConfig | None = None, dtype: str | torch.dtype | None = None, *,
                kind: BackendKind = "auto", env: DistEnv | None = None, run_dir: str | None = None,
                device: str | torch.device | None = None) -> Backend:
    """Pick and build the backend for this process.

    ``kind='auto'``: the backend a launcher forced (``ds_train``: DeepSpeed, ``ddp_train``: DDP; then rank 0 prints
    ``running on N ranks (backend ...)`` to stderr); else DeepSpeed when ``ds_config`` is given, DeepSpeed imports
    and ``WORLD_SIZE > 1``; else DDP when ``WORLD_SIZE > 1``; else single process (only the ``ds_config``'s dtype
    is then used: one process gains nothing from ZeRO). ``kind='deepspeed'`` forces DeepSpeed (also for one
    process, e.g. to test a config). ``dtype`` None: the DeepSpeed config decides (bf16 by default) when one is
    given, else fp32. ``env`` defaults to the launcher variables (``parallel.env.read_env``).
    """
    env = env or read_env()
    launched = kind == "auto" and launcher_backend() in ("ddp", "deepspeed")
    if kind == "auto":   # ds_train / ddp_train say which backend the user launched with
        kind = launcher_backend()
    backend = _build_backend(ds_config, dtype, kind, env, run_dir, device)
    if launched and backend.is_main:
        n = backend.world_size
        print(f"running on {n} rank{'s' if n != 1 else ''} (backend {backend.description})", file=sys.stderr,
              flush=True)
    return backend


def _build_backend(ds_config: DsConfig | None, dtype: str | torch.dtype | None, kind: str, env: DistEnv,
                   run_dir: str | None, device: str | torch.device | None) -> Backend:
    if kind not in ("auto", "single", "ddp", "deepspeed"):
        raise ValueError(f"kind must be 'auto', 'single', 'ddp' or 'deepspeed', got {kind!r}")
    if kind == "deepspeed" or (kind == "auto" and ds_config is not None and env.world_size > 1
                               and deepspeed_available()):
        if device is not None:
            raise ValueError("DeepSpeed picks its device from the accelerator and LOCAL_RANK; do not pass device")
        from .deepspeed import DeepSpeedBackend
        return DeepSpeedBackend(ds_config, dtype, env=env, run_dir=run_dir)
    if dtype is None:
        dtype = ds_config.resolve_dtype() if ds_config is not None else "fp32"
    if kind == "ddp" or (kind == "auto" and env.world_size > 1):
        if kind == "auto" and ds_config is not None:
            warnings.warn("ds_config given but DeepSpeed cannot be imported: falling back to torch DDP",
                          RuntimeWarning, stacklevel=3)
        from .ddp import DDPBackend
        return DDPBackend(dtype, device=device, env=env)
    return SingleBackend(dtype, device=device, env=env)
