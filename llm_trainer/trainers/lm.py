"""Language-modelling loss shared by pretraining and SFT: CE or chunked CE, critical tokens, distillation, MoE aux."""
from __future__ import annotations

from typing import Any

import torch

from ..losses import chunked_lm_loss, critical_token_weights, kd_loss, lm_loss
from .base import BaseTrainer, LossOutput


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The forward-pass arguments present in a collated batch."""
    keys = ("input_ids", "attention_mask", "position_ids", "document_ids", "pixel_values", "image_counts")
    return {k: batch[k] for k in keys if batch.get(k) is not None}


class LanguageModelingTrainer(BaseTrainer):
    """Next-token prediction on ``labels`` (−100 = not trained) with the options of the stage config."""

    def setup_extra_models(self) -> None:
        self.teacher = None
        kd = getattr(self.stage_config, "kd_config", None)
        if kd is None:
            return
        kd.check_teacher()
        if kd.teacher_model_path is not None:
            from .setup import build_model, frozen_copy, resolve_model_config
            import copy
            teacher_cfg = copy.copy(self.config)
            teacher_cfg.init_weights_path, teacher_cfg.lora = kd.teacher_model_path, None
            teacher = build_model(teacher_cfg, resolve_model_config(teacher_cfg), self.backend)
            self.teacher = frozen_copy(teacher).to(self.device)

    def teacher_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        kd = self.stage_config.kd_config
        with torch.no_grad():
            if self.teacher is not None:
                return self.teacher(**model_inputs(batch)).logits
            return kd.teacher_logits_provider(batch["input_ids"], batch.get("attention_mask"))

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        sc = self.stage_config
        chunk = getattr(sc, "chunked_cross_entropy_size", None)
        kd = getattr(sc, "kd_config", None)
        labels = batch["labels"]
        lc = self.config.loss_config
        weights = None
        if lc.critical_tokens:
            weights = critical_token_weights(labels, lc.critical_tokens, lc.critical_token_weight)
        use_chunks = chunk is not None and kd is None     # KD needs the student's full logits
        out = model(**model_inputs(batch), return_hidden_states=use_chunks)
        if use_chunks:
            head = self.backend.unwrap(model).lm_head_weight()
            ce_sum, _ = chunked_lm_loss(out.hidden_states, head, labels, chunk, token_weights=weights)
        else:
            ce_sum, _ = lm_loss(out.logits, labels, token_weights=weights)
        metrics = {"lm_loss": ce_sum.detach()}
        loss = ce_sum
        if kd is not None:
            kd_sum, _ = kd_loss(out.logits, self.teacher_logits(batch).to(out.logits.dtype), labels, kind=kd.kind,
                                beta=kd.jsd_beta, temperature=kd.temperature)
            loss = (1.0 - kd.kd_coef) * ce_sum + kd.kd_coef * kd_sum
            metrics["kd_loss"] = kd_sum.detach()
        aux = out.aux_loss if (out.aux_loss is not None and out.aux_loss.requires_grad) else None
        return LossOutput(loss=loss, aux_loss=aux, metrics=metrics)
