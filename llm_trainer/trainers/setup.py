"""Builders a trainer calls once: backend, tokenizer, model config, model (+ weights, LoRA), and the one export path.

Each takes explicit arguments (not the whole `TrainConfig`), so reference, teacher and value models are built the
same way as the policy without copying and patching the config.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch

from ..model import LlmModel, ModelConfig


def resolve_dtype(dtype: str) -> str:
    """'auto' → bf16 on a GPU that supports it, else fp32 (CPU training in bf16 is slow and imprecise)."""
    if dtype != "auto":
        return dtype
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build_backend(ds_config: Any, dtype: str, run_dir: str):
    """The backend the launcher chose (single / DDP / DeepSpeed). With DeepSpeed on a GPU and ``dtype='auto'`` the
    DeepSpeed config's bf16/fp16 sections decide."""
    from ..parallel import get_backend
    resolved = resolve_dtype(dtype)
    if ds_config is not None and dtype == "auto" and torch.cuda.is_available():
        resolved = None
    return get_backend(ds_config, resolved, run_dir=run_dir)


def build_tokenizer(path: str | None, chat_template: str | None = None, chat_template_kwargs: dict | None = None):
    """The run's tokenizer (None without a path); ``chat_template`` / ``chat_template_kwargs`` override the
    folder's template choice and its template variables (e.g. ``enable_thinking``)."""
    if path is None:
        return None
    from ..tokenizer import Tokenizer
    return Tokenizer(path, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs or None)


def _is_hf_folder(path: str | None) -> bool:
    return path is not None and (Path(path) / "config.json").is_file()


def is_vlm_config(config: Any) -> bool:
    from ..model.vlm import VLMConfig
    return isinstance(config, VLMConfig)


def _is_vlm_folder(path: str | None) -> bool:
    if not _is_hf_folder(path):
        return False
    from ..model.vlm import VLM_MODEL_TYPE
    return json.loads((Path(path) / "config.json").read_text()).get("model_type") == VLM_MODEL_TYPE


def require_path(path: str | None, what: str) -> None:
    """Raise ``FileNotFoundError`` naming the setting ``what`` when ``path`` is set but does not exist."""
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")


def resolve_model_config(model_config: ModelConfig | None, weights: str | None, loss_config: Any = None,
                         what: str = "TrainConfig.init_weights_path") -> ModelConfig:
    """An HF-format ``weights`` folder brings its own architecture; otherwise ``model_config``.

    A saved VLM folder gives its `VLMConfig`. With a `VLMConfig` and an LLM folder as ``weights``, the VLM config
    is kept and the folder initialises its language model (see :func:`load_weights`). ``loss_config``'s MoE
    coefficients (``LossConfig.moe_aux_loss_coef`` / ``moe_z_loss_coef``) override the model's for this run.
    ``what`` names the setting ``weights`` came from, for the error when it does not exist."""
    require_path(weights, what)
    if _is_vlm_folder(weights):
        from ..model.vlm import VLMConfig
        config = VLMConfig.from_pretrained_dir(weights)
    elif _is_hf_folder(weights) and not is_vlm_config(model_config):
        from ..model.hf import read_config
        config = read_config(weights)
    else:
        config = model_config
    return _override_moe(config, loss_config)


def _override_moe(config: Any, loss_config: Any) -> Any:
    overrides = {k: v for k, v in (("aux_loss_coef", getattr(loss_config, "moe_aux_loss_coef", None)),
                                   ("z_loss_coef", getattr(loss_config, "moe_z_loss_coef", None))) if v is not None}
    if not overrides:
        return config
    if getattr(config, "moe", None) is None:
        raise ValueError(f"LossConfig.moe_{next(iter(overrides))} is set but the model has no MoE layers "
                         f"(model_config.moe is None)")
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, **overrides))


def new_model(config: ModelConfig) -> torch.nn.Module:
    if is_vlm_config(config):
        from ..model.vlm import VlmModel
        return VlmModel(config)
    return LlmModel(config)


def lora_target(model: torch.nn.Module) -> torch.nn.Module:
    """The module LoRA adapts: a VLM's language model (the vision tower and projector are left as they are)."""
    from ..model.vlm import VlmModel
    return model.llm if isinstance(model, VlmModel) else model


def load_model(config: ModelConfig, weights: str | None = None) -> torch.nn.Module:
    """A model of ``config`` with ``weights`` loaded (random init when None). No context: a backend's
    ``frozen_replica(build=...)`` calls this inside its own construction context."""
    model = new_model(config)
    if weights is not None:
        load_weights(model, weights)
    return model


