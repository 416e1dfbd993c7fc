"""Vision-language model: our `LlmModel` + a ViT `VisionEncoder` + a projector into the LLM's embedding space.

Text carries one ``<image>`` placeholder per image; :func:`expand_image_tokens` turns each into
``tokens_per_image`` copies of ``image_token_id``. In :meth:`VlmModel.forward` the embeddings at those positions
are replaced by the projected image features: image ``j`` of a batch fills the ``j``-th run of image tokens, in
reading order (sample by sample, left to right), so several images per sample just work.

Projector: vision patch features ``[N, P, D]`` → patch grid ``[N, D, g, g]`` → adaptive average pooling to
``[N, D, s, s]`` (``s² = tokens_per_image``) → ``[N, s², D]`` → (LayerNorm) → Linear(D→P) → GELU → Linear(P→H).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .vision import VisionConfig, VisionEncoder

__all__ = ["VLMConfig", "VlmModel", "MultiModalProjector", "expand_image_tokens", "expand_image_tokens_and_labels",
           "count_images"]

VLM_MODEL_TYPE = "llm_trainer_vlm"
_VLM_FIELDS = ("image_token_id", "tokens_per_image", "projector_type", "projector_hidden_size", "projector_norm",
               "vision_feature_layer")
PROJECTOR_TYPES = ("mlp", "linear")


@dataclass(kw_only=True)
class VLMConfig(ModelConfig):
    """`ModelConfig` fields for the language model, plus the vision tower and projector.

    ``image_token_id`` is required: the id of the (expanded) image token, inside the LLM vocabulary.
    """

    vision_config: VisionConfig | None = None  # None -> VisionConfig() (a tiny SigLIP-style tower)
    image_token_id: int
    tokens_per_image: int = 16  # a perfect square s*s with s <= patches per side
    projector_type: str = "mlp"  # 'mlp' (Linear-GELU-Linear) | 'linear'
    projector_hidden_size: int | None = None  # None -> LLM hidden_size
    projector_norm: bool = True  # LayerNorm on the pooled vision features before the projector
    vision_feature_layer: int = -1  # -1: encoder output; else hidden_states[i] (0 = embeddings)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vision_config is None:
            self.vision_config = VisionConfig()
        elif isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        if not isinstance(self.vision_config, VisionConfig):
            raise ValueError(f"VLMConfig.vision_config must be a VisionConfig, got {type(self.vision_config).__name__}")
        if isinstance(self.image_token_id, bool) or not isinstance(self.image_token_id, int) or \
                not 0 <= self.image_token_id < self.vocab_size:
            raise ValueError(f"VLMConfig.image_token_id ({self.image_token_id!r}) must be an int in "
                             f"[0, vocab_size={self.vocab_size})")
        for name in ("pad_token_id", "bos_token_id"):
            if getattr(self, name) == self.image_token_id:
                raise ValueError(f"VLMConfig.image_token_id ({self.image_token_id}) must differ from {name}")
        t = self.tokens_per_image
        if isinstance(t, bool) or not isinstance(t, int) or t <= 0 or math.isqrt(t) ** 2 != t:
            raise ValueError(f"VLMConfig.tokens_per_image must be a positive perfect square, got {t!r}")
        g = self.vision_config.patches_per_side
        if math.isqrt(t) > g:
            raise ValueError(f"VLMConfig.tokens_per_image ({t}) needs a {math.isqrt(t)}x{math.isqrt(t)} grid, but "
                             f"the vision encoder has only {g}x{g} patches (image_size / patch_size)")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"VLMConfig.projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if self.projector_hidden_size is not None and (not isinstance(self.projector_hidden_size, int)
                                                       or self.projector_hidden_size <= 0):
            raise ValueError(f"VLMConfig.projector_hidden_size must be a positive int or None, "
                             f"got {self.projector_hidden_size!r}")
        n = self.vision_config.num_hidden_layers
        if not -(n + 1) <= self.vision_feature_layer <= n:
            raise ValueError(f"VLMConfig.vision_feature_layer ({self.vision_feature_layer}) out of range for "
                             f"{n} vision layers ([-{n + 1}, {n}])")

    def llm_config(self) -> ModelConfig:
        """The plain `ModelConfig` of the language model."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})

    def vlm_fields(self) -> dict[str, Any]:
        """The VLM-only scalar fields (not the LLM's, not vision_config)."""
        return {k: getattr(self, k) for k in _VLM_FIELDS}

    @classmethod
    def from_llm_config(cls, llm: ModelConfig, **kwargs) -> "VLMConfig":
        """Wrap an existing `ModelConfig` with the VLM fields in ``kwargs``."""
        return cls(**{f.name: getattr(llm, f.name) for f in fields(ModelConfig)}, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """``config.json`` content of a saved `VlmModel`."""
        return {"architectures": ["LlmTrainerVlmModel"], "model_type": VLM_MODEL_TYPE,
                "text_config": self.llm_config().to_hf_dict(), "vision_config": self.vision_config.to_dict(),
                **self.vlm_fields()}

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike) -> "VLMConfig":
        """The config of a saved `VlmModel` folder (its ``config.json``)."""
        cfg_file = os.path.join(os.fspath(path), "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"no config.json in VLM folder {os.fspath(path)!r}")
        with open(cfg_file) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VLMConfig":
        if d.get("model_type") != VLM_MODEL_TYPE:
            raise ValueError(f"not a VLM config: model_type={d.get('model_type')!r} (expected {VLM_MODEL_TYPE!r})")
        kwargs = {k: d[k] for k in _VLM_FIELDS if k in d}
        return cls.from_llm_config(ModelConfig.from_hf_dict(d["text_config"]),
                                   vision_config=VisionConfig.from_dict(d["vision_config"]), **kwargs)


# ---------------------------------------------------------------------------------------------------- token helpers

def _as_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"expected a 1-D id tensor, got shape {list(ids.shape)}")
        return ids.tolist()
    return list(ids)


