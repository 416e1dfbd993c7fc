"""`RewardModel`: an `LlmModel` backbone with a scalar head read at the last real token (Ouyang et al. 2022).

A reward-model folder is an HF-format backbone folder plus ``reward_head.safetensors`` and ``reward_config.json``;
``RewardModel.from_pretrained(dir)`` loads it and ``RewardModel.score(prompts_ids, completions_ids)`` scores
completions (a reward source for PPO/GRPO).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data.collate import pad_with_mask
from .config import ModelConfig
from .heads import LastTokenHead, head_kwargs, last_token_index
from .llm import LlmModel

__all__ = ["RewardModel", "last_token_index", "HEAD_FILE", "REWARD_CONFIG_FILE"]

HEAD_FILE = "reward_head.safetensors"
REWARD_CONFIG_FILE = "reward_config.json"


class RewardModel(nn.Module):
    """``backbone`` (an :class:`LlmModel`) + ``score_head`` (a one-output :class:`~.heads.LastTokenHead` with a bias,
    the pooling and head of :class:`~.heads.SequenceClassifier`) read at the last real token.

    ``forward(input_ids, attention_mask=None, **kw)`` → scores ``[B]`` (float32). Parameter names:
    ``backbone.*`` and ``score_head.{weight,bias}``."""

    def __init__(self, backbone: LlmModel | ModelConfig, head_init_std: float | None = None):
        super().__init__()
        if isinstance(backbone, ModelConfig):
            backbone = LlmModel(backbone)
        self.backbone = backbone
        self.config = backbone.config
        self.score_head = LastTokenHead(self.config.hidden_size, 1, bias=True, init_std=head_init_std,
                                        **head_kwargs(backbone))

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            return_hidden_states=True, **kwargs)
        self._aux_loss = out.aux_loss
        return self.score_head.read(out.hidden_states, attention_mask).squeeze(-1).float()

    def flops_per_token(self, seq_len: int) -> float:
        return self.backbone.flops_per_token(seq_len)

    def set_gradient_checkpointing(self, enabled: bool = True, layers=None) -> None:
        self.backbone.set_gradient_checkpointing(enabled, layers)

    # ----------------------------------------------------------------------------------------------- score
    @torch.no_grad()
    def score(self, prompts_ids: Sequence[Sequence[int]], completions_ids: Sequence[Sequence[int]],
              batch_size: int = 16, pad_token_id: int | None = None) -> torch.Tensor:
        """Scalar reward of each ``prompt + completion`` (token-id lists), ``[N]`` float32 on CPU. Runs in eval
        mode, ``batch_size`` sequences per forward, right-padded."""
        if len(prompts_ids) != len(completions_ids):
            raise ValueError(f"score: {len(prompts_ids)} prompts but {len(completions_ids)} completions")
        pad = pad_token_id if pad_token_id is not None else (self.config.pad_token_id or 0)
        seqs = [list(p) + list(c) for p, c in zip(prompts_ids, completions_ids)]
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"score: sequence {i} is empty (empty prompt and completion)")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = []
        try:
            for start in range(0, len(seqs), batch_size):
                ids, mask = pad_with_mask(seqs[start:start + batch_size], pad)
                out.append(self(ids.to(device), mask.to(device)).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def reward_fn(self, batch_size: int = 16):
        """A plain callable ``(prompt_ids, completion_ids, **ignored) -> list[float]`` (reward-function style)."""
        def reward(prompt_ids, completion_ids, **_: Any) -> list[float]:
            return self.score(prompt_ids, completion_ids, batch_size=batch_size).tolist()
        reward.__name__ = "reward_model"
        return reward

    # ------------------------------------------------------------------------------------------- save/load
    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """HF-format backbone folder + ``reward_head.safetensors`` + ``reward_config.json``."""
        from safetensors.torch import save_file

        from .hf import save_pretrained, set_default_file_mode
        path = Path(path)
        sd = self.state_dict() if state_dict is None else state_dict
        backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        head = {k[len("score_head."):]: v.detach().to("cpu").contiguous() for k, v in sd.items()
                if k.startswith("score_head.")}
        save_pretrained(self.backbone, path, state_dict=backbone)
        save_file(head, str(path / HEAD_FILE), metadata={"format": "pt"})
        set_default_file_mode(path / HEAD_FILE)
        (path / REWARD_CONFIG_FILE).write_text(json.dumps({"head": "linear", "num_labels": 1,
                                                           "pooling": "last_token"}, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> "RewardModel":
        """Load what :meth:`save_pretrained` wrote. A plain LM folder (no head file) → ValueError; use
        :meth:`from_backbone` to start a reward model from a language model."""
        from safetensors.torch import load_file
        path = Path(path)
        if not (path / HEAD_FILE).is_file():
            raise ValueError(f"{path}: no {HEAD_FILE}; not a reward model folder (use RewardModel.from_backbone "
                             f"to put a new head on a language model)")
        model = cls(LlmModel.from_pretrained(path, dtype=dtype))
        head = load_file(str(path / HEAD_FILE))
        missing, unexpected = model.score_head.load_state_dict(head, strict=False)
        if missing or unexpected:
            raise KeyError(f"{path / HEAD_FILE}: missing {missing}, unexpected {unexpected}")
        return model.eval()

    @classmethod
    def from_backbone(cls, path: str | Path, dtype: torch.dtype | None = None) -> "RewardModel":
        """A language-model folder with a freshly initialised head."""
        return cls(LlmModel.from_pretrained(path, dtype=dtype))
