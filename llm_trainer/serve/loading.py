"""Open a model folder for serving: a language model (`LlmModel`), a vision-language model (`VlmModel`) or a reward
model (`RewardModel`), with its tokenizer, and turn conversations into prompt ids (and pixel values for images).

Folder kinds: ``reward_head.safetensors`` present → reward model; ``config.json`` with ``model_type ==
"llm_trainer_vlm"`` → VLM; otherwise an HF-format Llama/Qwen folder → language model. The tokenizer is the folder's
``tokenizer.json`` unless another path is given.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["ServedModel", "Prompt", "load_served_model", "folder_kind", "reward_module", "decode_data_url"]


def reward_module():
    """The module defining ``RewardModel`` and its folder layout (``HEAD_FILE``), imported lazily: the one place
    that names it."""
    from ..model import reward

    return reward


def folder_kind(path: str | os.PathLike) -> str:
    """``'reward'``, ``'vlm'`` or ``'llm'`` (see the module docstring); raises naming the folder if it is none."""
    p = Path(path)
    cfg = p / "config.json"
    if not p.is_dir():
        raise FileNotFoundError(f"model folder does not exist: {p}")
    if not cfg.is_file():
        raise FileNotFoundError(f"{p} is not a model folder: no config.json")
    if (p / reward_module().HEAD_FILE).is_file():
        return "reward"
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{cfg}: not a JSON object ({e})") from e
    from ..model.vlm import VLM_MODEL_TYPE

    return "vlm" if model_type == VLM_MODEL_TYPE else "llm"


@dataclass
class Prompt:
    """Prompt token ids (image placeholders expanded) and the pixel values of its images (None without images)."""

    ids: list[int]
    pixel_values: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


@dataclass
class ServedModel:
    """A loaded folder: ``kind`` (``llm``/``vlm``/``reward``), the model in eval mode, its tokenizer, the name
    clients use, and ``max_model_len`` (prompt + completion tokens one sequence may hold)."""

    kind: str
    model: nn.Module
    tokenizer: Any
    name: str
    max_model_len: int
    path: str = ""
    pixels: Callable | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def stop_token_ids(self) -> list[int]:
        """The chat template's end-of-turn token, the tokenizer's eos and the model config's eos (what ends an
        answer)."""
        ids = list(self.tokenizer.stop_token_ids)
        eos = getattr(self.model.config, "eos_token_id", None)
        for t in eos if isinstance(eos, list) else [eos]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)
        return ids

    # ------------------------------------------------------------------------------------------- prompts
    def chat_prompt(self, messages: Sequence[dict], images: Sequence[Any] = (),
                    add_generation_prompt: bool = True) -> Prompt:
        """Render ``messages`` (our format: string content or ``{"type": "text"|"image"}`` parts) with the chat
        template; ``images`` (paths or pillow images) fill the image parts in order."""
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt).input_ids
        return self.with_images(list(ids), images)

    def with_images(self, ids: list[int], images: Sequence[Any]) -> Prompt:
        """Expand the image placeholders of ``ids`` and load ``images`` (one per placeholder)."""
        if self.kind != "vlm":
            if images:
                raise ValueError(f"this model ({self.name}) is a text model; it does not accept images")
            return Prompt(ids)
        from ..model.vlm import expand_image_tokens

        cfg = self.model.config
        n = sum(1 for t in ids if t == cfg.image_token_id)
        if n != len(images):
            raise ValueError(f"the prompt has {n} image placeholder(s) but {len(images)} image(s) were given")
        if not images:
            return Prompt(ids)
        pixel_values = self.pixels(list(images)).to(self.device)
        return Prompt(expand_image_tokens(ids, cfg.image_token_id, cfg.tokens_per_image), pixel_values)

    def check_ids(self, ids: Sequence[int], what: str = "prompt") -> None:
        """Token ids must lie inside the model's vocabulary."""
        V = self.model.config.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                raise ValueError(f"{what}: token {i} is {t!r}, not a token id in [0, {V})")


def decode_data_url(url: str):
    """A ``data:image/...;base64,...`` URL → pillow image (``ValueError`` saying what is wrong)."""
    from PIL import Image

    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise ValueError("an image data URL must look like 'data:image/png;base64,<data>'")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"the image data URL is not valid base64 ({e})") from None
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"the image data URL does not hold a readable image ({type(e).__name__}: {e})") from None
    return img


def load_served_model(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None, device: str = "cpu",
                      dtype: torch.dtype | None = None, max_model_len: int | None = None,
                      name: str | None = None, chat_template: str | None = None) -> ServedModel:
    """Load a model folder (any of the three kinds) and its tokenizer for serving or chatting."""
    from ..tokenizer import Tokenizer

    kind = folder_kind(path)
    tok_path = Path(tokenizer) if tokenizer is not None else Path(path)
    if tok_path.is_dir() and not (tok_path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tok_path}; pass the tokenizer's folder (--tokenizer)")
    tok = Tokenizer(tok_path, chat_template=chat_template)
    pixels = None
    if kind == "reward":
        model = reward_module().RewardModel.from_pretrained(path, dtype=dtype)
    elif kind == "vlm":
        from ..images import DefaultPixelValuesProvider
        from ..model.vlm import VlmModel

        model = VlmModel.from_pretrained(path, dtype=dtype)
        if tok.image_token_id != model.config.image_token_id:
            raise ValueError(f"{path}: the tokenizer's image token {tok.image_token!r} has id {tok.image_token_id}, "
                             f"but the VLM's image_token_id is {model.config.image_token_id}")
        pixels = DefaultPixelValuesProvider.from_vision_config(model.config)
    else:
        from ..model import LlmModel

        model = LlmModel.from_pretrained(path, dtype=dtype)
    model = model.to(device).eval()
    cfg = model.config
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}")
    limit = int(cfg.max_position_embeddings)
    if max_model_len is not None:
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        limit = min(limit, int(max_model_len))
    return ServedModel(kind=kind, model=model, tokenizer=tok, name=name or Path(path).resolve().name,
                       max_model_len=limit, path=str(path), pixels=pixels)