def build_model(config: ModelConfig, backend, *, weights: str | None = None, lora: Any = None,
                gradient_checkpointing: bool | int | list[int] = False, seed: int | None = None) -> torch.nn.Module:
    """A trainable model: constructed in ``backend.model_init_context()`` (partitioned under ZeRO-3), ``weights``
    loaded, LoRA adapters added (``lora``: a `LoRAConfig`), gradient checkpointing set. ``seed`` seeds the random
    initialisation, so two models built with the same seed start equal (PPO's value backbone and the policy)."""
    if seed is not None:
        torch.manual_seed(seed)
    with backend.model_init_context():
        model = new_model(config)
    if weights is not None:
        load_weights(model, weights)
    if lora is not None:
        from ..model.lora import apply_lora
        apply_lora(lora_target(model), r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                   target_modules=lora.target_modules)
        if lora.quantize_base is not None:
            from ..model.quant import quantize_base
            quantize_base(lora_target(model), lora.quantize_base)
        if lora.trainable_token_rows_from is not None:
            from ..model.vocab import train_new_token_rows
            train_new_token_rows(lora_target(model), lora.trainable_token_rows_from)
    if gradient_checkpointing is not False and hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(True, layers=checkpointed_layers(gradient_checkpointing))
    return model


def checkpointed_layers(setting: bool | int | list[int]) -> slice | list[int] | None:
    """The blocks ``TrainConfig.gradient_checkpointing`` selects: None (all), every k-th, or the listed ones."""
    if setting is True:
        return None
    if isinstance(setting, int):
        return slice(None, None, setting)
    return list(setting)


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load an HF-format folder, one of our checkpoints (``checkpoint-N``) or a safetensors file — strictly."""
    p = Path(path)
    from ..model.vlm import VlmModel
    if isinstance(model, VlmModel) and _is_hf_folder(path) and not _is_vlm_folder(path):
        from ..model.hf import load_hf_state_dict        # an LLM folder initialises the VLM's language model
        load_hf_state_dict(model.llm, p)
        return
    if _is_hf_folder(path):
        loader = getattr(model, "load_pretrained_weights", None)
        if loader is not None:
            loader(p)
        else:
            from ..model.hf import load_hf_state_dict
            load_hf_state_dict(model, p)
        return
    from safetensors.torch import load_file
    candidates = [p] if p.is_file() else [p / "model.safetensors", p / "final" / "model.safetensors"]
    for f in candidates:
        if f.is_file():
            state = load_file(str(f))
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise KeyError(f"{f}: weights do not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
            return
    raise FileNotFoundError(f"init weights {path!r}: not an HF-format folder (config.json + *.safetensors), "
                            f"nor a safetensors file")


def check_trainable(model: torch.nn.Module) -> None:
    """Raise when every parameter is frozen (the optimizer builds weight-decay groups by name from the model)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no trainable parameters: everything is frozen")


# ------------------------------------------------------------------------------------------------------- export
Writer = Callable[[dict, torch.nn.Module, Path], None]


def export_model(backend, model: torch.nn.Module, path: Path, tokenizer=None, *,
                 write: Writer | None = None, adapters: Callable[[torch.nn.Module], torch.nn.Module] = lora_target,
                 config: ModelConfig | None = None) -> Path | None:
    """The one export path: the full state dict (collective), then on the main rank the LoRA adapters of
    ``adapters(plain)`` saved to ``path.parent/lora_adapter`` and merged into the weights, ``write(state, plain,
    path)`` (default: an HF-format LLM/VLM folder of ``config``), and the tokenizer. Returns ``path`` (None on
    other ranks)."""
    from ..model.lora import has_lora, save_lora
    state = backend.full_state_dict(model, copy=False)     # read-only here: no second copy of the model
    if not backend.is_main:
        return None
    plain = backend.unwrap(model)
    if has_lora(plain):
        save_lora(adapters(plain), path.parent / "lora_adapter")
        state = merge_lora_state(state, plain)
    if write is None:
        write_model_folder(state, config if config is not None else plain.config, path)
    else:
        write(state, plain, path)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def write_model_folder(state: dict[str, torch.Tensor], config: ModelConfig, path: Path) -> None:
    """An HF-format folder of an LLM or VLM of ``config`` holding ``state``."""
    target = new_model_for_export(config)
    if isinstance(target, LlmModel):
        from ..model.hf import save_pretrained
        save_pretrained(target, path, state_dict=state)
    else:
        target.to_empty(device="cpu")
        target.load_state_dict(state, strict=True)
        target.save_pretrained(path)


def merge_lora_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fold every ``<name>.lora_A/lora_B`` of a full state dict into ``<name>.weight`` (scale from the model)."""
    from ..model.lora import LoRALinear
    out = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            a, b = state[f"{name}.lora_A.weight"].float(), state[f"{name}.lora_B.weight"].float()
            w = out[f"{name}.weight"]
            out[f"{name}.weight"] = (w.float() + module.scaling * (b @ a)).to(w.dtype)
    return out


def new_model_for_export(config: ModelConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return new_model(config)
