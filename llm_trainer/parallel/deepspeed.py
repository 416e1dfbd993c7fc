"""DeepSpeed backend: ZeRO 0/1/2/3, bf16/fp16/fp32, client torch optimizer, engine checkpoints.

Gradient semantics (same as every backend, see base.py): the loop's loss is already normalised by the global
token count of the window, so the gradient the optimizer sees must be the SUM over ranks and micro-batches.
DeepSpeed by default (a) divides the loss by ``gradient_accumulation_steps`` and (b) averages gradients over the
data-parallel ranks. ``backward`` undoes both: it calls ``engine.backward(loss * dp_world_size,
scale_wrt_gas=False)``. Multiplying by the world size is exact for power-of-two world sizes and a ~1 ulp
rounding otherwise; DeepSpeed's division by the same number then restores the plain sum.

Accumulation boundaries are owned by the loop, not by DeepSpeed's micro-step counter: every ``backward`` sets
``engine.set_gradient_accumulation_boundary(not inside no_sync())`` and ``step()`` is called once per window.
Gradient clipping happens inside ``engine.step()`` with the value in the DeepSpeed config
(``DsConfig.gradient_clipping`` or ``wrap(grad_clip=...)``), so ``clip()`` only checks the value and returns
None; ``step()`` returns the global pre-clip gradient norm.

``'auto'`` ZeRO sizes (``DsZero3Config``'s prefetch bucket and parameter persistence threshold, any
``reduce_bucket_size='auto'``) resolve from the model's hidden size: ``wrap`` reads ``config.hidden_size`` of the
model (or takes ``hidden_size=``). ``zero.Init`` decides which parameters stay whole on every rank (persistent)
while the model is built, before its hidden size is known unless ``model_init_context(hidden_size=...)`` is given;
without it nothing is made persistent at construction and ``wrap`` marks the small parameters persistent with the
resolved threshold -- the same set either way. (DeepSpeed's own default threshold, 1e5 elements, would keep every
parameter of a small model whole on every rank: no partitioning at all.)

Frozen models: ``frozen_replica`` under ZeRO-3 is a DeepSpeed inference engine (``deepspeed.initialize`` without
an optimizer) over a model built partitioned; ``output_projection`` gathers the head once (see zero3.py).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from .base import Backend, torch_dtype
from .ds_config import DsConfig
from .env import DistEnv, ensure_rendezvous_env, read_env
from .frozen import built_module, check_replica_args, freeze, head_parameters, model_hidden_size

__all__ = ["DeepSpeedBackend", "deepspeed_available", "DS_CONFIG_FILE"]

DS_CONFIG_FILE = "ds_config.json"
_CLIENT_KEY = "llm_trainer_client_state"  # DeepSpeed mixes its own keys into client_state; ours live under this


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import time
        return False
    return True


class DeepSpeedBackend(Backend):
    """Run the model through a DeepSpeed engine. ``dtype`` None lets ``ds_config`` decide (bf16 by default)."""

    name = "deepspeed"
    can_discard_gradients = False
    can_load_other_world_size = False   # ZeRO shards optimizer (stage 3: parameter) state per rank

    def __init__(self, ds_config: DsConfig | None = None, dtype: str | torch.dtype | None = None,
                 env: DistEnv | None = None, run_dir: str | None = None, dist_backend: str | None = None) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.ds_config = ds_config if ds_config is not None else DsConfig()
        if not isinstance(self.ds_config, DsConfig):
            raise TypeError(f"ds_config must be a DsConfig, got {type(self.ds_config).__name__}")
        env = env or read_env()
        accel = get_accelerator()
        if accel.device_name() == "cpu":
            device = torch.device("cpu")
        else:
            device = torch.device(accel.device_name(env.local_rank))
            accel.set_device(env.local_rank)
        super().__init__(env, device, self.ds_config.resolve_dtype(dtype))
        self.run_dir = run_dir
        self.dist_backend = dist_backend or ("gloo" if device.type == "cpu" else accel.communication_backend_name())
        self._owns_group = False
        if not dist.is_initialized():
            ensure_rendezvous_env(env)
            self._owns_group = True
            atexit.register(self.close)     # a live gloo group at interpreter exit can abort the process
        deepspeed.init_distributed(dist_backend=self.dist_backend, auto_mpi_discovery=False,
                                   rank=env.rank, world_size=env.world_size, verbose=False)
        self.engine = None
        self.ds_dict: dict | None = None
        self._last_backward_in_no_sync = False
        self._window_pending = False  # a backward ran since the last step()

    # -- config -----------------------------------------------------------------------------------------------
    @property
    def zero_stage(self) -> int:
        """The ZeRO stage (0-3) of this backend's DeepSpeed config."""
        return self.ds_config.zero_config.stage

    @property
    def description(self) -> str:
        return f"deepspeed ZeRO-{self.zero_stage}, {self.dtype}, {self.device.type}"

    def _ds_dict(self, micro_batch_size: int = 1, grad_accum: int = 1, grad_clip: float | None = None,
                 hidden_size: int | None = None) -> dict:
        return self.ds_config.to_ds_dict(micro_batch_size, grad_accum, self.dtype, grad_clip,
                                         hidden_size=hidden_size)

    def _resolved_hidden_size(self, model: torch.nn.Module, hidden_size: int | None) -> int | None:
        """``hidden_size`` or the model's ``config.hidden_size``; raises when an 'auto' size needs it and it is
        unknown (DeepSpeed's defaults would silently apply)."""
        hidden_size = hidden_size if hidden_size is not None else model_hidden_size(model)
        auto = self.ds_config.zero_config.auto_fields()
        if hidden_size is None and auto:
            raise ValueError(f"DeepSpeed config: {', '.join(auto)} = 'auto' resolves from the model's hidden size, "
                             f"but {type(model).__name__} has no config.hidden_size: pass wrap(hidden_size=...) or "
                             f"set these sizes to numbers in the ZeRO config")
        return hidden_size

    def model_init_context(self, hidden_size: int | None = None) -> contextlib.AbstractContextManager:
        """``deepspeed.zero.Init`` for ZeRO-3 (parameters are partitioned as modules are built, in the
        config's dtype: bf16 when bf16 is on); nothing for stages 0-2. ``hidden_size`` resolves the 'auto'
        persistence threshold now; without it no parameter is persistent until ``wrap`` (module docstring)."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed
        cfg = self._ds_dict(hidden_size=hidden_size)
        zero = cfg["zero_optimization"]
        zero.setdefault("stage3_param_persistence_threshold", 0)  # unresolved 'auto': decided at wrap
        remote = None
        offload = zero.get("offload_param")
        if offload is not None:
            remote = offload["device"]
        return deepspeed.zero.Init(config_dict_or_path=cfg, remote_device=remote)

    # -- wrap -------------------------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *,
             micro_batch_size: int = 1, grad_accum: int = 1, grad_clip: float | None = None,
             hidden_size: int | None = None, **kwargs: Any) -> torch.nn.Module:
        """``deepspeed.initialize`` with the client ``optimizer`` (never a DeepSpeed-built one). 'auto' sizes
        resolve from ``hidden_size`` or the model's ``config.hidden_size``. The JSON config is written to
        ``run_dir/ds_config.json`` by the main rank when ``run_dir`` was given."""
        import deepspeed
        if optimizer is None:
            raise ValueError("DeepSpeedBackend.wrap needs the client torch optimizer (AdamW, Lion, ...)")
        hidden_size = self._resolved_hidden_size(model, hidden_size)
        self.ds_dict = self._ds_dict(micro_batch_size, grad_accum, grad_clip, hidden_size)
        if self.run_dir is not None and self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            tmp = os.path.join(self.run_dir, f".{DS_CONFIG_FILE}.tmp")
            with open(tmp, "w") as f:
                json.dump(self.ds_dict, f, indent=2, sort_keys=True)
            os.replace(tmp, os.path.join(self.run_dir, DS_CONFIG_FILE))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_dict,
                                               dist_init_required=False)
        self.engine = engine
        self.model, self.optimizer = engine, optimizer
        return engine

    def unwrap(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        model = self._model(model)
        return getattr(model, "module", model)

    # -- frozen models and the output projection ----------------------------------------------------------
    def frozen_param_dtype(self) -> torch.dtype:
        """The engine runs the module in its own dtype (bf16/fp16 parameters when enabled)."""
        return torch_dtype(self.dtype)

    def frozen_replica(self, *, source: torch.nn.Module | None = None,
                       build: Callable[[], torch.nn.Module] | None = None) -> torch.nn.Module:
        """See :meth:`Backend.frozen_replica`. ZeRO-3: a DeepSpeed inference engine over a partitioned model --
        ``build`` runs inside ``zero.Init``; for ``source`` the architecture is rebuilt partitioned
        (``type(source)(source.config)``) and the weights copied one gathered parameter at a time. The engine
        is called like the module and returns its output object. Collective: every rank calls it."""
        if self.zero_stage != 3:
            return super().frozen_replica(source=source, build=build)
        import deepspeed
        from .zero3 import copy_into_partitioned, rebuild_like
        check_replica_args(source, build)
        if source is not None:
            plain = self.unwrap(source)
            with self.model_init_context(hidden_size=model_hidden_size(plain)):
                replica = rebuild_like(plain)
            copy_into_partitioned(plain, replica, self.rank)
        else:
            with self.model_init_context():
                replica = built_module(build)
        freeze(replica)
        cfg = self._ds_dict(grad_clip=0.0, hidden_size=self._resolved_hidden_size(replica, None))
        cfg["zero_optimization"].pop("offload_optimizer", None)   # no optimizer
        engine, *_ = deepspeed.initialize(model=replica, config=cfg, dist_init_required=False)
        engine.eval()
        return engine

    @contextlib.contextmanager
    def output_projection(self, model: torch.nn.Module) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """See :meth:`Backend.output_projection`. ZeRO-3: the head is gathered once on entry (collective) and a
        full copy serves every chunk; its gradient returns to the partitioned parameter (zero3.py)."""
        if self.zero_stage != 3:
            with super().output_projection(model) as project:
                yield project
            return
        from .zero3 import gathered_projection
        plain = self.unwrap(model)
        weight, bias = head_parameters(plain)
        yield gathered_projection(plain, weight, bias, self.device)

    # -- optimisation -----------------------------------------------------------------------------------------
    def _engine(self):
        if self.engine is None:
            raise RuntimeError("DeepSpeedBackend: call wrap(model, optimizer) first")
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        engine = self._engine()
        boundary = not self._in_no_sync
        engine.set_gradient_accumulation_boundary(boundary)
        # Undo DeepSpeed's 1/GAS (scale_wrt_gas=False) and its average over data-parallel ranks (x world size).
        scale = float(self.world_size)
        engine.backward(loss * scale if scale != 1.0 else loss, scale_wrt_gas=False)
        self._last_backward_in_no_sync = not boundary
        self._window_pending = True

    def clip(self, max_norm: float | None) -> float | None:
        """DeepSpeed clips inside ``step()`` with the configured value; this checks it matches ``max_norm``."""
        configured = float(self._engine().gradient_clipping() or 0.0)
        wanted = float(max_norm or 0.0)
        if not math.isclose(configured, wanted, rel_tol=1e-6, abs_tol=1e-12):
            raise ValueError(f"DeepSpeed clips gradients at {configured} (its config's gradient_clipping) but "
                             f"clip({max_norm}) was requested; pass grad_clip={max_norm} to wrap() or set "
                             f"DsConfig.gradient_clipping")
        return None

    def _plain_grad_norm(self) -> float | None:
        """ZeRO-0 in fp32 clips with a helper that does not record the norm; compute it from the full grads."""
        grads = [p.grad for p in self.unwrap().parameters() if p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def step(self) -> float | None:
        engine = self._engine()
        if self._in_no_sync or self._last_backward_in_no_sync:
            raise RuntimeError("step() after a backward inside no_sync(): the last micro-batch of a window "
                               "must run outside no_sync() so gradients are reduced")
        norm = None
        if self.zero_stage == 0 and self.dtype == "fp32":
            norm = self._plain_grad_norm()
        engine.step()
        self._window_pending = False
        if norm is None:
            value = engine.get_global_grad_norm()
            if value is not None:
                norm = float(value.item() if torch.is_tensor(value) else value)
        self.last_grad_norm = norm
        return norm

    def zero_grad(self) -> None:
        """No-op after ``step()`` (the engine clears gradients itself). Discarding a window's gradients without
        stepping is not supported: ZeRO keeps reduced gradient partitions until its step, so they would leak
        into the next window; this raises instead of training on stale gradients."""
        if self._window_pending:
            raise RuntimeError("DeepSpeedBackend cannot discard accumulated gradients without step(): ZeRO keeps "
                               "the reduced partitions until the optimizer step. Skip non-finite windows before "
                               "backward, or call step() (DeepSpeed's fp16 loss scaler skips overflowing steps "
                               "itself)")

    # -- generation / export ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def gathered_for_generation(self, model: torch.nn.Module | None = None) -> Iterator[torch.nn.Module]:
        """ZeRO-3: gather every parameter on every rank and detach the engine's fetch/release hooks for the
        duration (otherwise they would re-partition weights after each submodule's forward); yields the plain
        module. Stages 0-2: the module as is. Collective under ZeRO-3: every rank must enter."""
        module = self.unwrap(model)
        if self.zero_stage != 3:
            yield module
            return
        import deepspeed
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            offload = self._param_offload()
            if offload is not None:
                for p in params:
                    if hasattr(p, "ds_active_sub_modules"):
                        p.ds_active_sub_modules.clear()
                for hook in [*offload.forward_hooks, *offload.backward_hooks]:
                    hook.remove()
                offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield module
            finally:
                if offload is not None:
                    offload._register_deepspeed_module(offload.module)

    def _param_offload(self):
        optimizer = getattr(self._engine(), "optimizer", None)
        offload = getattr(optimizer, "parameter_offload", None)
        if offload is None or not hasattr(offload, "forward_hooks") \
                or not hasattr(offload, "_register_deepspeed_module"):
            return None
        return offload

    def full_state_dict(self, model: torch.nn.Module | None = None, *, fp32_master: bool = False,
                        copy: bool = True) -> dict[str, torch.Tensor]:
        """Full CPU state dict on the main rank (``{}`` elsewhere); collective, call on every rank.

        Default: the model's own dtype (bf16 under bf16 training, fp32 otherwise); under ZeRO-3 each parameter is
        gathered in turn, so no rank ever holds the whole model twice. ``fp32_master=True``: the optimizer's fp32
        master weights instead (what the next step starts from), via ``safe_get_full_fp32_param``. Always copies
        (``copy`` is accepted for the Backend signature: gathered parameters are released after use).
        """
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param
        module = self.unwrap(model)
        out: dict[str, torch.Tensor] = {}
        done: dict[int, torch.Tensor] = {}
        flat_masters = self._flat_fp32_masters() if fp32_master else {}
        for key, value in module.state_dict(keep_vars=True).items():
            if id(value) in done:  # tied weights share one tensor
                if self.is_main:
                    out[key] = done[id(value)]
                continue
            tensor = None
            if fp32_master and isinstance(value, torch.nn.Parameter):
                tensor = flat_masters.get(id(value))
                if tensor is None:
                    tensor = safe_get_full_fp32_param(value)  # collective under ZeRO-3
            if tensor is None:
                if hasattr(value, "ds_id"):
                    with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                        tensor = value.detach().to("cpu", copy=True) if self.is_main else None
                else:
                    tensor = value.detach()
            if self.is_main and tensor is not None:
                tensor = tensor.to("cpu", copy=True)
                out[key] = tensor
                done[id(value)] = tensor
        self.barrier()
        return out if self.is_main else {}

    def _flat_fp32_masters(self) -> dict[int, torch.Tensor]:
        """ZeRO-0 with bf16/fp16 keeps fp32 masters in FP16_Optimizer (flat per-group buffers) or
        FP16_UnfusedOptimizer (one fp32 copy per parameter), without the fragment mapping
        ``safe_get_full_fp32_param`` uses; map each low-precision parameter to its fp32 master."""
        opt = getattr(self._engine(), "optimizer", None)
        lp_groups = getattr(opt, "fp16_groups", None)
        if self.zero_stage != 0 or lp_groups is None:
            return {}
        out = {}
        flats = getattr(opt, "fp32_groups_flat", None)
        per_param = getattr(opt, "fp32_groups", None)
        if flats:
            for params, flat in zip(lp_groups, flats):
                offset = 0
                for p in params:
                    out[id(p)] = flat.narrow(0, offset, p.numel()).view_as(p).detach()
                    offset += p.numel()
        elif per_param:
            for params, masters in zip(lp_groups, per_param):
                for p, m in zip(params, masters):
                    out[id(p)] = m.detach()
        return out

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save(self, directory: str, client_state: dict | None = None) -> None:
        """``engine.save_checkpoint`` (model + partitioned optimizer state, DeepSpeed ``global_stepN`` tag and
        ``latest``) with ``client_state``. Every rank must call it; errors propagate."""
        ok = self._engine().save_checkpoint(directory, client_state={_CLIENT_KEY: dict(client_state or {})})
        if ok is False:
            raise RuntimeError(f"DeepSpeed failed to save a checkpoint to {directory!r}")
        self.barrier()

    def load(self, directory: str) -> dict:
        """``engine.load_checkpoint`` of the ``latest`` tag; returns the client_state. Raises
        FileNotFoundError when ``directory`` holds no DeepSpeed checkpoint."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
        load_path, client_state = self._engine().load_checkpoint(directory)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory!r} (missing 'latest' or tag folder)")
        if not client_state or _CLIENT_KEY not in client_state:
            raise ValueError(f"DeepSpeed checkpoint in {directory!r} was not written by DeepSpeedBackend.save "
                             f"(no {_CLIENT_KEY!r} entry)")
        return client_state[_CLIENT_KEY]

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
