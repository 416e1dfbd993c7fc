"""Heads read at the last real token of a sequence: the reward model's scalar head and the sequence classifier.

Both pool the final-normed hidden state of the last non-padding token (left or right padding), as `transformers`'
``*ForSequenceClassification`` models do, and apply a linear map: :class:`LastTokenHead`. A reward model
(:mod:`.reward`) is a one-output head with a bias; :class:`SequenceClassifier` is ``num_labels`` outputs without one,
whose state dict maps 1:1 onto a transformers ``Qwen2ForSequenceClassification`` / ``LlamaForSequenceClassification``
/ ``Qwen3ForSequenceClassification`` folder (``model.*`` + ``score.weight``):

- :meth:`SequenceClassifier.save_pretrained` writes such a folder: ``config.json`` with ``architectures``,
  ``num_labels``, ``id2label``/``label2id`` and ``pad_token_id`` (transformers pools at the rightmost token that is not
  ``pad_token_id``; that is our last real token whenever the text does not itself end in the pad token);
- :meth:`SequenceClassifier.from_pretrained` loads it (and `transformers.AutoModelForSequenceClassification` loads
  it too, with equal logits — tested).

A classifier has no language-model head: its backbone is built without one (a classifier never projects onto the
vocabulary), so the untied ``lm_head`` of a language-model folder it starts from is skipped.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data.collate import pad_with_mask
from .config import ModelConfig
from .llm import LlmModel

__all__ = ["last_token_index", "last_token_states", "LastTokenHead", "SequenceClassifier", "is_classifier_folder",
           "CLASSIFIER_SUFFIX"]

CLASSIFIER_SUFFIX = "ForSequenceClassification"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token of each row (left or right padding): ``[B]``."""
    L = attention_mask.shape[-1]
    pos = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=-1).values.clamp(min=0)


def last_token_states(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H]``: each row's hidden state at its last real token (no mask: the last position)."""
    if attention_mask is None:
        idx = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device, dtype=torch.long)
    else:
        idx = last_token_index(attention_mask)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


