"""Training configuration dataclasses.

Every config is a keyword-only dataclass validated in ``__post_init__``; an invalid value raises ``ValueError``
naming ``Class.field`` and the value. Every default constructs (``TrainConfig()`` works), so a config only needs
the fields you want to change. Field names follow the original ``llm_trainer`` (``initial_lr``, ``max_lr``,
``cosine_annealing_period``, ``kd_coef``, ``loss_beta`` ...).

Serialisation: ``cfg.to_dict()`` / ``Cls.from_dict(d)`` round-trip nested configs through plain dicts, so configs
can live in TOML or JSON files (``cfg.save(path)`` / ``Cls.load(path)``; ``.toml`` or ``.json``).
Callables (``KDConfig.teacher_logits_provider``, ``SFTConfig.pixel_values_provider``) and other non-plain objects
(e.g. a dataset object in ``TrainConfig.file_dataset``) cannot be serialised: ``to_dict()`` leaves them out
(``to_dict(strict=True)`` raises instead) and they must be passed again in code after loading.
``None`` values are omitted from TOML (TOML has no null); a missing key means "the default" on load.

``ModelConfig``/``RoPEScalingConfig``/``MoEConfig`` (``llm_trainer.model``), ``GenerateConfig``
(``llm_trainer.generation``) and ``DsConfig`` & friends (``llm_trainer.parallel.ds_config``) are re-exported
lazily from here.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

# --------------------------------------------------------------------------------------------------------------
# lazy re-exports of configs owned by other modules

_LAZY = {
    "ModelConfig": "llm_trainer.model.config",
    "RoPEScalingConfig": "llm_trainer.model.config",
    "MoEConfig": "llm_trainer.model.config",
    "GenerateConfig": "llm_trainer.generation",
    "DsConfig": "llm_trainer.parallel.ds_config",
}


def __getattr__(name: str):
    if name == "EvalConfig":  # `TrainConfig.eval_config` holds the sampling settings of eval generations
        return __getattr__("GenerateConfig")
    module = _LAZY.get(name) or ("llm_trainer.parallel.ds_config" if name.startswith("Ds") else None)
    if module is None:
        raise AttributeError(f"module 'llm_trainer.configs' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def _optional_class(name: str) -> type | None:
    """The class `name` from its owning module, or None while that module does not exist (yet)."""
    try:
        return getattr(importlib.import_module(_LAZY[name]), name)
    except ImportError:
        return None


def _default_of(name: str) -> Callable[[], Any]:
    def make():
        cls = _optional_class(name)
        return cls() if cls is not None else None

    make.__name__ = f"default_{name}"
    return make


# --------------------------------------------------------------------------------------------------------------
# validation helpers


def _check(cond: bool, name: str, value: Any, requirement: str) -> None:
    """Raise ``ValueError("Class.field must ..., got value")`` unless `cond`."""
    if not cond:
        raise ValueError(f"{name} {requirement}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_ge(obj: Any, name: str, lo: int, allow_none: bool = False) -> None:
    v = getattr(obj, name)
    if v is None and allow_none:
        return
    _check(_is_int(v) and v >= lo, f"{type(obj).__name__}.{name}", v,
           f"must be an int >= {lo}" + (" or None" if allow_none else ""))


def _num_ge(obj: Any, name: str, lo: float, allow_none: bool = False, strict: bool = False) -> None:
    v = getattr(obj, name)
    if v is None and allow_none:
        return
    ok = _is_num(v) and (v > lo if strict else v >= lo)
    _check(ok, f"{type(obj).__name__}.{name}", v,
           f"must be a finite number {'>' if strict else '>='} {lo}" + (" or None" if allow_none else ""))


def _one_of(obj: Any, name: str, choices: tuple) -> None:
    v = getattr(obj, name)
    _check(v in choices, f"{type(obj).__name__}.{name}", v, f"must be one of {choices}")


def _prob(obj: Any, name: str, hi_inclusive: bool = False) -> None:
    v = getattr(obj, name)
    ok = _is_num(v) and 0.0 <= v and (v <= 1.0 if hi_inclusive else v < 1.0)
    _check(ok, f"{type(obj).__name__}.{name}", v, f"must be in [0, 1{']' if hi_inclusive else ')'}")


def _coerce(obj: Any, name: str, cls_name: str) -> None:
    """Accept a plain dict for a nested config field (e.g. ``TrainConfig(optim_config={...})``)."""
    v = getattr(obj, name)
    if isinstance(v, dict):
        cls = globals().get(cls_name) or _optional_class(cls_name)
        if cls is None:
            raise ValueError(f"{type(obj).__name__}.{name}: {cls_name} is not available to build from a dict")
        setattr(obj, name, _convert(cls, v, f"{type(obj).__name__}.{name}"))  # may pick a subclass


# --------------------------------------------------------------------------------------------------------------
# serialisation (to_dict / from_dict / TOML / JSON)


class _Skip:
    pass


_SKIP = _Skip()


def _plain(value: Any, where: str, strict: bool) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_dict(value, where, strict)
    if isinstance(value, (list, tuple)):
        out = [_plain(v, f"{where}[{i}]", strict) for i, v in enumerate(value)]
        if any(v is _SKIP for v in out):
            return _SKIP
        return out
    if isinstance(value, dict):
        out = {str(k): _plain(v, f"{where}.{k}", strict) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _SKIP}
    if strict:
        raise TypeError(f"{where} holds a {type(value).__name__}, which cannot be serialised to TOML/JSON; "
                        "set it again in code after loading")
    return _SKIP


def _to_dict(cfg: Any, where: str, strict: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):  # non-init fields too: they tell subclasses apart (e.g. ZeRO `stage`)
        v = _plain(getattr(cfg, f.name), f"{where}.{f.name}", strict)
        if v is not _SKIP:
            out[f.name] = v
    return out


def _type_namespace() -> dict[str, Any]:
    ns = dict(globals())
    for name in _LAZY:
        ns[name] = _optional_class(name) or Any
    return ns


def _hints(cls: type) -> dict[str, Any]:
    module = importlib.import_module(cls.__module__)
    ns = _type_namespace()
    ns.update(vars(module))
    try:
        return typing.get_type_hints(cls, globalns=ns)
    except Exception:  # unresolvable annotation in a foreign class: fall back to "no conversion"
        return {}


def _union_args(tp: Any) -> tuple:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _convert(tp: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    options = _union_args(tp)
    if isinstance(value, dict):
        declared = [t for t in options if isinstance(t, type) and dataclasses.is_dataclass(t)]
        fitting = [t for t in _candidates(declared) if _matches(t, value)]
        if fitting:
            # a class told apart by a fixed field wins; otherwise the tightest fit (fewest fields)
            best = min(fitting, key=lambda t: (not _has_fixed(t), len(dataclasses.fields(t))))
            return _from_dict(best, value, where)
        if declared:
            return _from_dict(declared[0], value, where)  # raises naming the unknown key
        return value
    if isinstance(value, list):
        for t in options:
            if typing.get_origin(t) is tuple or t is tuple:
                return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool) and float in options and int not in options:
        return float(value)
    return value


# modules defining subclasses of re-exported configs, imported (if present) before choosing a class for a dict
_SUBCLASS_MODULES = ("llm_trainer.model.vlm",)


def _candidates(declared: list[type]) -> list[type]:
    """Declared dataclass types preceded by their dataclass subclasses (deepest first)."""
    for module in _SUBCLASS_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    out: list[type] = []

    def walk(t: type) -> None:
        for sub in t.__subclasses__():
            if dataclasses.is_dataclass(sub):
                walk(sub)
        if t not in out:
            out.append(t)

    for t in declared:
        walk(t)
    return out


def _has_fixed(cls: type) -> bool:
    return any(not f.init and f.default is not dataclasses.MISSING for f in dataclasses.fields(cls))


def _matches(cls: type, data: dict[str, Any]) -> bool:
    """`data` fits `cls`: every key is a field (or alias), and the class's fixed (init=False) fields with a
    default are present in `data` with exactly that value (how e.g. DsZero3Config is told from DsZero2Config)."""
    flds = {f.name: f for f in dataclasses.fields(cls)}
    aliases = getattr(cls, "_ALIASES", {})
    keys = {aliases.get(k, k) for k in data}
    if not keys <= set(flds):
        return False
    for f in flds.values():  # required arguments must be there
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
                and f.name not in keys:
            return False
    for f in flds.values():
        if not f.init and f.default is not dataclasses.MISSING:
            if f.name not in data or data[f.name] != f.default:
                return False
    return True


def _from_dict(cls: type, data: dict[str, Any], where: str | None = None) -> Any:
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a table/dict, got {type(data).__name__}")
    flds = {f.name: f for f in dataclasses.fields(cls) if f.init}
    fixed = {f.name for f in dataclasses.fields(cls) if not f.init}
    aliases = getattr(cls, "_ALIASES", {})
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name in fixed:  # derived / fixed by the class; written by to_dict for polymorphic dispatch only
            continue
        if name not in flds:
            close = difflib.get_close_matches(key, list(flds), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            label = where if where == cls.__name__ else f"{where} ({cls.__name__})"
            raise ValueError(f"{label}: unknown field {key!r}{hint} (valid: {', '.join(flds)})")
        kwargs[name] = _convert(hints.get(name, Any), value, f"{where}.{name}")
    return cls(**kwargs)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None)
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() and k.isascii() else json.dumps(k)


def dict_to_toml(data: dict[str, Any]) -> str:
    """Write a nested dict of plain values as TOML (nested dicts become tables; None values are omitted)."""
    lines: list[str] = []

    def emit(d: dict[str, Any], prefix: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if v is not None and not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in tables.items():
            emit(v, prefix + [k])

    emit(data, [])
    return "\n".join(lines).lstrip("\n") + "\n"


def load_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a `.toml` or `.json` file into a dict."""
    path = Path(path)
    if path.suffix.lower() == ".toml":
        import tomllib

        with open(path, "rb") as f:
            return tomllib.load(f)
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    raise ValueError(f"config file {str(path)!r} must end in .toml or .json")


