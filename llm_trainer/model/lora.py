"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): y = W x + b + (alpha / r) · B A dropout(x).

`apply_lora` replaces targeted `nn.Linear` modules with :class:`LoRALinear`, which keeps the *same* ``weight`` /
``bias`` Parameters under the same names (so the base state dict, HF export and optimizer references are unchanged)
and adds ``lora_A.weight`` ``[r, in]`` (Kaiming-uniform, a=√5, as nn.Linear) and ``lora_B.weight`` ``[out, r]``
(zeros, so the adapted model starts equal to the base). All non-LoRA parameters are frozen.

Adapters are saved PEFT-style (``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight``
and ``adapter_config.json`` with ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``peft_type: LORA``),
so our module names — which follow Hugging Face Llama/Qwen — load into ``peft`` as well.

QLoRA: ``quantize_base(apply_lora(model, ...), "nf4" | "int8")`` stores the frozen base weights quantized under
the same adapters (:mod:`llm_trainer.model.quant`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear", "apply_lora", "lora_parameters", "lora_state_dict", "merge_lora", "unmerge_lora",
           "save_lora", "load_lora", "lora_disabled", "remove_lora", "has_lora", "DEFAULT_TARGET_MODULES"]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A linear layer with a low-rank adapter. Holds the wrapped layer's own ``weight``/``bias`` Parameters."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha = int(r), float(alpha)
        self.scaling = self.alpha / self.r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.merged = False
        self.disabled = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the adapter only (A Kaiming-uniform, B zeros); the base weight is left alone."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, ``[out, in]``, computed in fp32 and cast to the base weight's dtype."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (delta * self.scaling).to(self.weight.dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone: ``W x + b``."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if self.merged or self.disabled:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def to_linear(self, merge: bool = True) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's weight Parameter, the adapter merged into it when ``merge``
        (else the weight without the adapter)."""
        if merge:
            self.merge()
        else:
            self.unmerge()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}")


def _lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in _lora_modules(model))


def is_router(parent: nn.Module, child_name: str) -> bool:
    """Whether ``parent.<child_name>`` is a MoE router (its weight is read directly, so it cannot be wrapped)."""
    return child_name == "gate" and type(parent).__name__ == "SparseMoE"


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: str | Sequence[str] | None = None) -> nn.Module:
    """Wrap the targeted linear layers of ``model`` in place and freeze every other parameter. Returns ``model``.

    ``target_modules``: a list of module-name suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``),
    a regex string matched against full module names, or ``"all-linear"`` (every ``nn.Linear`` except ``lm_head``
    and MoE routers). Default: the attention and MLP projections. A target that matches nothing is an error.
    For QLoRA, :func:`llm_trainer.model.quant.quantize_base` then stores the frozen base weights quantized.
    """
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if has_lora(model):
        raise ValueError("model already has LoRA adapters; call remove_lora() first")
    targets = DEFAULT_TARGET_MODULES if target_modules is None else target_modules
    if not isinstance(targets, str):
        targets = tuple(targets)
        if not targets:
            raise ValueError("target_modules is empty")

    replace: list[tuple[nn.Module, str, str]] = []
    linear_names: list[str] = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if not isinstance(child, nn.Linear):
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            linear_names.append(full)
            if targets == "all-linear":
                hit = child_name != "lm_head" and not is_router(parent, child_name)
            else:
                hit = _matches(full, targets)
                if hit and is_router(parent, child_name):
                    raise ValueError(f"{full} is a MoE router; LoRA cannot adapt it (its weight is read directly)")
            if hit:
                replace.append((parent, child_name, full))
    if not replace:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ValueError(f"target_modules {targets!r} matched no linear layer; linear layer names: {short}")
    if not isinstance(targets, str):
        unmatched = [t for t in targets if not any(_matches(full, (t,)) for _, _, full in replace)]
        if unmatched:
            raise ValueError(f"target_modules {unmatched} matched no linear layer")

    for p in model.parameters():
        p.requires_grad_(False)
    for parent, child_name, _ in replace:
        setattr(parent, child_name, LoRALinear(getattr(parent, child_name), r, alpha, dropout))
    model._lora_config = {"r": r, "lora_alpha": float(alpha), "lora_dropout": float(dropout),
                          "target_modules": targets if isinstance(targets, str) else list(targets)}
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what the optimizer should train)."""
    return [p for _, m in _lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A.weight": tensor, ...}`` for every adapter, keys as in ``model.state_dict()``."""
    out = {}
    for name, m in _lora_modules(model):
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    if not out:
        raise ValueError("model has no LoRA adapters (call apply_lora first)")
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (inference speed); :func:`unmerge_lora` undoes it."""
    for _, m in _lora_modules(model):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, m in _lora_modules(model):
        m.unmerge()
    return model


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by a plain ``nn.Linear`` (merged into the weight when ``merge``), e.g. before
    ``save_pretrained`` of a full fine-tuned model. Base parameters get ``requires_grad=True`` back."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, child_name, child.to_linear(merge))
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "_lora_config"):
        del model._lora_config
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model (adapters off) inside the block, e.g. as the frozen reference policy in LoRA-DPO."""
    mods = [m for _, m in _lora_modules(model)]
    if not mods:
        raise ValueError("model has no LoRA adapters")
    state = [(m.disabled, m.merged) for m in mods]
    try:
        for m in mods:
            m.unmerge()
            m.disabled = True
        yield model
    finally:
        for m, (disabled, merged) in zip(mods, state):
            m.disabled = disabled
            if merged:
                m.merge()


def save_lora(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> str:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT layout). Adapters are saved unmerged
    values (merging does not change A/B). Returns the directory."""
    from safetensors.torch import save_file

    from .hf import set_default_file_mode
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {_PEFT_PREFIX + k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    cfg = dict(getattr(model, "_lora_config", None) or _infer_config(model))
    cfg.update({"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False,
                "base_model_name_or_path": base_model_name_or_path, "inference_mode": True})
    tmp = d / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    set_default_file_mode(tmp)
    os.replace(tmp, d / ADAPTER_WEIGHTS)
    (d / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return str(d)


def _infer_config(model: nn.Module) -> dict:
    mods = list(_lora_modules(model))
    r, alpha = mods[0][1].r, mods[0][1].alpha
    return {"r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in mods})}


def load_lora(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load adapters saved by :func:`save_lora` (or PEFT). Applies LoRA from ``adapter_config.json`` first when the
    model has none. Every adapter tensor must match a module of the model and vice versa (strict)."""
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"LoRA adapter file missing: {p}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if not has_lora(model):
        apply_lora(model, r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0)),
                   target_modules=cfg.get("target_modules"))
    raw = load_file(str(w_path))
    state = {}
    for k, v in raw.items():
        key = k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k
        key = key.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight",
                                                                              ".lora_B.weight")
        state[key] = v
    mods = dict(_lora_modules(model))
    expected = {f"{n}.lora_{ab}.weight" for n in mods for ab in "AB"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{w_path}: adapter keys do not match the model: missing {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' …' if len(unexpected) > 5 else ''}")
    merged = [m for m in mods.values() if m.merged]
    for m in merged:
        m.unmerge()
    with torch.no_grad():
        for key, v in state.items():
            name, ab = key.rsplit(".lora_", 1)
            param = getattr(mods[name], "lora_" + ab[0]).weight
            if param.shape != v.shape:
                raise ValueError(f"{w_path}: {key} has shape {tuple(v.shape)}, the model expects {tuple(param.shape)}")
            param.copy_(v.to(param.dtype))
    for m in merged:
        m.merge()
    return model
