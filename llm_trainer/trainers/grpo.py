"""`GRPOTrainer`: group relative policy optimisation (Shao et al. 2024) and its variants — Dr. GRPO, DAPO, GSPO,
CISPO — on the shared loop (`BaseTrainer`) with the rollout engine of `rollout.py`.

One rollout = ``batch_size`` prompts per rank × ``group_size`` completions. Rewards → group-normalised advantages
(``(r - mean_g) / (std_g + 1e-4)``, or ``r - mean_g`` with ``scale_rewards=False``) → old log-probs (policy in eval
mode, same temperature and micro-batches as the update: ratio exactly 1 at the first inner step) and reference
log-probs (β > 0 only) → ``grpo_epochs`` passes over the buffer in micro-batches of ``grpo_batch_size`` samples,
``gradient_accumulation_steps`` micro-batches per optimizer step.

Loss normalisation: ``compute_loss`` returns a sum over *units* and the loop divides by the units of the whole
accumulation window on all ranks (see base.py). The unit depends on ``loss_type``:

=========  ==================================================  ============================================
loss_type  per micro-batch sum returned                          unit (→ what the window normaliser is)
=========  ==================================================  ============================================
grpo       Σ_i mean_t l_it  (per-sequence token means)          sequences with ≥ 1 loss token
bnpo       Σ_t l_t / tokens of this micro-batch                 micro-batches (with ≥ 1 loss token)
dr_grpo    Σ_t l_t / max_new_tokens                             sequences (all: a constant B·L normaliser)
dapo       Σ_t l_t                                              loss tokens of the whole window (all ranks)
cispo      Σ_t l_t (CISPO objective)                            loss tokens of the whole window (all ranks)
=========  ==================================================  ============================================
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from ..configs import GRPOConfig
from ..losses.rl import grpo_loss, group_advantages, zero_variance_groups
from .base import LossOutput
from .rollout import RLTrainer, Rollout, build_sequences, completion_logps

__all__ = ["GRPOTrainer"]

_UNITS = {"grpo": "sequences", "bnpo": "micro_batches", "dr_grpo": "sequences", "dapo": "tokens", "cispo": "tokens"}


class GRPOTrainer(RLTrainer):
    """``GRPOTrainer(train_config=TrainConfig(grpo_config=GRPOConfig(...), ...), reward_func=fn | [fn, ...],
    eval_prompts=[...]).train()``; see the module docstring and docs/rl.md."""

    stage = "grpo"
    _mb_field = "grpo_batch_size"
    _epochs_field = "grpo_epochs"

    @classmethod
    def _stage_config_of(cls, train_config) -> GRPOConfig:
        return train_config.grpo_config or GRPOConfig()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loss_unit = _UNITS[self.stage_config.loss_type]

    @property
    def group_size(self) -> int:
        return self.stage_config.group_size

    @property
    def needs_reference(self) -> bool:
        return self.stage_config.loss_beta > 0

    # ------------------------------------------------------------------------------------------- rollout
    def make_rollout_batches(self, prompts: Iterator[dict[str, Any]]) -> list[dict[str, Any]] | None:
        sc = self.stage_config
        G = self.group_size
        target = self.config.batch_size                 # groups per rank wanted in the buffer
        rounds = sc.dynamic_sampling_max_rounds if sc.dynamic_sampling else 1
        parts: list[tuple[Rollout, Any, torch.Tensor, torch.Tensor]] = []
        kept_groups = 0
        stats_acc: list[dict[str, float]] = []
        self.timer.times.clear()
        for r in range(rounds):
            batch = next(prompts, None)
            if batch is None:
                if not parts:
                    return None
                break
            rollout, rewards = self.sample(batch)
            seq_r = rewards.total
            adv = group_advantages(seq_r, G, scale_std=sc.scale_rewards)
            zero_var = zero_variance_groups(seq_r, G)
            parts.append((rollout, rewards, adv, zero_var))
            stats_acc.append(self.rollout_stats(rollout, rewards))
            stats_acc[-1]["zero_var_group_frac"] = float(zero_var.float().mean())
            kept_groups += int((~zero_var).sum()) // G
            if sc.dynamic_sampling:
                need = self.sync_count(1 if kept_groups < target else 0)   # another round if any rank is short
                if not need:
                    break
        self.rollouts_done += 1

        rollout = Rollout.concat([p[0] for p in parts])
        adv = torch.cat([p[2] for p in parts])
        zero_var = torch.cat([p[3] for p in parts])
        n = len(rollout)
        keep = list(range(n))
        if sc.dynamic_sampling or sc.filter_zero_variance_groups:
            keep = [i for i in keep if not bool(zero_var[i])]
            if sc.dynamic_sampling:
                keep = keep[:target * G]                 # at most batch_size groups
        if self.sync_count(len(keep), "sum") == 0:
            self.metrics.print(f"step {self.global_step}: every group of the rollout has identical rewards on every "
                               f"rank; nothing to learn, skipping it")
            return []
        # mix groups inside micro-batches (a fixed order: the old log-probs are computed on these micro-batches)
        perm = torch.randperm(len(keep), generator=torch.Generator().manual_seed(
            self.config.seed + 31 * self.rollouts_done + 7 * self.backend.rank)).tolist()
        keep = [keep[i] for i in perm]
        chunks = self.split_micro_batches(n, keep)

        stats = {k: sum(s.get(k, 0.0) for s in stats_acc) / len(stats_acc) for k in stats_acc[0]}
        stats["kept_frac"] = len(keep) / max(n, 1)
        stats["sampling_rounds"] = float(len(parts))
        micro = [self._micro_batch(rollout, adv, idx) for idx in chunks]
        self.score_micro_batches(micro)
        if rollout.gen_logprobs is not None:
            diffs = [b.pop("_gen_diff") for b in micro]
            stats["gen_logprob_diff"] = max(diffs) if diffs else 0.0
        if self.old_logprobs_source == "generation":
            for b in micro:
                b["old_logp"] = b.pop("gen_logp")
        for b in micro:
            b.pop("gen_logp", None)
        for k, v in self.timer.times.items():
            stats[f"time/{k}"] = v
        for b in micro:
            b["stats"] = stats
        return micro

    def _micro_batch(self, rollout: Rollout, adv: torch.Tensor, idx: list[int]) -> dict[str, Any]:
        sc = self.stage_config
        dummy = bool(idx) and idx[0] == -1
        idx = idx[1:] if dummy else idx
        b = build_sequences([rollout.prompt_ids[i] for i in idx], [rollout.completion_ids[i] for i in idx],
                            self.pad_token_id())
        mask = b["completion_mask"]
        if sc.mask_truncated_completions:
            trunc = torch.tensor([not rollout.finished[i] for i in idx])
            mask[trunc] = 0.0
        if dummy:
            mask.zero_()
        b["advantages"] = adv[idx].float()
        images = [rollout.pixel_values[i] for i in idx] if rollout.pixel_values else []
        if any(p is not None and p.numel() for p in images):                    # VLM: the rows' prompt images
            b["pixel_values"] = torch.cat([p for p in images if p is not None and p.numel()])
            b["image_counts"] = torch.tensor([0 if p is None else p.shape[0] for p in images], dtype=torch.long)
        rows = (mask.sum(-1) > 0)
        unit = self.loss_unit
        if unit == "tokens":
            b["units"] = int(mask.sum())
        elif unit == "micro_batches":
            b["units"] = int(bool(rows.any()))
        elif sc.loss_type == "dr_grpo":
            b["units"] = 0 if dummy else len(idx)
        else:
            b["units"] = int(rows.sum())
        if rollout.gen_logprobs is not None:
            T = mask.size(1)
            g = torch.zeros(len(idx), T)
            for r, i in enumerate(idx):
                lp = rollout.gen_logprobs[i]
                g[r, :lp.numel()] = lp
            b["gen_logp"] = g
        if sc.ptx_coef > 0:
            b.update(self.ptx_tensors([rollout.prompt_ids[i] for i in idx], [rollout.answer_ids[i] for i in idx]))
        return b

    def score_micro_batches(self, batches, with_values: bool = False) -> None:
        super().score_micro_batches(batches, with_values)
        for b in batches:
            if "gen_logp" in b:
                m = b["completion_mask"] > 0
                diff = (b["gen_logp"] - b["old_logp"]).abs()
                b["_gen_diff"] = float(diff[m].max()) if bool(m.any()) else 0.0

    # ---------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        sc = self.stage_config
        mask = batch["completion_mask"]
        out = completion_logps(model, batch, self.temperature, with_entropy=True, plain=self.backend.unwrap(model))
        logp = out["logp"]
        objective = "cispo" if sc.loss_type == "cispo" else "clip"
        aggregation = {"cispo": "dapo"}.get(sc.loss_type, sc.loss_type)
        loss, m = grpo_loss(
            logp, batch["old_logp"], batch["advantages"], mask, aggregation=aggregation, objective=objective,
            clip_eps_low=sc.loss_clip_eps, clip_eps_high=sc.clip_eps_high, delta=sc.loss_delta,
            importance_sampling=sc.importance_sampling_level, ref_logp=batch.get("ref_logp"), beta=sc.loss_beta,
            kl_estimator=sc.kl_estimator, max_completion_length=sc.generate_config.max_new_tokens,
            num_window_tokens=1.0)
        B = mask.size(0)
        if sc.loss_type in ("grpo", "dr_grpo"):
            loss = loss * B                             # back to a sum over sequences (the loop normalises)
        units = float(batch["units"])
        if sc.ptx_coef > 0:
            ptx = self.ptx_loss(model, batch)
            loss = loss + sc.ptx_coef * ptx * units
            ptx_value = float(ptx.detach())
        ntok = float(mask.sum())
        extra: dict[str, float] = {
            "clip_frac": float(m.get("clip_frac", m.get("cispo_clip_frac"))),
            "approx_kl": float(m["approx_kl"]),
            "ratio_mean": float(m["ratio/mean"]),
            "ratio_max": float(m["ratio/max"]),
            "entropy": float((out["entropy"] * mask).sum() / max(ntok, 1.0)),
            "advantage_abs": float(batch["advantages"].abs().mean()) if B else 0.0,
        }
        if sc.loss_beta > 0:
            extra["kl"] = float(m["kl"])
        if sc.ptx_coef > 0:
            extra["ptx_loss"] = ptx_value
        extra.update(batch.get("stats", {}))
        aux = out.get("aux_loss")
        return LossOutput(loss=loss, aux_loss=aux, metrics={}, extra=extra)
