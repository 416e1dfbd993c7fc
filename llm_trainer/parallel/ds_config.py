"""DeepSpeed configuration as validated dataclasses, converted to DeepSpeed's JSON config by
:meth:`DsConfig.to_ds_dict`.

Field names and defaults follow the original llm_trainer (users' existing configs keep working); every class
constructs with its defaults and validates itself in ``__post_init__``. The emitted JSON never contains an
``optimizer`` or ``scheduler`` block: the backend always passes the client torch optimizer (AdamW, Lion, ...)
to ``deepspeed.initialize`` and the loop's scheduler drives its param-group learning rates.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch

__all__ = [
    "DsConfig", "DsZeROConfig", "DsZero0Config", "DsZero1Config", "DsZero2Config", "DsZero3Config",
    "DsOffloadConfig", "DsFp16Config", "DsBf16Config", "DsActivationCheckpointingConfig",
    "DsFlopsProfilerConfig",
]

_COMM_DTYPES = (None, "fp32", "fp16", "bf16")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _int_or_auto(name: str, value: Any) -> None:
    if value == "auto":
        return
    _check_positive(name, value, allow_zero=True)


@dataclass(kw_only=True)
class DsFlopsProfilerConfig:
    """DeepSpeed flops profiler (``flops_profiler`` section)."""

    enabled: bool = False
    profile_step: int = 1
    module_depth: int = -1
    top_modules: int = 1
    detailed: bool = True
    output_file: str | None = None

    def __post_init__(self) -> None:
        _check_positive("profile_step", self.profile_step)
        _check_positive("top_modules", self.top_modules)
        if not isinstance(self.module_depth, int) or self.module_depth < -1:
            raise ValueError(f"module_depth must be an int >= -1, got {self.module_depth!r}")

    def to_ds_section(self) -> dict:
        """The ``flops_profiler`` section of DeepSpeed's JSON config."""
        d = {"enabled": bool(self.enabled), "profile_step": int(self.profile_step),
             "module_depth": int(self.module_depth), "top_modules": int(self.top_modules),
             "detailed": bool(self.detailed)}
        if self.output_file is not None:
            d["output_file"] = str(self.output_file)
        return d


@dataclass(kw_only=True)
class DsOffloadConfig:
    """Offload of optimizer state (``offload_optimizer``) or parameters (``offload_param``, ZeRO-3 only) to CPU
    memory or NVMe. ``buffer_size``/``max_in_cpu`` apply to parameter offload only."""

    device: Literal["cpu", "nvme"] = "cpu"
    pin_memory: bool = True
    nvme_path: str | None = None
    buffer_count: int = 5
    buffer_size: int = int(1e8)
    max_in_cpu: int = int(1e9)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "nvme"):
            raise ValueError(f"offload device must be 'cpu' or 'nvme', got {self.device!r}")
        if self.device == "nvme" and not self.nvme_path:
            raise ValueError("offload to 'nvme' needs nvme_path")
        _check_positive("buffer_count", self.buffer_count)
        _check_positive("buffer_size", self.buffer_size)
        _check_positive("max_in_cpu", self.max_in_cpu, allow_zero=True)

    def to_ds_section(self, kind: Literal["optimizer", "param"]) -> dict:
        """The ``offload_optimizer`` (``kind='optimizer'``) or ``offload_param`` section of DeepSpeed's JSON."""
        d: dict[str, Any] = {"device": self.device, "pin_memory": bool(self.pin_memory)}
        if self.device == "nvme":
            d["nvme_path"] = str(self.nvme_path)
            d["buffer_count"] = int(self.buffer_count)
            if kind == "param":
                d["buffer_size"] = int(self.buffer_size)
        if kind == "param":
            d["max_in_cpu"] = int(self.max_in_cpu)
        return d