def expand_image_tokens(ids, image_token_id: int, tokens_per_image: int, placeholder_id: int | None = None):
    """Replace every placeholder (default: ``image_token_id``) by ``tokens_per_image`` copies of ``image_token_id``.

    Accepts a list of ints or a 1-D tensor and returns the same kind. Run it once per sample, before padding or
    truncation; expanding an already-expanded sequence expands again."""
    placeholder = image_token_id if placeholder_id is None else placeholder_id
    out: list[int] = []
    for t in _as_list(ids):
        if t == placeholder:
            out.extend([image_token_id] * tokens_per_image)
        else:
            out.append(t)
    if isinstance(ids, torch.Tensor):
        return torch.tensor(out, dtype=ids.dtype, device=ids.device)
    return out


def expand_image_tokens_and_labels(ids, labels, image_token_id: int, tokens_per_image: int,
                                   placeholder_id: int | None = None, ignore_index: int = -100):
    """:func:`expand_image_tokens` for ``ids`` with aligned ``labels``; image-token labels are ``ignore_index``."""
    id_list, label_list = _as_list(ids), _as_list(labels)
    if len(id_list) != len(label_list):
        raise ValueError(f"ids ({len(id_list)}) and labels ({len(label_list)}) differ in length")
    placeholder = image_token_id if placeholder_id is None else placeholder_id
    out_ids: list[int] = []
    out_labels: list[int] = []
    for t, lab in zip(id_list, label_list):
        if t == placeholder:
            out_ids.extend([image_token_id] * tokens_per_image)
            out_labels.extend([ignore_index] * tokens_per_image)
        else:
            out_ids.append(t)
            out_labels.append(ignore_index if t == image_token_id else lab)
    if isinstance(ids, torch.Tensor):
        return (torch.tensor(out_ids, dtype=ids.dtype, device=ids.device),
                torch.tensor(out_labels, dtype=labels.dtype if isinstance(labels, torch.Tensor) else ids.dtype,
                             device=ids.device))
    return out_ids, out_labels


