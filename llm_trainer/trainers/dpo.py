"""`DPOTrainer`: direct preference optimisation and its variants on the shared loop.

Loss types (``DPOConfig.loss_type``, maths in :mod:`llm_trainer.losses.preference`): ``dpo`` (+ conservative DPO via
``loss_label_smoothing``), ``robust``, ``hinge``, ``ipo`` (length-averaged log-ratios), ``orpo`` and ``simpo``
(length-averaged log-probs, no reference model). Optional NLL term on the chosen responses (``nll_loss_coef``; ORPO
includes it with coefficient 1 by definition when the field is left at None).

Per micro-batch: chosen and rejected rows are concatenated (``PairCollate``: rows ``0..B-1`` chosen, ``B..2B-1``
rejected) and scored by ONE policy forward pass; per-sequence log-probs are sums over the response tokens (labels
!= -100) and the lengths come with them, so each loss can sum or average as it requires. The token log-probs are
computed from the final hidden states in chunks over the response tokens only (no ``[2B, S, V]`` logits tensor),
through the backend's ``output_projection`` (which gathers a ZeRO-3-partitioned head).

The loss unit is the *pair*: ``compute_loss`` returns the sum over pairs and metric sums, and the loop divides by the
pairs of the whole accumulation window on all ranks.

Reference model (:mod:`.reference`, never a random one): a frozen copy of the initial policy, a model loaded from
``DPOConfig.ref_model_weights_path``, or — with LoRA — the policy with its adapters switched off. With
``precompute_ref_log_probs`` one reference pass over the train (and eval) data runs before training, stored per
pair by dataset index, after which the reference model is freed. ``orpo`` / ``simpo`` build none.

Bad pairs — no trained response token on one side (e.g. an empty response, or one cut off by ``block_size``) or
chosen identical to rejected — raise :class:`~llm_trainer.data.formats.DataError` naming the file and record, or
are skipped and counted with ``DPOConfig.skip_bad_pairs=True`` (``trainer.skipped_pairs``).
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from ..data.pairs import PairCollate, PairDataset, open_pair_dataset, validate_pairs
from ..losses import chunked_token_logps, preference_loss, preference_metrics
from .base import BaseTrainer, LossOutput
from .collective import even_batches, rank_shard, sum_over_ranks
from .images import attach_pixel_values, expand_items
from .lm import model_inputs
from .reference import Reference, build_reference, eval_mode

__all__ = ["DPOTrainer", "PairwiseTrainer"]


class PairwiseTrainer(BaseTrainer):
    """What DPO and reward-model training share: preference-pair data (validated, bad pairs named), the pair
    collate, the pair as loss unit, and :meth:`preference_accuracy` over a whole pair dataset."""

    loss_unit = "pairs"
    skip_bad_pairs_flag = "DPOConfig.skip_bad_pairs"

    def __init__(self, **kwargs: Any) -> None:
        self.skipped_pairs: dict[str, list] = {}
        super().__init__(**kwargs)

    def skip_bad_pairs(self) -> bool:
        return False

    def train_prompt(self) -> bool:
        """Whether the prompt tokens count in the log-probs (DPO's ``mask_prompt=False``)."""
        return False

    def build_dataset(self, files: Any, split: str):
        base = open_pair_dataset(files, self.config.block_size, self.model_config.vocab_size, self.tokenizer)
        ds = PairDataset(base, np.arange(len(base)), train_prompt=self.train_prompt())
        keep, bad = validate_pairs(base, skip=self.skip_bad_pairs(), name=split, transform=ds.transform,
                                   flag=self.skip_bad_pairs_flag)
        ds.keep = keep
        self.skipped_pairs[split] = bad
        if bad and self.backend.is_main:
            shown = ", ".join(f"{f or '<data>'} record {r}" for f, r, _ in bad[:5])
            warnings.warn(f"skipped {len(bad)} bad pair(s) of the {split} data ({shown}"
                          f"{', ...' if len(bad) > 5 else ''}): {bad[0][2]}", stacklevel=2)
        return ds

    def build_collate(self):
        return PairCollate(self.pad_token_id())

    def count_units(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    def batch_samples(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    @torch.no_grad()
    def preference_accuracy(self, dataset: Any = None, batch_size: int | None = None) -> dict[str, float]:
        """Mean ``loss`` and metrics (``rewards/accuracy``, ``rewards/margin``, ...) over a pair dataset (default:
        the eval data, else the train data), every pair once over all ranks. Collective: every rank calls it."""
        ds = dataset if dataset is not None else (self.eval_dataset or self.train_dataset)
        if not isinstance(ds, PairDataset):
            ds = PairDataset(ds, np.arange(len(ds)), train_prompt=self.train_prompt())
        sums: dict[str, float] = {"_pairs": 0.0}
        with eval_mode(self.model):
            for idx, padding in even_batches(self.backend, rank_shard(len(ds), self.backend),
                                             batch_size or self.config.batch_size, 0):
                batch = self.to_device(self.collate([ds[i] for i in idx]))
                with self.backend.autocast():
                    out = self.compute_loss(self.model, batch)
                if padding:
                    continue
                sums["_pairs"] += self.count_units(batch)
                for k, v in {"loss": out.loss, **out.metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        totals = sum_over_ranks(self.backend, sums)
        pairs = max(totals.pop("_pairs"), 1.0)
        return {k: v / pairs for k, v in totals.items()}


class DPOTrainer(PairwiseTrainer):
    """``DPOTrainer(train_config=TrainConfig(..., dpo_config=DPOConfig(...)), eval_prompts=[...]).train()``."""

    stage = "dpo"
    stage_slot = "dpo_config"
    logps_chunk_size = 4096  # response tokens projected onto the vocabulary at a time

    def skip_bad_pairs(self) -> bool:
        return self.stage_config.skip_bad_pairs

    def train_prompt(self) -> bool:
        return not self.stage_config.mask_prompt

    @property
    def nll_coef(self) -> float:
        sc = self.stage_config
        if sc.nll_loss_coef is not None:
            return float(sc.nll_loss_coef)
        return 1.0 if sc.loss_type == "orpo" else 0.0   # ORPO = L_SFT + lambda L_OR (Hong et al. 2024, eq. 6)

    # ---------------------------------------------------------------------------------------- models
    def setup_extra_models(self) -> None:
        self.reference: Reference | None = None
        if self.stage_config.needs_reference:
            self.reference = build_reference(self.backend, self.backend.unwrap(self.model),
                                             self.stage_config.ref_model_weights_path,
                                             "DPOConfig.ref_model_weights_path")

    # ------------------------------------------------------------------------------------------ data
    def collate(self, items: list[dict]) -> dict:
        # VLM: expand image placeholders (labels -100); one pair's images serve its chosen and rejected rows
        items = expand_items(items, self.model_config, [("chosen_input_ids", "chosen_labels"),
                                                        ("rejected_input_ids", "rejected_labels")])
        batch = self.collate_fn(items)
        return attach_pixel_values(batch, batch.get("images"), self.pixel_provider, self.model_config)

    def setup_data(self) -> None:
        super().setup_data()
        if self.stage_config.precompute_ref_log_probs and self.reference is not None:
            for ds in (self.train_dataset, self.eval_dataset):
                if ds is not None:
                    self.precompute_reference(ds)
            self.reference.release()

    @torch.no_grad()
    def precompute_reference(self, dataset: PairDataset) -> torch.Tensor:
        """Reference log-probs of every pair, ``[len(dataset), 2]``, stored on the dataset. Each rank scores its
        share (``rank, rank + W, ...``; ranks stay in step for ZeRO-3's collective forwards) and the parts are
        all-gathered."""
        n = len(dataset)
        mine = rank_shard(n, self.backend)
        saved, dataset.ref_logps = dataset.ref_logps, None
        parts = []
        try:
            for idx, padding in even_batches(self.backend, mine, self.config.batch_size, 0):
                batch = self.to_device(self.collate([dataset[i] for i in idx]))
                with self.backend.autocast():
                    c, r = self.reference_logps(batch)
                if not padding:
                    parts.append(torch.stack([c, r], dim=1).float().cpu())
        except BaseException:
            dataset.ref_logps = saved
            raise
        local = torch.cat(parts) if parts else torch.zeros(0, 2)
        table = torch.full((n, 2), float("nan"))
        for rank, part in enumerate(self.backend.all_gather_object(local)):
            table[list(range(rank, n, self.backend.world_size))] = part
        dataset.ref_logps = table
        return table

    # ------------------------------------------------------------------------------------------ loss
    def sequence_logps(self, model: torch.nn.Module, batch: dict[str, Any]):
        """One forward pass over the ``[2B, L]`` batch → (summed response log-probs ``[2B]``, response lengths
        ``[2B]``, model output)."""
        out = model(**model_inputs(batch), return_hidden_states=True)
        with self.backend.output_projection(self.backend.unwrap(model)) as project:
            lp, mask = chunked_token_logps(out.hidden_states, project, batch["labels"],
                                           chunk_size=self.logps_chunk_size)
        return lp.sum(-1), mask.sum(-1), out

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs of the chosen and rejected rows, ``([B], [B])``."""
        B = int(batch["index"].numel())
        if self.reference is None or (self.reference.frozen is None and self.reference.policy is None):
            raise RuntimeError("DPO reference log-probs requested but the reference model is not loaded "
                               "(it is freed after precompute_ref_log_probs)")
        with self.reference.active() as ref:
            logps, _, _ = self.sequence_logps(ref, batch)
        logps = logps.float()
        return logps[:B], logps[B:]

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        sc = self.stage_config
        B = int(batch["index"].numel())
        logps, lengths, out = self.sequence_logps(model, batch)
        pc, pr, lc, lr = logps[:B], logps[B:], lengths[:B], lengths[B:]
        ref_c = ref_r = None
        if sc.needs_reference:
            if "ref_logps" in batch:
                ref = batch["ref_logps"].to(logps.device, torch.float32)
                ref_c, ref_r = ref[:, 0], ref[:, 1]
            else:
                ref_c, ref_r = self.reference_logps(batch)
        pref = preference_loss(sc.loss_type, pc, pr, ref_c, ref_r, lc, lr, beta=sc.loss_beta,
                               label_smoothing=sc.loss_label_smoothing, gamma=sc.simpo_gamma)
        loss = pref.losses.sum()
        nll = -(pc.float() / lc.float().clamp(min=1.0))     # per-pair mean token NLL of the chosen response
        if self.nll_coef:
            loss = loss + self.nll_coef * nll.sum()
        metrics = {f"loss/{sc.loss_type}": pref.losses.detach().sum(),
                   **preference_metrics(pref.chosen_rewards, pref.rejected_rewards),
                   "logps/chosen": pc.detach().float().sum(), "logps/rejected": pr.detach().float().sum(),
                   "nll": nll.detach().sum()}
        aux = out.aux_loss if (out.aux_loss is not None and out.aux_loss.requires_grad) else None
        return LossOutput(loss=loss, aux_loss=aux, metrics=metrics)

    # ------------------------------------------------------------------------------------------ eval
    def format_eval_prompt(self, prompt: str) -> list[int]:
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True).input_ids