@dataclass(kw_only=True)
class DsActivationCheckpointingConfig:
    """DeepSpeed activation checkpointing (``activation_checkpointing`` section)."""

    partition_activations: bool = True
    cpu_checkpointing: bool = False
    contiguous_memory_optimization: bool = True
    number_checkpoints: int | None = None
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False

    def __post_init__(self) -> None:
        if self.number_checkpoints is not None:
            _check_positive("number_checkpoints", self.number_checkpoints)

    def to_ds_section(self) -> dict:
        """The ``activation_checkpointing`` section of DeepSpeed's JSON config."""
        d = {"partition_activations": bool(self.partition_activations),
             "cpu_checkpointing": bool(self.cpu_checkpointing),
             "contiguous_memory_optimization": bool(self.contiguous_memory_optimization),
             "synchronize_checkpoint_boundary": bool(self.synchronize_checkpoint_boundary),
             "profile": bool(self.profile)}
        if self.number_checkpoints is not None:
            d["number_checkpoints"] = int(self.number_checkpoints)
        return d


@dataclass(kw_only=True)
class DsZeROConfig:
    """Fields shared by every ZeRO stage (``zero_optimization`` section). Use the per-stage subclasses."""

    stage: int
    allgather_partitions: bool = True
    allgather_bucket_size: int | float = 5e8
    overlap_comm: bool = True
    reduce_scatter: bool = True
    reduce_bucket_size: int | float | str = 5e8
    contiguous_gradients: bool = True
    ignore_unused_parameters: bool = False
    communication_data_type: str | None = None

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.stage!r}")
        _check_positive("allgather_bucket_size", self.allgather_bucket_size)
        _int_or_auto("reduce_bucket_size", self.reduce_bucket_size)
        if self.communication_data_type not in _COMM_DTYPES:
            raise ValueError(f"communication_data_type must be one of {_COMM_DTYPES}, "
                             f"got {self.communication_data_type!r}")
        for name in ("offload_optimizer", "offload_param"):
            value = getattr(self, name, None)
            if value is not None and not isinstance(value, DsOffloadConfig):
                raise TypeError(f"{name} must be a DsOffloadConfig or None, got {type(value).__name__}")

    def auto_fields(self) -> list[str]:
        """Names of the size fields set to ``'auto'`` (they need the model's hidden size to resolve)."""
        return [f.name for f in fields(self) if getattr(self, f.name) == "auto"]

    def to_ds_section(self, hidden_size: int | None = None) -> dict:
        """The ``zero_optimization`` section of DeepSpeed's JSON. ``'auto'`` sizes resolve from ``hidden_size``
        (h*h for buckets, 0.9*h*h for prefetch, 10*h for persistence, as Hugging Face does); without it they are
        left out (DeepSpeed's defaults). The DeepSpeed backend always resolves them: ``wrap`` reads the model's
        ``config.hidden_size`` (see ``DeepSpeedBackend.wrap``)."""
        d: dict[str, Any] = {"stage": self.stage}
        if self.stage == 0:
            return d
        d.update({
            "allgather_partitions": bool(self.allgather_partitions),
            "allgather_bucket_size": int(self.allgather_bucket_size),
            "overlap_comm": bool(self.overlap_comm),
            "reduce_scatter": bool(self.reduce_scatter),
            "contiguous_gradients": bool(self.contiguous_gradients),
            "ignore_unused_parameters": bool(self.ignore_unused_parameters),
        })
        _put_auto(d, "reduce_bucket_size", self.reduce_bucket_size, hidden_size, lambda h: h * h)
        if self.communication_data_type is not None:
            d["communication_data_type"] = self.communication_data_type
        offload_optimizer = getattr(self, "offload_optimizer", None)
        if offload_optimizer is not None:
            d["offload_optimizer"] = offload_optimizer.to_ds_section("optimizer")
        offload_param = getattr(self, "offload_param", None)
        if offload_param is not None:
            d["offload_param"] = offload_param.to_ds_section("param")
        return d


def _put_auto(d: dict, key: str, value: Any, hidden_size: int | None, from_hidden) -> None:
    if value == "auto":
        if hidden_size is not None:
            d[key] = int(from_hidden(hidden_size))
        return  # unresolved 'auto': DeepSpeed's own default applies
    d[key] = int(value)


@dataclass(kw_only=True)
class DsZero0Config(DsZeROConfig):
    """ZeRO disabled: plain data parallelism inside DeepSpeed."""

    stage: int = field(default=0, init=False)


