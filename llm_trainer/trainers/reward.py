"""`RewardTrainer`: a `RewardModel` (:mod:`llm_trainer.model.reward`) trained with the Bradley–Terry pairwise loss
(Ouyang et al. 2022 eq. 1), optional margin as in Llama 2 (Touvron et al. 2023 eq. 2).

Data: the same preference pairs as DPO (``chosen_input_ids`` / ``rejected_input_ids``; labels are ignored except to
check that each side has a response). Chosen and rejected rows are scored in one forward pass. The loss unit is the
pair; logged: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy``.
The export (``output_dir/final``) is a reward-model folder: HF-format backbone + ``reward_head.safetensors``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..losses import bradley_terry_loss, preference_metrics
from ..model.reward import HEAD_FILE, RewardModel, last_token_index
from .base import LossOutput
from .dpo import PairwiseTrainer
from .setup import export_model, lora_target

__all__ = ["RewardModel", "RewardTrainer", "last_token_index"]


class RewardTrainer(PairwiseTrainer):
    """``RewardTrainer(train_config=TrainConfig(..., reward_config=RewardConfig(margin=...))).train()``.

    The policy weights (``init_weights_path``, e.g. an SFT model) become the backbone; the head starts new, unless
    ``init_weights_path`` is a reward-model folder (then its head is loaded too). With ``TrainConfig.lora`` the
    backbone gets adapters and the head is trained fully."""

    stage = "reward"
    stage_slot = "reward_config"
    skip_bad_pairs_flag = "(reward data: no skip flag; clean the data)"

    def build_model(self) -> torch.nn.Module:
        backbone = super().build_model()
        with self.backend.model_init_context():
            rm = RewardModel(backbone)
        path = self.config.init_weights_path
        if path is not None and (Path(path) / HEAD_FILE).is_file():
            from safetensors.torch import load_file
            rm.score_head.load_state_dict(load_file(str(Path(path) / HEAD_FILE)))
        return rm

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
        metrics = {"loss/bradley_terry": losses.detach().sum(), **preference_metrics(c, r)}
        aux = getattr(self.backend.unwrap(model), "_aux_loss", None)
        aux = aux if (aux is not None and aux.requires_grad) else None
        return LossOutput(loss=loss, aux_loss=aux, metrics=metrics)

    def sample_generations(self) -> list[dict[str, str]]:
        return []   # a reward model does not generate

    def export(self) -> Path | None:
        """``output_dir/final``: a RewardModel folder (LoRA merged into the backbone)."""
        def write(state: dict, plain: RewardModel, path: Path) -> None:
            with torch.device("meta"):
                target = RewardModel(type(plain.backbone)(self.model_config))
            target.save_pretrained(path, state_dict=state)

        return export_model(self.backend, self.model, self.output_dir / "final", self.tokenizer, write=write,
                            adapters=lambda plain: lora_target(plain.backbone))
