"""torch DistributedDataParallel backend (gloo on CPU, nccl on CUDA).

Gradient semantics: DDP's built-in reduction AVERAGES gradients over ranks. The loop hands ``backward`` a loss
already divided by the global token count of the accumulation window, so the correct gradient is the SUM over
ranks. This backend registers a communication hook (:func:`allreduce_sum_hook`) that all-reduces each bucket with
``SUM`` and does not divide -- exact, with no extra multiply, and independent of the loss dtype. During
accumulation ``no_sync()`` skips communication; gradients accumulate locally and the bucket all-reduce of the last
micro-batch sums the whole window.
"""
from __future__ import annotations

import atexit
import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .env import DistEnv, ensure_rendezvous_env, read_env
from .single import _TorchOptimBackend, default_device

__all__ = ["DDPBackend", "allreduce_sum_hook"]


def allreduce_sum_hook(process_group, bucket):  # no annotations: DDP checks them against real classes
    """DDP comm hook: all-reduce the bucket with SUM (torch's default hook divides by world size).

    ``process_group``: the group (None = WORLD); ``bucket``: a ``dist.GradBucket``. Returns a future of the
    reduced flat buffer, which DDP copies back into the parameters' ``.grad``."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class DDPBackend(_TorchOptimBackend):
    """``DistributedDataParallel`` over ``WORLD_SIZE`` processes; bf16/fp16 through autocast (+ GradScaler)."""

    name = "ddp"

    def __init__(self, dtype: str | torch.dtype | None = "fp32", device: str | torch.device | None = None,
                 env: DistEnv | None = None, dist_backend: str | None = None, *,
                 find_unused_parameters: bool = False, bucket_cap_mb: float = 25.0,
                 static_graph: bool = False) -> None:
        env = env or read_env()
        device = torch.device(device) if device is not None else default_device(env)
        super().__init__(env, device, dtype)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dist_backend = dist_backend or ("nccl" if self.device.type == "cuda" else "gloo")
        self.find_unused_parameters = find_unused_parameters
        self.bucket_cap_mb = bucket_cap_mb
        self.static_graph = static_graph
        self._owns_group = False
        if not dist.is_initialized():
            ensure_rendezvous_env(env)
            dist.init_process_group(self.dist_backend, init_method="env://", rank=env.rank,
                                    world_size=env.world_size)
            self._owns_group = True
            atexit.register(self.close)     # a live gloo group at interpreter exit can abort the process
        elif dist.get_world_size() != env.world_size:
            raise RuntimeError(f"existing process group has {dist.get_world_size()} ranks, "
                               f"WORLD_SIZE says {env.world_size}")

    def _dist_ready(self) -> bool:
        return dist.is_initialized()

    @property
    def description(self) -> str:
        return f"ddp/{self.dist_backend}, {self.dtype}, {self.device.type}"

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *,
             micro_batch_size: int = 1, grad_accum: int = 1, grad_clip: float | None = None,
             **kwargs: Any) -> torch.nn.Module:
        model.to(self.device)
        ddp = DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters,
            bucket_cap_mb=self.bucket_cap_mb,
            static_graph=self.static_graph,
        )  # broadcasts rank 0's parameters and buffers: every rank starts identical
        ddp.register_comm_hook(state=None, hook=allreduce_sum_hook)
        self.model, self.optimizer = ddp, optimizer
        return ddp

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        model = self._model(None)
        with super().no_sync(), model.no_sync():
            yield

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