@dataclass(kw_only=True)
class DsZero1Config(DsZeROConfig):
    """ZeRO-1: optimizer states partitioned."""

    stage: int = field(default=1, init=False)


@dataclass(kw_only=True)
class DsZero2Config(DsZeROConfig):
    """ZeRO-2: optimizer states and gradients partitioned; optional optimizer offload."""

    stage: int = field(default=2, init=False)
    offload_optimizer: DsOffloadConfig | None = None
    offload_param: DsOffloadConfig | None = None  # kept for config compatibility; ZeRO-3 only

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.offload_param is not None:
            raise ValueError("offload_param needs ZeRO-3 (DsZero3Config); ZeRO-2 can only offload the optimizer")


@dataclass(kw_only=True)
class DsZero3Config(DsZeROConfig):
    """ZeRO-3: parameters partitioned too. ``'auto'`` sizes resolve from the model's hidden size."""

    stage: int = field(default=3, init=False)
    sub_group_size: int | float = 1e9
    stage3_prefetch_bucket_size: int | float | str = "auto"
    stage3_param_persistence_threshold: int | float | str = "auto"
    stage3_max_live_parameters: int | float = 1e9
    stage3_max_reuse_distance: int | float = 1e9
    stage3_gather_16bit_weights_on_model_save: bool = True
    memory_efficient_linear: bool = True
    offload_optimizer: DsOffloadConfig | None = None
    offload_param: DsOffloadConfig | None = None
    zero_quantized_weights: bool = False
    zero_hpz_partition_size: int = 1
    zero_quantized_gradients: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("sub_group_size", self.sub_group_size)
        _int_or_auto("stage3_prefetch_bucket_size", self.stage3_prefetch_bucket_size)
        _int_or_auto("stage3_param_persistence_threshold", self.stage3_param_persistence_threshold)
        _check_positive("stage3_max_live_parameters", self.stage3_max_live_parameters, allow_zero=True)
        _check_positive("stage3_max_reuse_distance", self.stage3_max_reuse_distance, allow_zero=True)
        if isinstance(self.zero_hpz_partition_size, bool) or not isinstance(self.zero_hpz_partition_size, int) \
                or self.zero_hpz_partition_size < 1:
            raise ValueError(f"zero_hpz_partition_size must be an int >= 1, got {self.zero_hpz_partition_size!r}")

    def to_ds_section(self, hidden_size: int | None = None) -> dict:
        d = super().to_ds_section(hidden_size)
        d["sub_group_size"] = int(self.sub_group_size)
        _put_auto(d, "stage3_prefetch_bucket_size", self.stage3_prefetch_bucket_size, hidden_size,
                  lambda h: 0.9 * h * h)
        _put_auto(d, "stage3_param_persistence_threshold", self.stage3_param_persistence_threshold, hidden_size,
                  lambda h: 10 * h)
        d["stage3_max_live_parameters"] = int(self.stage3_max_live_parameters)
        d["stage3_max_reuse_distance"] = int(self.stage3_max_reuse_distance)
        d["stage3_gather_16bit_weights_on_model_save"] = bool(self.stage3_gather_16bit_weights_on_model_save)
        d["memory_efficient_linear"] = bool(self.memory_efficient_linear)
        d["zero_quantized_weights"] = bool(self.zero_quantized_weights)
        d["zero_quantized_gradients"] = bool(self.zero_quantized_gradients)
        d["zero_hpz_partition_size"] = int(self.zero_hpz_partition_size)
        return d


