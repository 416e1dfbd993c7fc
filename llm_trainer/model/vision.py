"""A ViT-style vision encoder (SigLIP / CLIP vision tower) written in our own model code.

Parameter names follow the Hugging Face SigLIP vision model (``embeddings.patch_embedding``,
``embeddings.position_embedding``, ``encoder.layers.{i}.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,
mlp.fc1,mlp.fc2}``, ``post_layernorm``), so a ``SiglipVisionModel`` / ``CLIPVisionModel`` safetensors folder
loads by a small key mapping (see :meth:`VisionEncoder.from_pretrained`).

Two styles:

- ``"siglip"``: patch conv with bias, no class token, ``last_hidden_state = post_layernorm(encoder(x))``.
- ``"clip"``: patch conv without bias, a class token in front, ``pre_layernorm`` before the encoder, and
  ``last_hidden_state = encoder(x)`` (CLIP applies ``post_layernorm`` only to the pooled class token).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VisionConfig", "VisionEncoder", "VisionOutput"]

_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "quick_gelu")
_STYLES = ("siglip", "clip")
# Normalisation constants of the published checkpoints; DefaultPixelValuesProvider reads them from the config.
_SIGLIP_MEAN = (0.5, 0.5, 0.5)
_SIGLIP_STD = (0.5, 0.5, 0.5)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(kw_only=True)
class VisionConfig:
    """Size and style of the vision encoder. Every default constructs (a tiny SigLIP-style tower)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_channels: int = 3
    image_size: int = 32
    patch_size: int = 8
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    attention_dropout: float = 0.0
    style: str = "siglip"
    # Normalisation the encoder was trained with; None -> the style's published default.
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_channels", "image_size", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"VisionConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"VisionConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig.image_size ({self.image_size}) must be divisible by "
                             f"patch_size ({self.patch_size})")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"VisionConfig.hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}")
        if self.style not in _STYLES:
            raise ValueError(f"VisionConfig.style must be one of {_STYLES}, got {self.style!r}")
        if not (self.layer_norm_eps > 0):
            raise ValueError(f"VisionConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not (0.0 <= self.attention_dropout < 1.0):
            raise ValueError(f"VisionConfig.attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        if self.image_mean is None:
            self.image_mean = _SIGLIP_MEAN if self.style == "siglip" else _CLIP_MEAN
        if self.image_std is None:
            self.image_std = _SIGLIP_STD if self.style == "siglip" else _CLIP_STD
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != self.num_channels:
                raise ValueError(f"VisionConfig.{name} needs {self.num_channels} values, got {getattr(self, name)}")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"VisionConfig.image_std must be positive, got {self.image_std}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VisionConfig fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        """Build from a Hugging Face ``config.json``: a ``siglip_vision_model`` / ``clip_vision_model`` config, or
        a full ``siglip`` / ``clip`` config (its ``vision_config`` is used)."""
        model_type = d.get("model_type")
        if model_type in ("siglip", "clip", "siglip2") or ("vision_config" in d and model_type not in
                                                          ("siglip_vision_model", "clip_vision_model")):
            if not isinstance(d.get("vision_config"), dict):
                raise ValueError(f"config of model_type {model_type!r} has no vision_config")
            inner = dict(d["vision_config"])
            inner.setdefault("model_type", "clip_vision_model" if model_type == "clip" else "siglip_vision_model")
            return cls.from_hf_dict(inner)
        if model_type == "siglip_vision_model":
            style, defaults = "siglip", dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
        elif model_type == "clip_vision_model":
            style, defaults = "clip", dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)
        else:
            raise ValueError(f"unsupported vision model_type {model_type!r}; expected 'siglip_vision_model', "
                             "'clip_vision_model', or a 'siglip'/'clip' config with a vision_config")
        # transformers' own defaults (base-size towers) for fields a config.json may omit.
        hf = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  num_channels=3, image_size=224, patch_size=16 if style == "siglip" else 32,
                  attention_dropout=0.0, **defaults)
        hf.update({k: d[k] for k in hf if k in d})
        image_size, patch_size = hf["image_size"], hf["patch_size"]
        for name, value in (("image_size", image_size), ("patch_size", patch_size)):
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ValueError(f"non-square {name} {value} is not supported")
                hf[name] = int(value[0])
        if hf["hidden_act"] == "gelu_new":
            hf["hidden_act"] = "gelu_pytorch_tanh"
        return cls(style=style, **hf)


def _activation(name: str):
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    return lambda x: x * torch.sigmoid(1.702 * x)  # quick_gelu


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=config.style == "siglip")
        self.has_class_token = config.style == "clip"
        if self.has_class_token:
            self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.num_positions = config.num_patches + int(self.has_class_token)
        self.position_embedding = nn.Embedding(self.num_positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, D, h, w]
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, D], row-major over the patch grid
        if self.has_class_token:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        return x + self.position_embedding.weight.to(x.dtype).unsqueeze(0)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.dropout = config.attention_dropout
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape

        def heads(p: nn.Linear) -> torch.Tensor:
            return p(x).view(n, t, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformerEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))


class VisionEncoder(nn.Module):
    """``forward(pixel_values [N, C, H, W]) -> VisionOutput(last_hidden_state [N, T, D])`` with ``T`` = number of
    patches (+1 class token for CLIP). :meth:`patch_features` gives the patch tokens only, for a projector."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        if config.style == "clip":
            self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = VisionTransformerEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                nn.init.normal_(module.weight, std=1.0 / math.sqrt(fan_in))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=std)
        if self.embeddings.has_class_token:
            nn.init.normal_(self.embeddings.class_embedding, std=std)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = bool(enabled)

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must have shape [N, {expected[0]}, {expected[1]}, {expected[2]}] for "
                             f"this vision encoder, got {list(pixel_values.shape)}")

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> VisionOutput:
        self._check_pixels(pixel_values)
        x = self.embeddings(pixel_values)
        if self.config.style == "clip":
            x = self.pre_layernorm(x)
        hidden_states = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if hidden_states is not None:
                hidden_states.append(x)
        if self.config.style == "siglip":
            x = self.post_layernorm(x)
        return VisionOutput(last_hidden_state=x, hidden_states=tuple(hidden_states) if hidden_states else None)

    def patch_features(self, pixel_values: torch.Tensor, feature_layer: int = -1) -> torch.Tensor:
        """Patch tokens ``[N, num_patches, D]`` (class token dropped), row-major over the patch grid.

        ``feature_layer=-1`` uses ``last_hidden_state``; another index picks ``hidden_states[feature_layer]``
        (0 = embeddings, i = output of block i, negative counts from the end), as LLaVA-style models do."""
        if feature_layer == -1:
            x = self.forward(pixel_values).last_hidden_state
        else:
            x = self.forward(pixel_values, output_hidden_states=True).hidden_states[feature_layer]
        return x[:, 1:] if self.embeddings.has_class_token else x

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        strict: bool = True) -> "VisionEncoder":
        """Load a SigLIP/CLIP vision tower from a local folder with ``config.json`` and ``model.safetensors``
        (or a sharded ``model.safetensors.index.json``). Accepts Hugging Face ``SiglipVisionModel`` /
        ``CLIPVisionModel`` / full ``SiglipModel`` / ``CLIPModel`` folders and folders written by
        :meth:`save_pretrained`. Text towers and the SigLIP attention-pooling head are ignored."""
        path = os.fspath(path)
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"no config.json in vision encoder folder {path!r}")
        with open(cfg_file) as f:
            raw = json.load(f)
        if raw.get("model_type") == "llm_trainer_vision":
            config = VisionConfig.from_dict(raw["vision_config"])
        else:
            config = VisionConfig.from_hf_dict(raw)
        model = cls(config)
        state = read_safetensors_folder(path)
        model.load_hf_state_dict(state, strict=strict, source=path)
        if dtype is not None:
            model.to(dtype)
        return model

    def save_pretrained(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        from .hf import set_default_file_mode

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "llm_trainer_vision", "vision_config": self.config.to_dict()}, f, indent=2)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  os.path.join(path, "model.safetensors"))
        set_default_file_mode(os.path.join(path, "model.safetensors"))

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, source: str = "") -> None:
        """Copy a SigLIP/CLIP-vision state dict (any of the usual prefixes) into this encoder; raises naming
        missing, unexpected (if strict) and shape-mismatched keys."""
        mapped = map_vision_state_dict(state)
        own = self.state_dict()
        where = f" in {source!r}" if source else ""
        missing = sorted(k for k in own if k not in mapped)
        unexpected = sorted(k for k in mapped if k not in own)
        mismatched = [f"{k}: checkpoint {list(mapped[k].shape)} vs model {list(own[k].shape)}"
                      for k in own if k in mapped and mapped[k].shape != own[k].shape]
        problems = []
        if missing:
            problems.append(f"missing keys: {missing}")
        if mismatched:
            problems.append(f"shape mismatches: {mismatched}")
        if unexpected and strict:
            problems.append(f"unexpected keys: {unexpected}")
        if problems:
            raise ValueError(f"cannot load vision encoder weights{where}: " + "; ".join(problems))
        with torch.no_grad():
            for k, t in own.items():
                t.copy_(mapped[k].to(t.dtype))


_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_model.",
             "vision_model.", "model.vision_tower.", "vision_tower.", "")
# Parts of a SigLIP/CLIP checkpoint that are not the vision tower we build.
_IGNORED_PREFIXES = ("head.",)
_RENAMES = {"pre_layrnorm.": "pre_layernorm."}  # CLIP's historical spelling


def map_vision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the vision-tower prefix, drop the text tower / pooling head, rename CLIP's ``pre_layrnorm``."""
    prefix = next((p for p in _PREFIXES if p + "embeddings.patch_embedding.weight" in state), None)
    if prefix is None:
        raise ValueError("no vision tower found in the checkpoint: expected a key ending in "
                         "'embeddings.patch_embedding.weight' (optionally under 'vision_model.' or "
                         f"'vision_tower.'); first keys: {sorted(state)[:8]}")
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if prefix == "" and (k.startswith("text_model.") or k.startswith("logit_")):
            continue
        if k.startswith(_IGNORED_PREFIXES) or k.endswith("position_ids"):
            continue
        for old, new in _RENAMES.items():
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = value
    return out


def read_safetensors_folder(path: str) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")
