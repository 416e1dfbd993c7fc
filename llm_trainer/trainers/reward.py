"""Reward models: `RewardModel` (our LlmModel backbone + a scalar head on the last real token) and `RewardTrainer`
(Bradley–Terry pairwise loss, Ouyang et al. 2022 eq. 1, optional margin as in Llama 2, Touvron et al. 2023 eq. 2).

Data: the same preference pairs as DPO (``chosen_input_ids`` / ``rejected_input_ids``; labels are ignored except to
check that each side has a response). Chosen and rejected rows are scored in one forward pass. The loss unit is the
pair; logged: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy``.

A trained reward model is written to ``output_dir/final`` as an HF-format backbone folder plus
``reward_head.safetensors`` and ``reward_config.json``; ``RewardModel.from_pretrained(dir)`` loads it and
``RewardModel.score(prompts_ids, completions_ids)`` scores completions (a reward source for PPO/GRPO).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..configs import RewardConfig
from ..losses import bradley_terry_loss
from ..model import LlmModel, ModelConfig
from .base import BaseTrainer, LossOutput
from .dpo import PairCollate, PairDataset, open_pair_dataset, validate_pairs

__all__ = ["RewardModel", "RewardTrainer", "last_token_index"]

HEAD_FILE = "reward_head.safetensors"
REWARD_CONFIG_FILE = "reward_config.json"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token of each row (left or right padding): ``[B]``."""
    L = attention_mask.shape[-1]
    pos = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=-1).values.clamp(min=0)


class RewardModel(nn.Module):
    """``backbone`` (an :class:`LlmModel`) + ``score_head`` ``Linear(hidden, 1)`` read at the last real token.

    ``forward(input_ids, attention_mask=None, **kw)`` → scores ``[B]`` (float32). Parameter names:
    ``backbone.*`` and ``score_head.{weight,bias}``."""

    def __init__(self, backbone: LlmModel | ModelConfig, head_init_std: float | None = None):
        super().__init__()
        if isinstance(backbone, ModelConfig):
            backbone = LlmModel(backbone)
        self.backbone = backbone
        self.config = backbone.config
        w = next(backbone.parameters())
        self.score_head = nn.Linear(self.config.hidden_size, 1, bias=True, dtype=w.dtype,
                                    device=w.device if w.device.type != "meta" else None)
        std = head_init_std if head_init_std is not None else 1.0 / (self.config.hidden_size + 1) ** 0.5
        with torch.no_grad():
            nn.init.normal_(self.score_head.weight, std=std)
            nn.init.zeros_(self.score_head.bias)

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            return_hidden_states=True, **kwargs)
        h = out.hidden_states
        if attention_mask is None:
            idx = torch.full((h.shape[0],), h.shape[1] - 1, device=h.device, dtype=torch.long)
        else:
            idx = last_token_index(attention_mask)
        last = h[torch.arange(h.shape[0], device=h.device), idx]
        self._aux_loss = out.aux_loss
        return self.score_head(last).squeeze(-1).float()

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
                chunk = seqs[start:start + batch_size]
                L = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), L), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), L), dtype=torch.long)
                for j, s in enumerate(chunk):
                    ids[j, :len(s)] = torch.tensor(s, dtype=torch.long)
                    mask[j, :len(s)] = 1
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

        from ..model.hf import save_pretrained
        path = Path(path)
        sd = self.state_dict() if state_dict is None else state_dict
        backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        head = {k[len("score_head."):]: v.detach().to("cpu").contiguous() for k, v in sd.items()
                if k.startswith("score_head.")}
        save_pretrained(self.backbone, path, state_dict=backbone)
        save_file(head, str(path / HEAD_FILE), metadata={"format": "pt"})
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