@dataclass(kw_only=True)
class DsFp16Config:
    """fp16 mixed precision with dynamic loss scaling (``loss_scale=0``). ``enabled='auto'``: on when the run's
    dtype is fp16. ``fp16_opt_level`` is accepted for compatibility and not emitted (an Apex AMP setting)."""

    enabled: bool | Literal["auto"] = "auto"
    loss_scale: float = 0
    loss_scale_window: int = 1000
    initial_scale_power: int = 16
    hysteresis: int = 2
    min_loss_scale: float = 1
    fp16_opt_level: str = "O2"

    def __post_init__(self) -> None:
        if self.enabled not in (True, False, "auto"):
            raise ValueError(f"enabled must be True, False or 'auto', got {self.enabled!r}")
        _check_positive("loss_scale", self.loss_scale, allow_zero=True)
        _check_positive("loss_scale_window", self.loss_scale_window)
        _check_positive("initial_scale_power", self.initial_scale_power, allow_zero=True)
        _check_positive("hysteresis", self.hysteresis)
        _check_positive("min_loss_scale", self.min_loss_scale)

    def to_ds_section(self) -> dict:
        """The ``fp16`` section of DeepSpeed's JSON config."""
        return {"enabled": True, "loss_scale": self.loss_scale, "loss_scale_window": int(self.loss_scale_window),
                "initial_scale_power": int(self.initial_scale_power), "hysteresis": int(self.hysteresis),
                "min_loss_scale": self.min_loss_scale}


@dataclass(kw_only=True)
class DsBf16Config:
    """bf16 training (bf16 weights and gradients, fp32 master weights in the optimizer). ``enabled=True``
    allows bf16; whether it is used is decided by the run's dtype (see :meth:`DsConfig.to_ds_dict`)."""

    enabled: bool | Literal["auto"] = True

    def __post_init__(self) -> None:
        if self.enabled not in (True, False, "auto"):
            raise ValueError(f"enabled must be True, False or 'auto', got {self.enabled!r}")

    def to_ds_section(self) -> dict:
        """The ``bf16`` section of DeepSpeed's JSON config."""
        return {"enabled": True}


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    from .base import normalize_dtype  # local: keep this module importable on its own
    return normalize_dtype(dtype)