def count_images(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int) -> list[int]:
    """Images per row of ``input_ids [B, S]`` (expanded tokens); raises if a row holds a partial image."""
    per_row = (input_ids == image_token_id).sum(dim=-1).tolist()
    for b, n in enumerate(per_row):
        if n % tokens_per_image:
            raise ValueError(f"sample {b} has {n} image tokens, not a multiple of tokens_per_image="
                             f"{tokens_per_image} (truncated image, or <image> not expanded?)")
    return [n // tokens_per_image for n in per_row]


# ---------------------------------------------------------------------------------------------------- modules

class MultiModalProjector(nn.Module):
    def __init__(self, config: VLMConfig):
        super().__init__()
        vis, hid = config.vision_config.hidden_size, config.hidden_size
        self.grid = config.vision_config.patches_per_side
        self.side = math.isqrt(config.tokens_per_image)
        self.norm = nn.LayerNorm(vis, eps=config.vision_config.layer_norm_eps) if config.projector_norm else None
        if config.projector_type == "linear":
            self.linear_1 = nn.Linear(vis, hid)
            self.linear_2 = None
        else:
            mid = config.projector_hidden_size or hid
            self.linear_1 = nn.Linear(vis, mid)
            self.linear_2 = nn.Linear(mid, hid)

    def pool(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, g*g, D]`` → ``[N, s*s, D]`` by adaptive average pooling over the patch grid."""
        n, p, d = patches.shape
        if p != self.grid * self.grid:
            raise ValueError(f"projector expects {self.grid}x{self.grid}={self.grid ** 2} patch tokens, got {p}")
        if self.side == self.grid:
            return patches
        x = patches.transpose(1, 2).reshape(n, d, self.grid, self.grid)
        x = F.adaptive_avg_pool2d(x, self.side)
        return x.flatten(2).transpose(1, 2)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.pool(patches)
        if self.norm is not None:
            x = self.norm(x)
        x = self.linear_1(x)
        if self.linear_2 is not None:
            x = self.linear_2(F.gelu(x))
        return x


def _llm_cls():
    from .llm import LlmModel  # imported lazily: llm.py is owned by the LLM part and may be heavier

    return LlmModel


class VlmModel(nn.Module):
    """``VlmModel(config: VLMConfig)``: ``.llm`` (`LlmModel`), ``.vision_model`` (`VisionEncoder`),
    ``.projector`` (`MultiModalProjector`). Same forward contract as `LlmModel` plus ``pixel_values`` and
    ``image_counts``."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        if not isinstance(config, VLMConfig):
            raise TypeError(f"VlmModel needs a VLMConfig, got {type(config).__name__}")
        self.config = config
        self.llm = _llm_cls()(config.llm_config())
        self.vision_model = VisionEncoder(config.vision_config)
        self.projector = MultiModalProjector(config)

    # ------------------------------------------------------------------ delegation to the LLM
    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def lm_head_weight(self) -> torch.Tensor:
        return self.llm.lm_head_weight()

    def set_gradient_checkpointing(self, enabled: bool = True, layers=None) -> None:
        """Checkpoint the LLM's ``layers`` (all when None) and every vision block."""
        self.llm.set_gradient_checkpointing(enabled, layers=layers)
        self.vision_model.set_gradient_checkpointing(enabled)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, seq_len: int) -> float:
        """The language model's FLOPs per token (the vision tower runs once per image, not per token)."""
        return self.llm.flops_per_token(seq_len)

    # ------------------------------------------------------------------ freezing
    def freeze(self, llm: bool | None = None, vision: bool | None = None, projector: bool | None = None) -> None:
        """``True`` freezes (``requires_grad=False``), ``False`` unfreezes, ``None`` leaves a part as it is.
        ``model.freeze(llm=True, vision=True)`` trains only the projector."""
        for part, flag in ((self.llm, llm), (self.vision_model, vision), (self.projector, projector)):
            if flag is not None:
                for p in part.parameters():
                    p.requires_grad_(not flag)

    # ------------------------------------------------------------------ images → embeddings
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` → projected image tokens ``[N, tokens_per_image, hidden_size]``."""
        patches = self.vision_model.patch_features(pixel_values, feature_layer=self.config.vision_feature_layer)
        return self.projector(patches)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_counts: Sequence[int] | torch.Tensor | None = None,
              has_past: bool = False) -> torch.Tensor:
        """Token embeddings ``[B, S, H]`` with image-token positions replaced by image features.

        ``pixel_values [N, 3, H, W]`` holds the batch's images sample by sample; ``image_counts [B]`` (optional)
        says how many belong to each sample and is checked against the image tokens of each row."""
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {list(input_ids.shape)}")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                bad = hi if hi >= cfg.vocab_size else lo
                raise ValueError(f"token id {bad} is out of range for vocab_size {cfg.vocab_size}")
        embeds = self.get_input_embeddings()(input_ids)
        is_image = input_ids == cfg.image_token_id
        n_tokens = is_image.sum(dim=-1).tolist()
        if pixel_values is None:
            if image_counts is not None and any(int(c) for c in image_counts):
                raise ValueError(f"image_counts {list(map(int, image_counts))} given but pixel_values is None")
            if any(n_tokens) and not has_past:
                b = next(i for i, n in enumerate(n_tokens) if n)
                raise ValueError(f"sample {b} has {n_tokens[b]} image tokens (id {cfg.image_token_id}) but no "
                                 "pixel_values were given")
            return embeds  # decoding after an image prefill: image ids (if any) are plain tokens
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [N, 3, H, W], got shape {list(pixel_values.shape)}")
        n_images = pixel_values.shape[0]
        tpi = cfg.tokens_per_image
        if image_counts is not None:
            counts = [int(c) for c in (image_counts.tolist() if isinstance(image_counts, torch.Tensor)
                                       else image_counts)]
            if len(counts) != len(n_tokens):
                raise ValueError(f"image_counts has {len(counts)} entries for a batch of {len(n_tokens)}")
            for b, (c, n) in enumerate(zip(counts, n_tokens)):
                if c * tpi != n:
                    raise ValueError(f"sample {b}: image_counts says {c} image(s) = {c * tpi} image tokens, but "
                                     f"the text has {n} image tokens (id {cfg.image_token_id}, "
                                     f"{tpi} per image)")
            if sum(counts) != n_images:
                raise ValueError(f"image_counts {counts} sum to {sum(counts)} but pixel_values has {n_images} images")
        else:
            for b, n in enumerate(n_tokens):
                if n % tpi:
                    raise ValueError(f"sample {b} has {n} image tokens, not a multiple of tokens_per_image={tpi} "
                                     "(truncated image, or <image> not expanded?)")
            counts = [n // tpi for n in n_tokens]
            if sum(counts) != n_images:
                raise ValueError(f"the text has {sum(counts)} image(s) (per sample {counts}, {tpi} tokens each) but "
                                 f"pixel_values has {n_images} images")
        if n_images == 0:
            return embeds
        feats = self.image_features(pixel_values.to(self.vision_model.embeddings.patch_embedding.weight.dtype))
        feats = feats.to(embeds.dtype).reshape(-1, embeds.shape[-1])
        return embeds.masked_scatter(is_image.unsqueeze(-1), feats)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_counts: Sequence[int] | torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                inputs_embeds: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                return_hidden_states: bool = False):
        """`LlmModel.forward` with images. ``pixel_values`` (and ``image_counts``) go with ``input_ids`` that
        contain the expanded image tokens; decode steps after a prefill pass only new ids and no images."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("VlmModel.forward needs input_ids (or inputs_embeds)")
            has_past = past_key_values is not None and past_key_values.get_seq_length() > 0
            inputs_embeds = self.embed(input_ids, pixel_values, image_counts, has_past=has_past)
        elif pixel_values is not None:
            raise ValueError("pass either inputs_embeds or input_ids with pixel_values, not both")
        return self.llm(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                        use_cache=use_cache, inputs_embeds=inputs_embeds, document_ids=document_ids,
                        return_hidden_states=return_hidden_states)

    # ------------------------------------------------------------------ saving / loading
    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str | None = None) -> None:
        """``config.json`` (VLMConfig) + ``model.safetensors`` (all weights; tied tensors stored once).
        ``max_shard_size`` is accepted for `LlmModel` compatibility; VLM weights are written as one file."""
        from safetensors.torch import save_model

        from .hf import set_default_file_mode

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        tmp = os.path.join(path, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        os.replace(tmp, os.path.join(path, "config.json"))
        save_model(self, os.path.join(path, "model.safetensors"))
        set_default_file_mode(os.path.join(path, "model.safetensors"))

    def load_pretrained_weights(self, path: str | os.PathLike) -> None:
        """Load ``model.safetensors`` of a saved VLM folder into this model, strictly (shapes and names)."""
        from safetensors.torch import load_file

        path = os.fspath(path)
        model = self
        weights = os.path.join(path, "model.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"no model.safetensors in VLM folder {path!r}")
        state = load_file(weights)
        own = model.state_dict()
        # Tied parameters are stored once; any name of a shared tensor may be the one kept.
        groups: dict[Any, list[str]] = {}
        for name, t in own.items():
            key = (t.data_ptr(), tuple(t.shape), t.stride()) if t.numel() else name
            groups.setdefault(key, []).append(name)
        missing = [names[0] for names in groups.values() if not any(n in state for n in names)]
        unexpected = sorted(k for k in state if k not in own)
        mismatched = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
                      for k in state if k in own and state[k].shape != own[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError(f"cannot load VLM weights from {path!r}: missing keys: {sorted(missing)}; "
                             f"unexpected keys: {unexpected}; shape mismatches: {mismatched}")
        with torch.no_grad():
            for names in groups.values():
                src = next(state[n] for n in names if n in state)
                for n in names:
                    own[n].copy_(src.to(own[n].dtype))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None) -> "VlmModel":
        model = cls(VLMConfig.from_pretrained_dir(path))
        model.load_pretrained_weights(path)
        if dtype is not None:
            model.to(dtype)
        return model

    @classmethod
    def from_pretrained_parts(cls, llm_path: str | os.PathLike, vision_path: str | os.PathLike,
                              image_token_id: int, **vlm_kwargs) -> "VlmModel":
        """A new VLM from a pretrained LLM folder (`LlmModel.from_pretrained`) and a SigLIP/CLIP vision folder
        (`VisionEncoder.from_pretrained`); the projector is freshly initialised."""
        llm = _llm_cls().from_pretrained(llm_path)
        vision = VisionEncoder.from_pretrained(vision_path)
        config = VLMConfig.from_llm_config(llm.config, vision_config=vision.config, image_token_id=image_token_id,
                                           **vlm_kwargs)
        model = cls(config)
        model.llm.load_state_dict(llm.state_dict())
        model.vision_model.load_state_dict(vision.state_dict())
        return model