class RewardTrainer(BaseTrainer):
    """``RewardTrainer(train_config=TrainConfig(..., reward_config=RewardConfig(margin=...))).train()``.

    The policy weights (``init_weights_path``, e.g. an SFT model) become the backbone; the head starts new, unless
    ``init_weights_path`` is a reward-model folder (then its head is loaded too). With ``TrainConfig.lora`` the
    backbone gets adapters and the head is trained fully."""

    stage = "reward"
    loss_unit = "pairs"

    def get_stage_config(self) -> RewardConfig:
        return self.config.reward_config or RewardConfig()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        with self.backend.model_init_context():
            rm = RewardModel(model)
        path = self.config.init_weights_path
        if path is not None and (Path(path) / HEAD_FILE).is_file():
            from safetensors.torch import load_file
            rm.score_head.load_state_dict(load_file(str(Path(path) / HEAD_FILE)))
        return rm

    def build_dataset(self, files: Any):
        base = open_pair_dataset(files, self.config.block_size, self.model_config.vocab_size)
        name = "eval" if hasattr(self, "train_dataset") else "train"
        keep, _ = validate_pairs(base, skip=False, name=name, flag="(reward data: no skip flag; clean the data)")
        return PairDataset(base, keep)

    def collate(self, items: list[dict]) -> dict:
        if not hasattr(self, "_collate"):
            self._collate = PairCollate(self.pad_token_id())
        return self._collate(items)

    def count_units(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    def _batch_samples(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        sc = self.stage_config
        B = int(batch["index"].numel())
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        c, r = scores[:B], scores[B:]
        margin = torch.full_like(c, float(sc.margin))
        if "margin" in batch:
            margin = margin + batch["margin"].to(c)
        losses = bradley_terry_loss(c, r, margin)
        loss = losses.sum()
        if sc.center_rewards_coef:
            loss = loss + sc.center_rewards_coef * ((c + r) ** 2).sum()
        cd, rd = c.detach(), r.detach()
        metrics = {"loss/bradley_terry": losses.detach().sum(), "rewards/chosen": cd.sum(),
                   "rewards/rejected": rd.sum(), "rewards/margin": (cd - rd).sum(),
                   "rewards/accuracy": (cd > rd).float().sum()}
        aux = getattr(self.backend.unwrap(model), "_aux_loss", None)
        aux = aux if (aux is not None and aux.requires_grad) else None
        return LossOutput(loss=loss, aux_loss=aux, metrics=metrics)

    @torch.no_grad()
    def preference_accuracy(self, dataset: Any = None) -> dict[str, float]:
        """Mean ``loss`` and ``rewards/*`` over a pair dataset (default: eval data, else train data). Single
        process or stages 0-2 (every rank scores the whole dataset)."""
        ds = dataset if dataset is not None else (self.eval_dataset or self.train_dataset)
        if not isinstance(ds, PairDataset):
            ds = PairDataset(ds, np.arange(len(ds)))
        model = self.model
        was = model.training
        model.eval()
        sums: dict[str, float] = {}
        try:
            for s in range(0, len(ds), self.config.batch_size):
                batch = self.to_device(self.collate([ds[i] for i in range(s, min(s + self.config.batch_size,
                                                                                   len(ds)))]))
                with self.backend.autocast():
                    out = self.compute_loss(model, batch)
                sums["loss"] = sums.get("loss", 0.0) + float(out.loss)
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        finally:
            model.train(was)
        return {k: v / max(len(ds), 1) for k, v in sums.items()}

    def sample_generations(self) -> list[dict[str, str]]:
        return []   # a reward model does not generate

    def export(self) -> Path | None:
        """``output_dir/final``: a RewardModel folder (LoRA merged into the backbone)."""
        from ..model.lora import has_lora
        from .setup import merge_lora_state
        plain = self.backend.unwrap(self.model)
        state = self.backend.full_state_dict(self.model)
        if not self.backend.is_main:
            return None
        if has_lora(plain.backbone):
            bb = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            bb = merge_lora_state(bb, plain.backbone)
            state = {**{f"backbone.{k}": v for k, v in bb.items()},
                     **{k: v for k, v in state.items() if k.startswith("score_head.")}}
        with torch.device("meta"):
            target = RewardModel(LlmModel(self.model_config))
        path = target.save_pretrained(self.output_dir / "final", state_dict=state)
        if self.tokenizer is not None:
            self.tokenizer.save(path)
        return path
