"""`GRPOTrainer`: group relative policy optimisation (Shao et al. 2024) and its variants — Dr. GRPO, DAPO, GSPO,
CISPO — on the shared loop (`BaseTrainer`) with the rollout engine of `rollout.py`.

One rollout = ``batch_size`` prompts per rank × ``group_size`` completions. Rewards → group-normalised advantages
(``(r - mean_g) / (std_g + 1e-4)``; ``scale_rewards='batch'`` divides by the batch std, ``'none'`` not at all) →
old log-probs (policy in eval mode, same temperature and micro-batches as the update: ratio exactly 1 at the first
inner step) and reference log-probs (β > 0 only) → ``grpo_epochs`` passes over the buffer in micro-batches of
``grpo_batch_size`` samples, ``gradient_accumulation_steps`` micro-batches per optimizer step.

Loss normalisation: :func:`~llm_trainer.losses.policy.grpo_loss` returns a sum over the units of its aggregation
(:func:`~llm_trainer.losses.policy.grpo_units`, counted when the micro-batch is built) and the loop divides by the
units of the whole accumulation window on all ranks (see docs/rl.md for each loss type's normaliser). The
pretraining mix (``ptx_coef``) is a second term in answer-token units.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from ..losses import GRPO_LOSS_TYPES, grpo_loss, grpo_units, group_advantages, zero_variance_groups
from .base import MAIN, LossOutput
from .collective import global_max
from .rl import RLTrainer
from .rollout import Rollout, build_sequences

__all__ = ["GRPOTrainer"]

_UNIT_NAMES = {"grpo": "sequences", "bnpo": "micro_batches", "dr_grpo": "sequences", "dapo": "tokens"}


class GRPOTrainer(RLTrainer):
    """``GRPOTrainer(train_config=TrainConfig(grpo_config=GRPOConfig(...), ...), reward_func=fn | [fn, ...],
    eval_prompts=[...]).train()``; see the module docstring and docs/rl.md."""

    stage = "grpo"
    stage_slot = "grpo_config"

    @property
    def objective(self) -> str:
        return GRPO_LOSS_TYPES[self.stage_config.loss_type][0]

    @property
    def aggregation(self) -> str:
        return GRPO_LOSS_TYPES[self.stage_config.loss_type][1]

    @property
    def loss_unit(self) -> str:
        return _UNIT_NAMES[self.aggregation]

    @property
    def group_size(self) -> int:
        return self.stage_config.group_size

    # ------------------------------------------------------------------------------------------- rollout
    def make_rollout_batches(self, prompts: Iterator[dict[str, Any]]) -> list[dict[str, Any]] | None:
        sc = self.stage_config
        G = self.group_size
        target = self.config.batch_size                 # groups per rank wanted in the buffer
        rounds = sc.dynamic_sampling_max_rounds if sc.dynamic_sampling else 1
        parts: list[tuple[Rollout, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        kept_groups = 0
        stats_acc: list[dict[str, float]] = []
        self.timer.times.clear()
        for _ in range(rounds):
            batch = next(prompts, None)
            if batch is None:
                if not parts:
                    return None
                break
            rollout, rewards = self.sample(batch)
            # a group with a NaN/inf reward (nan_policy='skip') is dropped whole; 0 stands in for its rewards
            dropped = self.nonfinite_rewards(rewards).reshape(-1, G).any(1).repeat_interleave(G)
            seq_r = torch.where(dropped, torch.zeros_like(rewards.total), rewards.total)
            adv = group_advantages(seq_r, G, scale_std=sc.scale_rewards != "none",
                                   std_level="batch" if sc.scale_rewards == "batch" else "group")
            zero_var = zero_variance_groups(seq_r, G)
            parts.append((rollout, adv, zero_var, dropped))
            stats_acc.append(self.rollout_summary(rollout, rewards))
            stats_acc[-1]["zero_var_group_frac"] = float(zero_var.float().mean())
            kept_groups += int((~zero_var & ~dropped).sum()) // G
            if sc.dynamic_sampling and not global_max(self.backend, int(kept_groups < target)):
                break                                   # no rank is short of groups with signal
        self.rollouts_done += 1

        rollout = Rollout.concat([p[0] for p in parts])
        adv = torch.cat([p[1] for p in parts])
        zero_var = torch.cat([p[2] for p in parts])
        dropped = torch.cat([p[3] for p in parts])
        n = len(rollout)
        keep = [i for i in range(n) if not bool(dropped[i])]
        if sc.dynamic_sampling or sc.filter_zero_variance_groups:
            keep = [i for i in keep if not bool(zero_var[i])]
            if sc.dynamic_sampling:
                keep = keep[:target * G]                 # at most batch_size groups
        if global_max(self.backend, len(keep)) == 0:
            self.metrics.print(f"step {self.global_step}: every group of the rollout has identical rewards on every "
                               f"rank; nothing to learn, skipping it")
            return []
        # mix groups inside micro-batches (a fixed order: the old log-probs are computed on these micro-batches)
        perm = torch.randperm(len(keep), generator=torch.Generator().manual_seed(
            self.config.seed + 31 * self.rollouts_done + 7 * self.backend.rank)).tolist()
        keep = [keep[i] for i in perm]

        stats = {k: sum(s.get(k, 0.0) for s in stats_acc) / len(stats_acc) for k in stats_acc[0]}
        stats["kept_frac"] = len(keep) / max(n, 1)
        stats["sampling_rounds"] = float(len(parts))
        micro = [self._micro_batch(rollout, adv, idx, padding) for idx, padding in self.micro_batch_indices(keep)]
        self.score_micro_batches(micro)
        if rollout.gen_logprobs is not None:
            stats["gen_logprob_diff"] = max(self._gen_logprob_diff(b) for b in micro)
            if self.old_logprobs_source == "generation":
                for b in micro:
                    b["old_logp"] = b["gen_logp"]
        for b in micro:
            b.pop("gen_logp", None)
        self.set_rollout_stats(stats)
        return micro

    def _micro_batch(self, rollout: Rollout, adv: torch.Tensor, idx: list[int], padding: bool) -> dict[str, Any]:
        sc = self.stage_config
        b = build_sequences([rollout.prompt_ids[i] for i in idx], [rollout.completion_ids[i] for i in idx],
                            self.pad_token_id())
        mask = b["completion_mask"]
        if sc.mask_truncated_completions:
            mask[torch.tensor([not rollout.finished[i] for i in idx])] = 0.0
        row_mask = torch.full((len(idx),), 0.0 if padding else 1.0)
        mask *= row_mask[:, None]
        b["advantages"] = adv[idx].float()
        images = [rollout.pixel_values[i] for i in idx] if rollout.pixel_values else []
        if any(p is not None and p.numel() for p in images):                    # VLM: the rows' prompt images
            b["pixel_values"] = torch.cat([p for p in images if p is not None and p.numel()])
            b["image_counts"] = torch.tensor([0 if p is None else p.shape[0] for p in images], dtype=torch.long)
        b["units"] = {MAIN: grpo_units(mask, self.aggregation, row_mask)}
        if rollout.gen_logprobs is not None:
            g = torch.zeros_like(mask)
            for r, i in enumerate(idx):
                lp = rollout.gen_logprobs[i]
                g[r, :lp.numel()] = lp
            b["gen_logp"] = g
        if sc.ptx_coef > 0:
            b.update(self.ptx_batch([rollout.prompt_ids[i] for i in idx], [rollout.answer_ids[i] for i in idx]))
            b["units"]["ptx"] = 0 if padding else self.ptx_units(b)
        return b

    @staticmethod
    def _gen_logprob_diff(b: dict[str, Any]) -> float:
        m = b["completion_mask"] > 0
        return float((b["gen_logp"] - b["old_logp"]).abs()[m].max()) if bool(m.any()) else 0.0

    # ---------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        sc = self.stage_config
        mask = batch["completion_mask"]
        out = self.policy_logps(model, batch, with_entropy=True)
        loss, m = grpo_loss(
            out["logp"], batch["old_logp"], batch["advantages"], mask, aggregation=self.aggregation,
            objective=self.objective, clip_eps_low=sc.loss_clip_eps, clip_eps_high=sc.clip_eps_high,
            delta=sc.loss_delta, importance_sampling=sc.loss_importance_sampling_level,
            ref_logp=batch.get("ref_logp"), beta=sc.loss_beta, kl_estimator=sc.kl_estimator,
            max_completion_length=sc.generate_config.max_new_tokens)
        terms = {MAIN: loss}
        ntok = float(mask.sum())
        extra: dict[str, float] = {
            "clip_frac": float(m.get("clip_frac", m.get("cispo_clip_frac"))),
            "approx_kl": float(m["approx_kl"]),
            "ratio_mean": float(m["ratio/mean"]),
            "ratio_max": float(m["ratio/max"]),
            "entropy": float((out["entropy"] * mask).sum() / max(ntok, 1.0)),
            "advantage_abs": float(batch["advantages"].abs().mean()) if mask.size(0) else 0.0,
        }
        if sc.loss_beta > 0:
            extra["kl"] = float(m["kl"])
        if sc.ptx_coef > 0:
            ptx = self.ptx_loss(model, batch)
            terms["ptx"] = sc.ptx_coef * ptx
            extra["ptx_loss"] = float(ptx.detach()) / max(self.ptx_units(batch), 1)
        return LossOutput(loss=terms if len(terms) > 1 else terms[MAIN], aux_loss=out.get("aux_loss"), extra=extra)
