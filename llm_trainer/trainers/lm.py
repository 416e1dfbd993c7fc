"""Language-modelling loss shared by pretraining and SFT: CE or chunked CE, critical tokens, distillation, MoE aux."""
from __future__ import annotations

from typing import Any

import torch

from ..losses import chunked_lm_kd_loss, chunked_lm_loss, critical_token_weights, kd_loss, lm_loss
from .base import BaseTrainer, LossOutput
from .setup import load_model, resolve_model_config


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The forward-pass arguments present in a collated batch."""
    keys = ("input_ids", "attention_mask", "position_ids", "document_ids", "pixel_values", "image_counts")
    return {k: batch[k] for k in keys if batch.get(k) is not None}


class LanguageModelingTrainer(BaseTrainer):
    """Next-token prediction on ``labels`` (−100 = not trained) with the options of the stage config.

    Distillation (``kd_config``): the teacher is a frozen replica built by the backend (a partitioned inference
    engine under ZeRO-3) or a ``teacher_logits_provider`` callable. With ``chunked_cross_entropy_size`` the CE and
    the KD term are computed together chunk by chunk (:func:`chunked_lm_kd_loss`), never holding full logits."""

    def setup_extra_models(self) -> None:
        self.teacher: torch.nn.Module | None = None
        kd = self.stage_config.kd_config
        if kd is None:
            return
        kd.check_teacher()
        if kd.teacher_model_path is not None:
            path = kd.teacher_model_path
            config = resolve_model_config(None, path, what="KDConfig.teacher_model_path")
            self.teacher = self.backend.frozen_replica(build=lambda: load_model(config, path))

    def teacher_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        kd = self.stage_config.kd_config
        with torch.no_grad():
            if self.teacher is not None:
                return self.teacher(**model_inputs(batch)).logits
            return kd.teacher_logits_provider(batch["input_ids"], batch.get("attention_mask"))

    def _chunked_kd(self, hidden, project, labels, batch, chunk: int, weights):
        """CE and KD chunk by chunk; a teacher model is projected chunk by chunk too (no full logits on either
        side), a ``teacher_logits_provider``'s logits are gathered per chunk."""
        kd = self.stage_config.kd_config
        kw = dict(kind=kd.kind, beta=kd.jsd_beta, temperature=kd.temperature, chunk_size=chunk,
                  token_weights=weights)
        if self.teacher is None:
            ce, kd_sum, _ = chunked_lm_kd_loss(hidden, project, labels, teacher_logits=self.teacher_logits(batch), **kw)
            return ce, kd_sum
        with torch.no_grad():
            t_hidden = self.teacher(**model_inputs(batch), return_hidden_states=True).hidden_states
        with self.backend.output_projection(self.teacher) as t_project:
            ce, kd_sum, _ = chunked_lm_kd_loss(hidden, project, labels, teacher_hidden=t_hidden,
                                               teacher_lm_head_weight=t_project, **kw)
        return ce, kd_sum

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        sc = self.stage_config
        chunk, kd = sc.chunked_cross_entropy_size, sc.kd_config
        labels = batch["labels"]
        lc = self.config.loss_config
        weights = None
        if lc.critical_tokens:
            weights = critical_token_weights(labels, lc.critical_tokens, lc.critical_token_weight)
        out = model(**model_inputs(batch), return_hidden_states=chunk is not None)
        metrics: dict[str, torch.Tensor] = {}
        if chunk is not None:
            with self.backend.output_projection(self.backend.unwrap(model)) as project:
                if kd is None:
                    ce_sum, _ = chunked_lm_loss(out.hidden_states, project, labels, chunk, token_weights=weights)
                else:
                    ce_sum, kd_sum = self._chunked_kd(out.hidden_states, project, labels, batch, chunk, weights)
        else:
            ce_sum, _ = lm_loss(out.logits, labels, token_weights=weights)
            if kd is not None:
                kd_sum, _ = kd_loss(out.logits, self.teacher_logits(batch).to(out.logits.dtype), labels,
                                    kind=kd.kind, beta=kd.jsd_beta, temperature=kd.temperature)
        metrics["lm_loss"] = ce_sum.detach()
        loss = ce_sum
        if kd is not None:
            loss = (1.0 - kd.kd_coef) * ce_sum + kd.kd_coef * kd_sum
            metrics["kd_loss"] = kd_sum.detach()
        aux = out.aux_loss if (out.aux_loss is not None and out.aux_loss.requires_grad) else None
        return LossOutput(loss=loss, aux_loss=aux, metrics=metrics)