@dataclass(kw_only=True)
class DsConfig:
    """Everything DeepSpeed needs besides the batch geometry, which comes from the trainer at wrap time."""

    zero_config: DsZeROConfig = field(default_factory=DsZero3Config)
    fp16_config: DsFp16Config = field(default_factory=DsFp16Config)
    bf16_config: DsBf16Config = field(default_factory=DsBf16Config)
    gradient_clipping: float | None = 1.0
    activation_checkpointing: DsActivationCheckpointingConfig | None = None
    wall_clock_breakdown: bool = False
    flops_profiler: DsFlopsProfilerConfig | None = None
    steps_per_print: int | None = None
    zero_allow_untested_optimizer: bool = True  # Lion and other client optimizers under ZeRO
    grad_accum_dtype: Literal["fp32", "bf16", "fp16"] | None = None  # None: DeepSpeed's (= the model dtype)

    def __post_init__(self) -> None:
        checks = [("zero_config", DsZeROConfig, False), ("fp16_config", DsFp16Config, False),
                  ("bf16_config", DsBf16Config, False),
                  ("activation_checkpointing", DsActivationCheckpointingConfig, True),
                  ("flops_profiler", DsFlopsProfilerConfig, True)]
        for name, cls, optional in checks:
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not isinstance(value, cls):
                raise TypeError(f"DsConfig.{name} must be a {cls.__name__}, got {type(value).__name__}")
        if self.gradient_clipping is not None:
            _check_positive("gradient_clipping", self.gradient_clipping, allow_zero=True)
        if self.steps_per_print is not None:
            _check_positive("steps_per_print", self.steps_per_print)
        if self.grad_accum_dtype not in (None, "fp32", "bf16", "fp16"):
            raise ValueError(f"grad_accum_dtype must be None, 'fp32', 'bf16' or 'fp16', got {self.grad_accum_dtype!r}")

    @property
    def stage(self) -> int:
        return self.zero_config.stage

    def resolve_dtype(self, dtype: str | torch.dtype | None = None) -> str:
        """The training dtype: ``dtype`` when given (must be allowed by the fp16/bf16 sections), else fp16 if
        ``fp16_config.enabled is True``, else bf16 if ``bf16_config.enabled is True``, else fp32."""
        name = _dtype_name(dtype)
        if name is None:
            if self.fp16_config.enabled is True:
                return "fp16"
            if self.bf16_config.enabled is True:
                return "bf16"
            return "fp32"
        if name == "bf16" and self.bf16_config.enabled is False:
            raise ValueError("dtype 'bf16' requested but DsConfig.bf16_config.enabled is False")
        if name == "fp16" and self.fp16_config.enabled is False:
            raise ValueError("dtype 'fp16' requested but DsConfig.fp16_config.enabled is False")
        return name

    def to_ds_dict(self, micro_batch: int, grad_accum: int = 1, dtype: str | torch.dtype | None = None,
                   grad_clip: float | None = None, *, hidden_size: int | None = None) -> dict:
        """DeepSpeed's JSON config.

        ``micro_batch`` = per-rank micro-batch size, ``grad_accum`` = micro-batches per optimizer step (DeepSpeed
        derives ``train_batch_size`` from these and the world size). ``grad_clip`` overrides
        ``gradient_clipping`` when given (0 or None in both = no clipping). ``hidden_size`` resolves 'auto' sizes.
        """
        _check_positive("micro_batch", micro_batch)
        _check_positive("grad_accum", grad_accum)
        if isinstance(micro_batch, float) or isinstance(grad_accum, float):
            raise TypeError("micro_batch and grad_accum must be ints")
        clip = self.gradient_clipping if grad_clip is None else grad_clip
        _check_positive("grad_clip", clip or 0, allow_zero=True)
        d: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": int(micro_batch),
            "gradient_accumulation_steps": int(grad_accum),
            "gradient_clipping": float(clip or 0.0),
            "zero_optimization": self.zero_config.to_ds_section(hidden_size),
            "zero_allow_untested_optimizer": bool(self.zero_allow_untested_optimizer),
            "wall_clock_breakdown": bool(self.wall_clock_breakdown),
        }
        if self.steps_per_print is not None:
            d["steps_per_print"] = int(self.steps_per_print)
        resolved = self.resolve_dtype(dtype)
        if resolved == "bf16":
            d["bf16"] = self.bf16_config.to_ds_section()
        elif resolved == "fp16":
            d["fp16"] = self.fp16_config.to_ds_section()
        if self.grad_accum_dtype is not None:
            if self.stage == 0 and resolved != "fp32" and self.grad_accum_dtype != resolved:
                raise ValueError(f"DeepSpeed without ZeRO cannot accumulate {resolved} gradients in "
                                 f"{self.grad_accum_dtype}; use ZeRO >= 1 or grad_accum_dtype=None")
            d["data_types"] = {"grad_accum_dtype": self.grad_accum_dtype}
        if self.activation_checkpointing is not None:
            d["activation_checkpointing"] = self.activation_checkpointing.to_ds_section()
        if self.flops_profiler is not None:
            d["flops_profiler"] = self.flops_profiler.to_ds_section()
        return d

    def to_dict(self) -> dict:
        """Plain nested dict of the dataclass fields (for logging / TOML round trips)."""
        def conv(obj: Any) -> Any:
            if hasattr(obj, "__dataclass_fields__"):
                out = {f.name: conv(getattr(obj, f.name)) for f in fields(obj) if f.init}
                if isinstance(obj, DsZeROConfig):
                    out = {"stage": obj.stage, **out}
                return out
            return obj
        return conv(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DsConfig":
        """Inverse of :meth:`to_dict` (``zero_config.stage`` picks the stage class)."""
        d = dict(d)
        zero = dict(d.pop("zero_config", {"stage": 3}))
        stage = zero.pop("stage", 3)
        zcls = {0: DsZero0Config, 1: DsZero1Config, 2: DsZero2Config, 3: DsZero3Config}.get(stage)
        if zcls is None:
            raise ValueError(f"zero_config.stage must be 0..3, got {stage!r}")
        for key in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(key), dict):
                zero[key] = DsOffloadConfig(**zero[key])
        kwargs: dict[str, Any] = {"zero_config": zcls(**zero)}
        sub = {"fp16_config": DsFp16Config, "bf16_config": DsBf16Config,
               "activation_checkpointing": DsActivationCheckpointingConfig,
               "flops_profiler": DsFlopsProfilerConfig}
        for key, value in d.items():
            kwargs[key] = sub[key](**value) if key in sub and isinstance(value, dict) else value
        return cls(**kwargs)