class LastTokenHead(nn.Linear):
    """``Linear(hidden, outputs)`` for the hidden state of each row's last real token: ``head(x)`` is the plain
    linear map, ``head.read(hidden [B, S, H], attention_mask [B, S] | None)`` → ``[B, outputs]`` pools first.
    Initialised ``normal(0, std)`` (default ``1/sqrt(hidden + 1)``) with a zero bias."""

    def __init__(self, hidden_size: int, outputs: int, *, bias: bool, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, init_std: float | None = None):
        super().__init__(hidden_size, outputs, bias=bias, dtype=dtype, device=device)
        std = init_std if init_std is not None else 1.0 / (hidden_size + 1) ** 0.5
        with torch.no_grad():
            nn.init.normal_(self.weight, std=std)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def read(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self(last_token_states(hidden, attention_mask))


def head_kwargs(backbone: nn.Module) -> dict[str, Any]:
    """dtype/device of a new head next to ``backbone`` (left to the construction context on the meta device)."""
    w = next(backbone.parameters())
    return {"dtype": w.dtype, "device": w.device if w.device.type != "meta" else None}


def is_classifier_folder(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` holds a ``*ForSequenceClassification`` ``config.json`` (our export or a transformers one)."""
    if path is None or not (Path(path) / "config.json").is_file():
        return False
    archs = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    return any(str(a).endswith(CLASSIFIER_SUFFIX) for a in archs)


class _HFView(nn.Module):
    """The HF parameter names of a classifier (``model.*`` [+ ``score.weight``]) over its own modules, so the strict,
    ZeRO-3-aware :func:`~.hf.load_hf_state_dict` fills them; tied config: a folder's ``lm_head.weight`` is skipped."""

    def __init__(self, classifier: "SequenceClassifier", with_head: bool):
        super().__init__()
        self.model = classifier.backbone.model
        if with_head:
            self.score = classifier.score
        self.config = classifier.backbone.config


class SequenceClassifier(nn.Module):
    """``backbone`` (an :class:`LlmModel` without LM head) + ``score`` (:class:`LastTokenHead`, ``num_labels``
    outputs, no bias) read at the last real token.

    ``forward(input_ids, attention_mask=None, **kw)`` → logits ``[B, num_labels]`` (float32). ``label_names``: one
    name per class (None → ``LABEL_<i>``, transformers' default). Parameter names: ``backbone.model.*``,
    ``score.weight``."""

    def __init__(self, config: ModelConfig, num_labels: int, label_names: Sequence[str] | None = None,
                 head_init_std: float | None = None):
        super().__init__()
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        if label_names is not None and len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label names for num_labels={num_labels}")
        self.config = config
        self.num_labels = num_labels
        self.label_names = [str(n) for n in label_names] if label_names is not None \
            else [f"LABEL_{i}" for i in range(num_labels)]
        # no LM head: a tied backbone has none to build, and its embedding is never used as a projection
        self.backbone = LlmModel(dataclasses.replace(config, tie_word_embeddings=True))
        self.score = LastTokenHead(config.hidden_size, num_labels, bias=False, init_std=head_init_std,
                                   **head_kwargs(self.backbone))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            return_hidden_states=True, **kwargs)
        self._aux_loss = out.aux_loss
        return self.score.read(out.hidden_states, attention_mask).float()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (PaLM appendix B) without the vocabulary projection (read once per sequence)."""
        return self.backbone.flops_per_token(seq_len) - 6.0 * self.config.vocab_size * self.config.hidden_size

    def set_gradient_checkpointing(self, enabled: bool = True, layers=None) -> None:
        self.backbone.set_gradient_checkpointing(enabled, layers)

    # ------------------------------------------------------------------------------------------------ trainable
    def freeze_backbone(self, trainable_blocks: int = 0) -> None:
        """Freeze the backbone except its last ``trainable_blocks`` decoder blocks (and the final norm when any
        block trains); the head stays trainable."""
        layers = self.backbone.model.layers
        if not 0 <= trainable_blocks <= len(layers):
            raise ValueError(f"trainable_blocks={trainable_blocks} must be in [0, {len(layers)}] (the model has "
                             f"{len(layers)} decoder blocks)")
        self.backbone.requires_grad_(False)
        if trainable_blocks:
            for layer in layers[len(layers) - trainable_blocks:]:
                layer.requires_grad_(True)
            self.backbone.model.norm.requires_grad_(True)

    # --------------------------------------------------------------------------------------------------- weights
    def load_backbone(self, path: str | os.PathLike) -> None:
        """Load a language-model folder into the backbone (its ``lm_head`` is skipped). Strict otherwise; ZeRO-3
        aware (every rank calls it)."""
        from .hf import load_hf_state_dict
        load_hf_state_dict(_HFView(self, with_head=False), path)

    def load_classifier(self, path: str | os.PathLike) -> None:
        """Load a ``*ForSequenceClassification`` folder (backbone and ``score.weight``), strictly."""
        from .hf import load_hf_state_dict
        folder = read_classifier_config(path)
        if folder["num_labels"] != self.num_labels:
            raise ValueError(f"{path}: a classifier with num_labels={folder['num_labels']}, but this one has "
                             f"{self.num_labels}")
        load_hf_state_dict(_HFView(self, with_head=True), path)

    def hf_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The transformers names of ``state_dict`` (default: this model's): ``model.*`` and ``score.weight``."""
        sd = self.state_dict() if state_dict is None else state_dict
        out = {}
        for k, v in sd.items():
            if k.startswith("backbone.model."):
                out[k[len("backbone."):]] = v
            elif k == "score.weight":
                out[k] = v
            elif not k.startswith("backbone.lm_head."):
                raise KeyError(f"unexpected classifier tensor {k!r}")
        return out

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                        pad_token_id: int | None = None) -> Path:
        """A transformers ``*ForSequenceClassification`` folder (see the module docstring). ``pad_token_id``: the
        id the batches are padded with (default: the model config's)."""
        from .hf import save_pretrained
        path = Path(path)
        with torch.device("meta"):
            target = LlmModel(self.config)
        save_pretrained(target, path, state_dict=self.hf_state_dict(state_dict))
        config_file = path / "config.json"
        hf = json.loads(config_file.read_text())
        model_type, causal = self.config.hf_names
        hf.update(architectures=[causal.replace("ForCausalLM", CLASSIFIER_SUFFIX)], num_labels=self.num_labels,
                  id2label={str(i): n for i, n in enumerate(self.label_names)},
                  label2id={n: i for i, n in enumerate(self.label_names)},
                  problem_type="single_label_classification")
        pad = pad_token_id if pad_token_id is not None else self.config.pad_token_id
        if pad is not None:
            hf["pad_token_id"] = int(pad)
        tmp = config_file.with_name(config_file.name + ".tmp")
        tmp.write_text(json.dumps(hf, indent=2))
        os.replace(tmp, config_file)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None) -> "SequenceClassifier":
        """Load a classifier folder (ours or transformers'); eval mode."""
        from .hf import read_config
        info = read_classifier_config(path)
        with torch.device("meta"):
            model = cls(read_config(path), info["num_labels"], info["label_names"])
        model = model.to(dtype or torch.get_default_dtype()).to_empty(device="cpu")
        model.load_classifier(path)
        return model.eval()

    @torch.no_grad()
    def predict(self, sequences: Sequence[Sequence[int]], batch_size: int = 16,
                pad_token_id: int | None = None) -> torch.Tensor:
        """Logits ``[N, num_labels]`` (float32, CPU) of token-id lists, right-padded, ``batch_size`` at a time."""
        pad = pad_token_id if pad_token_id is not None else (self.config.pad_token_id or 0)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = []
        try:
            for start in range(0, len(sequences), batch_size):
                ids, mask = pad_with_mask(sequences[start:start + batch_size], pad)
                out.append(self(ids.to(device), mask.to(device)).cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.num_labels)


def read_classifier_config(path: str | os.PathLike) -> dict[str, Any]:
    """``num_labels`` and ``label_names`` (in id order) of a classifier folder's ``config.json``."""
    if not is_classifier_folder(path):
        raise ValueError(f"{path}: not a sequence-classifier folder (config.json architectures must end in "
                         f"{CLASSIFIER_SUFFIX!r})")
    hf = json.loads((Path(path) / "config.json").read_text())
    id2label = hf.get("id2label") or {}
    n = int(hf.get("num_labels") or len(id2label) or 2)
    names = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]
    return {"num_labels": n, "label_names": names}