class ConfigMixin:
    """`to_dict` / `from_dict` / `save` / `load` for the config dataclasses."""

    def to_dict(self, strict: bool = False) -> dict[str, Any]:
        """Nested plain dict. Callables/objects are left out (or raise TypeError with ``strict=True``)."""
        return _to_dict(self, type(self).__name__, strict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a (nested) dict; unknown keys raise ValueError naming the key and close matches."""
        return _from_dict(cls, data)

    def save(self, path: str | os.PathLike, strict: bool = False) -> None:
        path = Path(path)
        data = self.to_dict(strict=strict)
        if path.suffix.lower() == ".toml":
            text = dict_to_toml(data)
        elif path.suffix.lower() == ".json":
            text = json.dumps(data, indent=2) + "\n"
        else:
            raise ValueError(f"config file {str(path)!r} must end in .toml or .json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike):
        return cls.from_dict(load_dict(path))


# --------------------------------------------------------------------------------------------------------------
# the configs

OPTIM_TYPES = ("adam", "adamw", "lion")


@dataclass(kw_only=True)
class DataLoaderConfig(ConfigMixin):
    """torch DataLoader settings. Shuffling is done by our sampler (never passed to DataLoader as `shuffle`)."""

    num_workers: int = 0
    pin_memory: bool = False
    shuffle: bool = True
    drop_last: bool = True  # drop the last incomplete batch of an epoch (the original always did)

    _ALIASES = {"data_loader_shuffle": "shuffle", "data_loader_num_workers": "num_workers",
                "data_loader_pin_memory": "pin_memory", "data_loader_drop_last": "drop_last"}

    def __post_init__(self) -> None:
        _int_ge(self, "num_workers", 0)


@dataclass(kw_only=True)
class OptimConfig(ConfigMixin):
    """Optimizer and learning-rate schedule.

    Schedule (``enable_lr_scheduler=True``), with ``step`` = number of optimizer updates already done:
    linear warmup ``initial_lr → max_lr`` over ``warmup_iters`` updates (update 0 uses ``initial_lr``), then
    cosine ``max_lr → min_lr`` over ``cosine_annealing_period`` updates, with restarts:
    ``cosine_annealing_period_mul = 0``: one cycle, then ``min_lr`` forever; ``= 1``: equal cycles;
    ``> 1``: cycle k lasts ``period · mul**k`` (SGDR). Values in (0, 1) are rejected.
    ``cosine_annealing_period=None`` → one cycle over the rest of training (needs the trainer's total steps).
    ``enable_lr_scheduler=False`` → constant ``initial_lr``.

    Defaults resolved by :meth:`resolved`: ``max_lr=None`` → ``initial_lr``; ``min_lr=None`` → ``0.1·max_lr``;
    ``betas=None`` → (0.9, 0.95) for AdamW, (0.9, 0.99) for Lion; ``weight_decay=None`` → 0.01 for AdamW
    (torch's default), 0.0 for Lion. ``optim_type`` 'adam' and 'adamw' both mean AdamW (decoupled decay).
    Weight decay applies to ≥2-D weights except embedding tables (see ``decay_embeddings``); never to biases
    and norm weights.
    """

    optim_type: str = "adam"
    initial_lr: float = 1e-4
    max_lr: float | None = None
    min_lr: float | None = None
    warmup_iters: int | None = None  # None → warmup_ratio · total_steps, or 0
    warmup_ratio: float | None = None  # fraction of total steps; only when warmup_iters is None
    weight_decay: float | None = None
    decay_embeddings: bool = False
    betas: tuple[float, float] | None = None
    eps: float = 1e-8
    enable_lr_scheduler: bool = False
    cosine_annealing_period: int | None = None
    cosine_annealing_period_mul: float = 0
    auto_optimize_optimizer: bool = True  # fused/foreach kernels where supported (CUDA)

    def __post_init__(self) -> None:
        n = "OptimConfig"
        _one_of(self, "optim_type", OPTIM_TYPES)
        _num_ge(self, "initial_lr", 0.0)
        if not self.enable_lr_scheduler:
            _check(self.initial_lr > 0, f"{n}.initial_lr", self.initial_lr, "must be > 0 when the scheduler is off")
        _num_ge(self, "max_lr", 0.0, allow_none=True, strict=True)
        _num_ge(self, "min_lr", 0.0, allow_none=True)
        max_lr = self.initial_lr if self.max_lr is None else self.max_lr
        if self.max_lr is not None:
            _check(self.max_lr >= self.initial_lr, f"{n}.max_lr", self.max_lr,
                   f"must be >= initial_lr ({self.initial_lr})")
        if self.min_lr is not None:
            _check(self.min_lr <= max_lr, f"{n}.min_lr", self.min_lr, f"must be <= max_lr ({max_lr})")
        _int_ge(self, "warmup_iters", 0, allow_none=True)
        if self.warmup_ratio is not None:
            _prob(self, "warmup_ratio")
            _check(self.warmup_iters is None, f"{n}.warmup_ratio", self.warmup_ratio,
                   "cannot be set together with warmup_iters")
        _num_ge(self, "weight_decay", 0.0, allow_none=True)
        if self.betas is not None:
            b = self.betas = tuple(self.betas)
            _check(len(b) == 2 and all(_is_num(x) and 0.0 <= x < 1.0 for x in b), f"{n}.betas", b,
                   "must be two numbers in [0, 1)")
        _num_ge(self, "eps", 0.0, strict=True)
        _int_ge(self, "cosine_annealing_period", 1, allow_none=True)
        mul = self.cosine_annealing_period_mul
        _check(_is_num(mul) and (mul == 0 or mul >= 1), f"{n}.cosine_annealing_period_mul", mul,
               "must be 0 (single cycle) or >= 1 (1: equal restarts, 2: doubling)")

    @property
    def peak_lr(self) -> float:
        return self.initial_lr if self.max_lr is None else self.max_lr

    @property
    def final_lr(self) -> float:
        return 0.1 * self.peak_lr if self.min_lr is None else self.min_lr

    def resolved_betas(self) -> tuple[float, float]:
        if self.betas is not None:
            return tuple(self.betas)
        return (0.9, 0.99) if self.optim_type == "lion" else (0.9, 0.95)

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return 0.0 if self.optim_type == "lion" else 0.01

    def resolved_warmup_iters(self, total_steps: int | None = None) -> int:
        if self.warmup_iters is not None:
            return self.warmup_iters
        if self.warmup_ratio is not None and total_steps:
            return int(round(self.warmup_ratio * total_steps))
        return 0


KD_KINDS = ("forward_kl", "reverse_kl", "jsd")


@dataclass(kw_only=True)
class KDConfig(ConfigMixin):
    """Knowledge distillation: ``loss = (1 - kd_coef)·LM + kd_coef·KD`` with the teacher from either a
    ``teacher_logits_provider(input_ids, attention_mask) -> logits [B, S, V]`` callable (not serialisable) or a
    ``teacher_model_path`` (our checkpoint or an HF-format folder). ``kind='jsd'`` is the generalised JSD with
    ``jsd_beta`` (0 → forward KL limit, 1 → reverse KL limit); ``temperature`` divides both logits."""

    teacher_logits_provider: Callable | None = None
    teacher_model_path: str | None = None
    kd_coef: float = 0.4
    kind: str = "forward_kl"
    jsd_beta: float = 0.5
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check(self.teacher_logits_provider is None or callable(self.teacher_logits_provider),
               "KDConfig.teacher_logits_provider", self.teacher_logits_provider, "must be callable")
        _prob(self, "kd_coef", hi_inclusive=True)
        _one_of(self, "kind", KD_KINDS)
        _prob(self, "jsd_beta", hi_inclusive=True)
        _num_ge(self, "temperature", 0.0, strict=True)
        _check(self.teacher_logits_provider is None or self.teacher_model_path is None,
               "KDConfig.teacher_model_path", self.teacher_model_path,
               "cannot be set together with teacher_logits_provider (pick one teacher)")

    def check_teacher(self) -> None:
        """Raise unless exactly one teacher source is set (call when KD is about to be used)."""
        n = (self.teacher_logits_provider is not None) + (self.teacher_model_path is not None)
        _check(n == 1, "KDConfig.teacher_logits_provider/teacher_model_path",
               (self.teacher_logits_provider, self.teacher_model_path), "must have exactly one set")


@dataclass(kw_only=True)
class LossConfig(ConfigMixin):
    """Loss options shared by the LM trainers.

    ``critical_tokens``: token ids whose cross-entropy is multiplied by ``critical_token_weight``.
    ``moe_aux_loss_coef``/``moe_z_loss_coef``: override the model's MoE coefficients (None → the model's)."""

    critical_tokens: list[int] | None = None
    critical_token_weight: float = 1.0
    moe_aux_loss_coef: float | None = None
    moe_z_loss_coef: float | None = None

    def __post_init__(self) -> None:
        if self.critical_tokens is not None:
            self.critical_tokens = list(self.critical_tokens)
            _check(all(_is_int(t) and t >= 0 for t in self.critical_tokens), "LossConfig.critical_tokens",
                   self.critical_tokens, "must be a list of non-negative token ids")
        _num_ge(self, "critical_token_weight", 0.0)
        _num_ge(self, "moe_aux_loss_coef", 0.0, allow_none=True)
        _num_ge(self, "moe_z_loss_coef", 0.0, allow_none=True)


@dataclass(kw_only=True)
class LoRAConfig(ConfigMixin):
    """LoRA adapters (Hu et al. 2021): ``W + (alpha / r)·B·A`` on linear layers whose name ends with one of
    ``target_modules``."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    quantize_base: str | None = None
    """QLoRA: store the frozen base linear weights as 'nf4' or 'int8' (needs the ``quant`` extra); None = full."""

    def __post_init__(self) -> None:
        _int_ge(self, "r", 1)
        if self.quantize_base is not None:
            _one_of(self, "quantize_base", ("nf4", "int8"))
        _num_ge(self, "alpha", 0.0, strict=True)
        _prob(self, "dropout")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        _check(len(self.target_modules) > 0 and all(isinstance(m, str) and m for m in self.target_modules),
               "LoRAConfig.target_modules", self.target_modules, "must be a non-empty list of module names")


@dataclass(kw_only=True)
class PretrainConfig(ConfigMixin):
    """Pretraining. ``chunked_cross_entropy_size``: tokens per chunk of the chunked CE (None → plain CE).
    ``packing=True``: attention and positions restart at document boundaries inside a block."""

    gradient_accumulation_steps: int = 1
    kd_config: KDConfig | None = None
    chunked_cross_entropy_size: int | None = None
    packing: bool = False

    def __post_init__(self) -> None:
        _coerce(self, "kd_config", "KDConfig")
        _int_ge(self, "gradient_accumulation_steps", 1)
        _int_ge(self, "chunked_cross_entropy_size", 1, allow_none=True)


@dataclass(kw_only=True)
class SFTConfig(ConfigMixin):
    """Supervised fine-tuning. ``mask_prompt``: train only on assistant tokens. ``packing``: several samples
    per row with document masking. ``pixel_values_provider(image_tags) -> Tensor`` (VLM; not serialisable).
    Image paths travel with the SFT data itself (``prepare_data --image-field``), not in a separate file."""

    mask_prompt: bool = True
    packing: bool = False
    freeze_llm_model: bool = False
    freeze_vision_encoder: bool = False
    gradient_accumulation_steps: int = 1
    kd_config: KDConfig | None = None
    chunked_cross_entropy_size: int | None = None
    pixel_values_provider: Callable | None = None

    def __post_init__(self) -> None:
        _coerce(self, "kd_config", "KDConfig")
        _int_ge(self, "gradient_accumulation_steps", 1)
        _int_ge(self, "chunked_cross_entropy_size", 1, allow_none=True)
        _check(self.pixel_values_provider is None or callable(self.pixel_values_provider),
               "SFTConfig.pixel_values_provider", self.pixel_values_provider, "must be callable")


DPO_LOSS_TYPES = ("dpo", "ipo", "hinge", "robust", "orpo", "simpo")


@dataclass(kw_only=True)
class DPOConfig(ConfigMixin):
    """Direct preference optimisation and variants.

    ``loss_type``: 'dpo' (Rafailov et al. 2023; with ``loss_label_smoothing`` > 0 it is conservative DPO),
    'ipo' (Azar et al. 2023), 'hinge' (SLiC, Zhao et al. 2023), 'robust' (Chowdhury et al. 2024, uses
    ``loss_label_smoothing`` as the flip rate), 'orpo' (Hong et al. 2024; ``loss_beta`` is λ), 'simpo'
    (Meng et al. 2024; ``loss_beta`` and ``simpo_gamma``). ORPO and SimPO need no reference model.
    ``nll_loss_coef``: add this times the chosen-response NLL (RPO). ``skip_bad_pairs``: skip (instead of
    reporting as an error) pairs with an empty response or identical chosen/rejected.
    ``loss_ipo=True`` is the original library's spelling of ``loss_type='ipo'``."""

    ref_model_weights_path: str | None = None
    mask_prompt: bool = True
    gradient_accumulation_steps: int = 1
    loss_type: str = "dpo"
    loss_beta: float = 0.1
    loss_label_smoothing: float = 0.0
    loss_ipo: bool = False
    nll_loss_coef: float | None = None
    simpo_gamma: float = 0.5
    precompute_ref_log_probs: bool = False
    skip_bad_pairs: bool = False

    def __post_init__(self) -> None:
        if self.loss_ipo:
            _check(self.loss_type in ("dpo", "ipo"), "DPOConfig.loss_ipo", self.loss_ipo,
                   f"conflicts with loss_type={self.loss_type!r}")
            self.loss_type = "ipo"
        _one_of(self, "loss_type", DPO_LOSS_TYPES)
        _int_ge(self, "gradient_accumulation_steps", 1)
        _num_ge(self, "loss_beta", 0.0, strict=True)
        v = self.loss_label_smoothing
        _check(_is_num(v) and 0.0 <= v < 0.5, "DPOConfig.loss_label_smoothing", v, "must be in [0, 0.5)")
        _check(v == 0.0 or self.loss_type in ("dpo", "robust"), "DPOConfig.loss_label_smoothing", v,
               f"only applies to loss_type 'dpo' or 'robust' (loss_type={self.loss_type!r})")
        _num_ge(self, "nll_loss_coef", 0.0, allow_none=True)
        _num_ge(self, "simpo_gamma", 0.0)

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in ("orpo", "simpo")


@dataclass(kw_only=True)
class RewardConfig(ConfigMixin):
    """Reward-model training with the Bradley–Terry loss ``-log σ(r_chosen - r_rejected - margin)``.
    ``margin`` is a constant; a per-pair ``margin`` in the data is added to it.
    ``center_rewards_coef``: optional penalty ``coef·(r_c + r_r)²`` keeping rewards centred (None → off)."""

    margin: float = 0.0
    gradient_accumulation_steps: int = 1
    center_rewards_coef: float | None = None

    def __post_init__(self) -> None:
        _check(_is_num(self.margin), "RewardConfig.margin", self.margin, "must be a finite number")
        _int_ge(self, "gradient_accumulation_steps", 1)
        _num_ge(self, "center_rewards_coef", 0.0, allow_none=True)


KL_ESTIMATORS = ("k1", "k2", "k3")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")


@dataclass(kw_only=True)
class GRPOConfig(ConfigMixin):
    """Group relative policy optimisation (Shao et al. 2024) and variants.

    Each prompt gets ``group_size`` completions; advantages are group-normalised (divided by the group std
    unless ``scale_rewards=False``, Dr.GRPO). ``loss_type``: 'grpo' (mean over each sequence's tokens, then
    over sequences), 'bnpo' (mean over the micro-batch's tokens), 'dr_grpo' (sum / (sequences ·
    max_new_tokens), a constant), 'dapo' (sum / tokens of the whole accumulation window), 'cispo' (clipped IS
    weight, stop-gradient, times log-prob). Clipping: ratio in [1 - loss_clip_eps, 1 + loss_clip_eps_high]
    (``loss_clip_eps_high=None`` → symmetric); ``loss_delta`` caps the ratio of negative-advantage tokens too.
    ``loss_importance_sampling_level='sequence'`` is GSPO (use much smaller eps, e.g. 3e-4/4e-4).
    ``loss_beta`` weighs the KL to the reference (0 → no reference model is loaded).
    ``grpo_epochs`` inner epochs over each rollout buffer in mini-batches of ``grpo_batch_size`` samples
    (None → the whole buffer, one update per epoch). ``filter_zero_variance_groups`` drops groups whose
    rewards are all equal (they have zero advantage); ``dynamic_sampling`` (DAPO) instead re-samples prompts
    up to ``dynamic_sampling_max_rounds`` times to refill the batch. ``reward_weights``: one weight per reward
    function (None → all 1). The completion length limit is ``generate_config.max_new_tokens``."""

    group_size: int = 12
    grpo_epochs: int = 1
    grpo_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    loss_type: str = "grpo"
    loss_beta: float = 0.04
    kl_estimator: str = "k3"
    loss_clip_eps: float = 0.2
    loss_clip_eps_high: float | None = None
    loss_delta: float | None = None
    loss_importance_sampling_level: str = "token"
    scale_rewards: bool = True
    filter_zero_variance_groups: bool = False
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3
    mask_truncated_completions: bool = False
    chunked_rollout_size: int | None = None
    ref_model_weights_path: str | None = None
    ptx_coef: float = 0.0
    reward_weights: list[float] | None = None
    generate_config: Any = field(default_factory=_default_of("GenerateConfig"))

    _ALIASES = {"importance_sampling_level": "loss_importance_sampling_level"}

    def __post_init__(self) -> None:
        _coerce(self, "generate_config", "GenerateConfig")
        _int_ge(self, "group_size", 1)
        _int_ge(self, "grpo_epochs", 1)
        _int_ge(self, "grpo_batch_size", 1, allow_none=True)
        _int_ge(self, "gradient_accumulation_steps", 1)
        _one_of(self, "loss_type", GRPO_LOSS_TYPES)
        _num_ge(self, "loss_beta", 0.0)
        _one_of(self, "kl_estimator", KL_ESTIMATORS)
        _num_ge(self, "loss_clip_eps", 0.0, strict=True)
        _num_ge(self, "loss_clip_eps_high", 0.0, allow_none=True, strict=True)
        if self.loss_delta is not None:
            _check(_is_num(self.loss_delta) and self.loss_delta > 1.0, "GRPOConfig.loss_delta", self.loss_delta,
                   "must be > 1 (a cap on the importance ratio) or None")
        _one_of(self, "loss_importance_sampling_level", ("token", "sequence"))
        _int_ge(self, "dynamic_sampling_max_rounds", 1)
        _check(not (self.dynamic_sampling and self.filter_zero_variance_groups), "GRPOConfig.dynamic_sampling",
               self.dynamic_sampling, "and filter_zero_variance_groups are alternatives; set one")
        _int_ge(self, "chunked_rollout_size", 1, allow_none=True)
        _num_ge(self, "ptx_coef", 0.0)
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]
            _check(all(math.isfinite(w) for w in self.reward_weights), "GRPOConfig.reward_weights",
                   self.reward_weights, "must be finite numbers")

    @property
    def clip_eps_high(self) -> float:
        return self.loss_clip_eps if self.loss_clip_eps_high is None else self.loss_clip_eps_high

    @property
    def importance_sampling_level(self) -> str:
        return self.loss_importance_sampling_level

    @property
    def needs_reference(self) -> bool:
        return self.loss_beta > 0


@dataclass(kw_only=True)
class AdaptiveKLConfig(ConfigMixin):
    """Adaptive KL controller (Ziegler et al. 2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·n_steps/horizon)."""

    target: float = 6.0
    horizon: int = 10000

    def __post_init__(self) -> None:
        _num_ge(self, "target", 0.0, strict=True)
        _int_ge(self, "horizon", 1)


@dataclass(kw_only=True)
class PPOConfig(ConfigMixin):
    """PPO for LLMs (Ouyang et al. 2022 / Huang et al. 2024 "N+ implementation details").

    Value model: a separate model (``value_model_weights_path``, None → initialised from the policy weights
    with a fresh head) or a value head on the policy (``value_head_on_policy=True``). ``value_optim_config``:
    its own optimizer settings (None → the policy's). GAE with ``gamma``/``lam``; clipped policy loss
    (``clip_eps``) and clipped value loss (``value_clip_eps``, None → unclipped); value loss Huber with
    ``huber_delta`` (None → MSE), weighted by ``vf_coef``. KL penalty ``kl_beta`` in the reward with
    ``kl_estimator``; ``adaptive_kl`` makes β adaptive. ``missing_eos_penalty`` is subtracted from the score
    of completions without EOS. Reward normalisation (``normalize_rewards``, 'running' or 'batch' statistics),
    ``whiten_rewards`` (batch whitening of token rewards), ``whiten_advantages``. ``ptx_coef`` mixes in the
    pretraining LM loss."""

    ppo_epochs: int = 1
    ppo_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    ref_model_weights_path: str | None = None
    value_model_weights_path: str | None = None
    value_head_on_policy: bool = False
    value_optim_config: OptimConfig | None = None
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float | None = 0.2
    vf_coef: float = 0.1
    kl_beta: float = 0.02
    kl_estimator: str = "k1"
    adaptive_kl: AdaptiveKLConfig | None = None
    huber_delta: float | None = 1.0
    ptx_coef: float = 0.0
    missing_eos_penalty: float | None = None
    normalize_rewards: bool = False
    normalize_method: str = "running"
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    chunked_rollout_size: int | None = None
    generate_config: Any = field(default_factory=_default_of("GenerateConfig"))

    def __post_init__(self) -> None:
        _coerce(self, "value_optim_config", "OptimConfig")
        _coerce(self, "adaptive_kl", "AdaptiveKLConfig")
        _coerce(self, "generate_config", "GenerateConfig")
        _int_ge(self, "ppo_epochs", 1)
        _int_ge(self, "ppo_batch_size", 1, allow_none=True)
        _int_ge(self, "gradient_accumulation_steps", 1)
        _prob(self, "gamma", hi_inclusive=True)
        _prob(self, "lam", hi_inclusive=True)
        _num_ge(self, "clip_eps", 0.0, strict=True)
        _num_ge(self, "value_clip_eps", 0.0, allow_none=True, strict=True)
        _num_ge(self, "vf_coef", 0.0)
        _num_ge(self, "kl_beta", 0.0)
        _one_of(self, "kl_estimator", KL_ESTIMATORS)
        _num_ge(self, "huber_delta", 0.0, allow_none=True, strict=True)
        _num_ge(self, "ptx_coef", 0.0)
        _num_ge(self, "missing_eos_penalty", 0.0, allow_none=True)
        _one_of(self, "normalize_method", ("running", "batch"))
        _int_ge(self, "chunked_rollout_size", 1, allow_none=True)


DTYPES = ("auto", "fp32", "bf16", "fp16")
REPORT_TO = ("tensorboard", "wandb")


@dataclass(kw_only=True)
class TrainConfig(ConfigMixin):
    """Everything a trainer needs. Intervals count optimizer steps; None disables saving/eval.

    ``batch_size`` is the per-process micro-batch; the global batch is
    ``batch_size · gradient_accumulation_steps · world_size``. ``file_dataset``: a path, a list of paths or a
    dataset object (objects are not serialised by ``to_dict``). ``dataset_block_size=None`` →
    ``model_config.max_position_embeddings``. ``init_weights_path``: our checkpoint or an HF-format folder.
    ``resume_from``: None (start fresh), 'auto' (latest complete checkpoint in ``output_dir``, fresh if none)
    or a checkpoint path. ``dtype='auto'`` → bf16 where supported, else fp32. ``max_grad_norm=None`` → no
    clipping (the norm is still logged). ``nan_policy``: 'stop' raises on a non-finite loss, 'skip' skips the
    update. ``eval_batches``: batches of ``eval_file_dataset`` per evaluation (None → all).
    ``keep_last_checkpoints``: checkpoints kept in ``output_dir`` (None → all)."""

    n_epochs: int = 1
    batch_size: int = 8
    model_config: Any = field(default_factory=_default_of("ModelConfig"))
    init_weights_path: str | None = None
    file_dataset: Any = None
    dataset_block_size: int | None = None
    eval_file_dataset: Any = None
    data_loader_config: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    optim_config: OptimConfig = field(default_factory=OptimConfig)
    ds_config: Any = field(default_factory=_default_of("DsConfig"))
    eval_config: Any = field(default_factory=_default_of("GenerateConfig"))
    save_interval: int | None = 100
    eval_interval: int | None = 100
    log_interval: int = 10
    eval_batches: int | None = None
    gradient_checkpointing: bool = False
    pretrain_config: PretrainConfig | None = None
    sft_config: SFTConfig | None = None
    dpo_config: DPOConfig | None = None
    ppo_config: PPOConfig | None = None
    grpo_config: GRPOConfig | None = None
    reward_config: RewardConfig | None = None
    loss_config: LossConfig = field(default_factory=LossConfig)
    lora: LoRAConfig | None = None
    output_dir: str = "runs/train"
    tokenizer: str | None = None
    seed: int = 42
    dtype: str = "auto"
    max_steps: int | None = None
    resume_from: str | None = None
    keep_last_checkpoints: int | None = 2
    max_grad_norm: float | None = 1.0
    nan_policy: str = "stop"
    report_to: list[str] = field(default_factory=list)
    run_name: str | None = None

    _ALIASES = {"eval_batch_interval": "eval_interval"}

    def __post_init__(self) -> None:
        n = "TrainConfig"
        for name, cls_name in (("model_config", "ModelConfig"), ("data_loader_config", "DataLoaderConfig"),
                               ("optim_config", "OptimConfig"), ("ds_config", "DsConfig"),
                               ("eval_config", "GenerateConfig"), ("pretrain_config", "PretrainConfig"),
                               ("sft_config", "SFTConfig"), ("dpo_config", "DPOConfig"),
                               ("ppo_config", "PPOConfig"), ("grpo_config", "GRPOConfig"),
                               ("reward_config", "RewardConfig"), ("loss_config", "LossConfig"),
                               ("lora", "LoRAConfig")):
            _coerce(self, name, cls_name)
        _int_ge(self, "n_epochs", 1)
        _int_ge(self, "batch_size", 1)
        _int_ge(self, "dataset_block_size", 2, allow_none=True)
        max_pos = getattr(self.model_config, "max_position_embeddings", None)
        if self.dataset_block_size is not None and _is_int(max_pos):
            _check(self.dataset_block_size <= max_pos, f"{n}.dataset_block_size", self.dataset_block_size,
                   f"must be <= model_config.max_position_embeddings ({max_pos})")
        _int_ge(self, "save_interval", 1, allow_none=True)
        _int_ge(self, "eval_interval", 1, allow_none=True)
        _int_ge(self, "log_interval", 1)
        _int_ge(self, "eval_batches", 1, allow_none=True)
        _check(isinstance(self.output_dir, (str, os.PathLike)) and str(self.output_dir) != "",
               f"{n}.output_dir", self.output_dir, "must be a non-empty path")
        self.output_dir = str(self.output_dir)
        _check(_is_int(self.seed), f"{n}.seed", self.seed, "must be an int")
        _one_of(self, "dtype", DTYPES)
        _int_ge(self, "max_steps", 1, allow_none=True)
        if self.resume_from is not None:
            self.resume_from = str(self.resume_from)
            _check(self.resume_from != "", f"{n}.resume_from", self.resume_from, "must be None, 'auto' or a path")
        _int_ge(self, "keep_last_checkpoints", 1, allow_none=True)
        _num_ge(self, "max_grad_norm", 0.0, allow_none=True, strict=True)
        _one_of(self, "nan_policy", ("stop", "skip"))
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        self.report_to = list(self.report_to or [])
        for r in self.report_to:
            _check(r in REPORT_TO, f"{n}.report_to", self.report_to, f"entries must be in {REPORT_TO}")

    @property
    def block_size(self) -> int | None:
        """``dataset_block_size`` or, when None, the model's ``max_position_embeddings``."""
        if self.dataset_block_size is not None:
            return self.dataset_block_size
        return getattr(self.model_config, "max_position_embeddings", None)


__all__ = [
    "AdaptiveKLConfig", "ConfigMixin", "DPOConfig", "DataLoaderConfig", "KDConfig", "LoRAConfig", "LossConfig",
    "OptimConfig", "PPOConfig", "PretrainConfig", "RewardConfig", "SFTConfig", "GRPOConfig", "TrainConfig",
    "dict_to_toml", "load_dict",
]
