"""Building what a trainer needs from a `TrainConfig`: backend, tokenizer, model (+ weights, LoRA), export."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from ..configs import TrainConfig
from ..model import LlmModel, ModelConfig


def resolve_dtype(dtype: str) -> str:
    """'auto' → bf16 on a GPU that supports it, else fp32 (CPU training in bf16 is slow and imprecise)."""
    if dtype != "auto":
        return dtype
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build_backend(cfg: TrainConfig):
    from ..parallel import get_backend
    ds = cfg.ds_config
    dtype = resolve_dtype(cfg.dtype)
    if ds is not None and cfg.dtype == "auto" and torch.cuda.is_available():
        dtype = None                                   # the DeepSpeed config decides (bf16/fp16 sections)
    return get_backend(ds, dtype, run_dir=cfg.output_dir)


def build_tokenizer(cfg: TrainConfig):
    if cfg.tokenizer is None:
        return None
    from ..tokenizer import Tokenizer
    return Tokenizer(cfg.tokenizer)


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


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """An HF-format ``init_weights_path`` brings its own architecture; otherwise ``model_config``.

    A saved VLM folder gives its `VLMConfig`. With ``model_config=VLMConfig(...)`` and an LLM folder as
    ``init_weights_path``, the VLM config is kept and the folder initialises its language model (see
    :func:`load_weights`)."""
    if _is_vlm_folder(cfg.init_weights_path):
        from ..model.vlm import VLMConfig
        return VLMConfig.from_pretrained_dir(cfg.init_weights_path)
    if _is_hf_folder(cfg.init_weights_path):
        if is_vlm_config(cfg.model_config):
            return cfg.model_config
        from ..model.hf import read_config
        return read_config(cfg.init_weights_path)
    return cfg.model_config


def new_model(config: ModelConfig) -> torch.nn.Module:
    if is_vlm_config(config):
        from ..model.vlm import VlmModel
        return VlmModel(config)
    return LlmModel(config)


def lora_target(model: torch.nn.Module) -> torch.nn.Module:
    """The module LoRA adapts: a VLM's language model (the vision tower and projector are left as they are)."""
    from ..model.vlm import VlmModel
    return model.llm if isinstance(model, VlmModel) else model


def build_model(cfg: TrainConfig, config: ModelConfig, backend, weights_path: str | None = None) -> torch.nn.Module:
    """Construct (partitioned under ZeRO-3), load weights, add LoRA, set gradient checkpointing."""
    with backend.model_init_context():
        model = new_model(config)
    path = weights_path if weights_path is not None else cfg.init_weights_path
    if path is not None:
        load_weights(model, path)
    if cfg.lora is not None:
        from ..model.lora import apply_lora
        lc = cfg.lora
        apply_lora(lora_target(model), r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules)
    if cfg.gradient_checkpointing and hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(True)
    return model


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


def trainable_parameters(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself: the optimizer builds weight-decay groups by name and skips frozen parameters."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no trainable parameters: everything is frozen")
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode, no-grad deep copy (reference models start as the initial policy, never random)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def export_model(backend, model: torch.nn.Module, config: ModelConfig, tokenizer, path: Path) -> Path | None:
    """HF-format folder (+ tokenizer) written by the main rank; LoRA adapters are merged into the export."""
    from ..model.lora import has_lora, save_lora
    plain = backend.unwrap(model)
    state = backend.full_state_dict(model)
    if not backend.is_main:
        return None
    if has_lora(plain):
        save_lora(plain, path.parent / "lora_adapter")
        state = merge_lora_state(state, plain)
    target = new_model_for_export(config)
    if isinstance(target, LlmModel):
        from ..model.hf import save_pretrained
        save_pretrained(target, path, state_dict=state)
    else:
        target.to_empty(device="cpu")
        target.load_state_dict(state, strict=True)
        target.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


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
