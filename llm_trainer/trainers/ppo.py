"""`PPOTrainer`: PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022; Huang et al. 2024, "The N+
implementation details of RLHF with PPO") on the shared loop, with the rollout engine of `rollout.py`.

Per rollout (``batch_size`` prompts per rank, one completion each):

1. generate; score with the reward sources; ``missing_eos_penalty`` is subtracted from the score of completions that
   did not end with a stop token; optional reward normalisation (``normalize_rewards``: 'running' statistics over
   all rollouts and ranks, or 'batch': this rollout on all ranks): ``(score - mean) / std`` (dense rewards are only
   scaled by 1/std);
2. old log-probs and values (policy+value in eval mode), reference log-probs (β > 0 or adaptive KL);
3. token rewards ``r_t = -β KL_t`` (k1/k2/k3 of the old policy vs the reference) plus the score on the last token
   (dense rewards: per token); ``whiten_rewards``: ``(r − μ)/σ + μ`` over the rollout (all ranks: the spread is
   normalised, the mean kept);
4. GAE(γ, λ) with, for truncated completions (no stop token), the bootstrap value V(state after the last token);
   returns = A + V_old; ``whiten_advantages``: ``(A − μ)/σ`` over the rollout (all ranks);
5. ``ppo_epochs`` passes in micro-batches of ``ppo_batch_size``: ``Σ_t [policy clip loss + vf_coef · value loss]``
   over completion tokens (the loop divides by the window's tokens on all ranks); the value loss is clipped with
   its own ``value_clip_eps`` and is Huber(``huber_delta``) or squared error; ``ptx_coef`` adds the LM loss of
   prompt + reference answer (its own term, in answer tokens); adaptive β (``adaptive_kl``) is updated after each
   rollout from the measured KL.

The value model is a separate LM backbone + scalar head (initialised from ``value_model_weights_path``, else from
the policy's initial weights, with the policy's LoRA settings) or, with ``value_head_on_policy=True``, a head on the
policy's final hidden states. Policy and value live in one :class:`PolicyValueModel` (one backend wrap, one
optimizer); the value parameters get their own optimizer group settings from ``value_optim_config`` (lr as a ratio
to the policy's schedule, betas, weight decay, eps). The export (``output_dir/final``) is the policy alone; the
value model goes to ``output_dir/value_model/model.safetensors``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..losses import (AdaptiveKLController, RunningMeanStd, gae, kl_penalized_rewards, masked_moments,
                      ppo_policy_loss, value_loss, whiten_with_moments)
from ..optim import build_optimizer, build_param_groups
from .base import MAIN, LossOutput
from .collective import global_max
from .rl import RLTrainer
from .rollout import build_sequences, disable_stochasticity
from ..model.hf import set_default_file_mode
from .setup import build_model, export_model, require_path, write_model_folder

__all__ = ["PPOTrainer", "PolicyValueModel"]


class PolicyValueModel(nn.Module):
    """The policy LM and the value function in one module. ``forward(...)`` is the policy's forward; with
    ``return_values=True`` the output also carries ``values [B, S]`` (V of the state after each position)."""

    def __init__(self, policy: nn.Module, value_backbone: nn.Module | None, value_head: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_backbone = value_backbone
        self.value_head = value_head
        self.config = policy.config

    def forward(self, input_ids=None, attention_mask=None, return_values: bool = False, **kwargs):
        if return_values:
            kwargs["return_hidden_states"] = True
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if return_values:
            if self.value_backbone is None:
                h = out.hidden_states
            else:
                h = self.value_backbone(input_ids=input_ids, attention_mask=attention_mask,
                                        return_hidden_states=True).hidden_states
            out.values = self.value_head(h).squeeze(-1)
        return out


class PPOTrainer(RLTrainer):
    """``PPOTrainer(train_config=TrainConfig(ppo_config=PPOConfig(...), ...), reward_func=...).train()``."""

    stage = "ppo"
    stage_slot = "ppo_config"
    loss_unit = "tokens"

    def __init__(self, **kwargs: Any) -> None:
        self.reward_stats = RunningMeanStd()
        super().__init__(**kwargs)

    def setup(self) -> None:
        sc = self.stage_config
        self.kl_ctl = AdaptiveKLController(sc.kl_beta, sc.adaptive_kl.target if sc.adaptive_kl else None,
                                           sc.adaptive_kl.horizon if sc.adaptive_kl else 10000)
        super().setup()

    # ------------------------------------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        sc, cfg = self.stage_config, self.config
        policy = super().build_model()
        backbone = None
        if not sc.value_head_on_policy:
            require_path(sc.value_model_weights_path, "PPOConfig.value_model_weights_path")
            # the policy's initial weights (the same seed gives the same random init), or the value weights
            backbone = build_model(self.model_config, self.backend,
                                   weights=sc.value_model_weights_path or cfg.init_weights_path, lora=cfg.lora,
                                   gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed)
            disable_stochasticity(backbone)
            if getattr(backbone, "lm_head", None) is not None:
                backbone.lm_head.requires_grad_(False)            # unused by the value function
        head = nn.Linear(self.model_config.hidden_size, 1)     # a backend partitions it when it wraps the model
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
        return PolicyValueModel(policy, backbone, head.to(next(policy.parameters()).dtype))

    def build_optimizer(self, model: PolicyValueModel) -> torch.optim.Optimizer:
        oc = self.config.optim_config
        vc = self.stage_config.value_optim_config or oc
        if vc.optim_type != oc.optim_type:
            raise ValueError(f"PPOConfig.value_optim_config.optim_type={vc.optim_type!r} must equal the policy's "
                             f"{oc.optim_type!r} (one optimizer holds both parameter sets)")
        groups = build_param_groups(model.policy, oc.resolved_weight_decay(), oc.decay_embeddings)
        value_parts = nn.ModuleList([m for m in (model.value_backbone, model.value_head) if m is not None])
        vgroups = build_param_groups(value_parts, vc.resolved_weight_decay(), vc.decay_embeddings)
        scale = vc.peak_lr / oc.peak_lr
        for g in vgroups:
            g.update(group_name="value_" + g["group_name"], lr_scale=scale, betas=vc.resolved_betas(),
                     eps=vc.eps, lr=vc.initial_lr)
            if oc.optim_type == "lion":
                g.pop("eps")
        return build_optimizer(groups + vgroups, oc)

    def policy_for_generation(self, plain: nn.Module) -> nn.Module:
        return plain.policy

    # ----------------------------------------------------------------------------------------- rollout
    def make_rollout_batches(self, prompts: Iterator[dict[str, Any]]) -> list[dict[str, Any]] | None:
        sc = self.stage_config
        self.timer.times.clear()
        batch = next(prompts, None)
        if batch is None:
            return None
        rollout, rewards = self.sample(batch)
        self.rollouts_done += 1
        n = len(rollout)
        stats = self.rollout_summary(rollout, rewards)
        dropped = self.nonfinite_rewards(rewards)             # NaN/inf rewards (nan_policy='skip') are left out
        scores, dense = self._normalised_scores(rollout, rewards, ~dropped)
        finished = torch.tensor(rollout.finished, dtype=torch.bool)
        keep = [i for i in range(n) if not bool(dropped[i])]
        if global_max(self.backend, len(keep)) == 0:
            return []
        micro = []
        for idx, padding in self.micro_batch_indices(keep):
            b = build_sequences([rollout.prompt_ids[i] for i in idx], [rollout.completion_ids[i] for i in idx],
                                self.pad_token_id())
            b["completion_mask"] *= 0.0 if padding else 1.0
            b["units"] = {MAIN: int(b["completion_mask"].sum())}
            b["_scores"], b["_finished"] = scores[idx], finished[idx]
            b["_lengths"] = torch.tensor([len(rollout.completion_ids[i]) for i in idx])
            if dense is not None:
                d = torch.zeros_like(b["completion_mask"])
                for r, i in enumerate(idx):
                    d[r, :dense[i].numel()] = dense[i]
                b["_dense"] = d
            if sc.ptx_coef > 0:
                b.update(self.ptx_batch([rollout.prompt_ids[i] for i in idx], [rollout.answer_ids[i] for i in idx]))
                b["units"]["ptx"] = 0 if padding else self.ptx_units(b)
            micro.append(b)
        self.score_micro_batches(micro, with_values=True)
        stats.update(self._advantages(micro))
        stats["score_mean"] = float(scores[~dropped].mean()) if keep else 0.0
        self.set_rollout_stats(stats)
        return micro

    def _normalised_scores(self, rollout, rewards,
                           valid: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Scores after the missing-EOS penalty and reward normalisation (statistics of the ``valid`` samples);
        dense rewards scaled alike."""
        sc = self.stage_config
        scores = rewards.scores.clone()
        dense = [d.clone() for d in rewards.dense] if rewards.dense is not None else None
        if sc.missing_eos_penalty:
            scores = scores - sc.missing_eos_penalty * (~torch.tensor(rollout.finished, dtype=torch.bool)).float()
        if sc.normalize_rewards:
            moments = masked_moments(scores, valid.float())
            self.backend.all_reduce(moments)
            count = max(float(moments[2]), 1.0)
            mean = float(moments[0]) / count
            var = max(float(moments[1]) / count - mean * mean, 0.0)
            if sc.normalize_method == "running":
                self.reward_stats.update_from_moments(mean, var, float(moments[2]))
                mean, std = self.reward_stats.mean, self.reward_stats.std
            else:
                std = math.sqrt(var + 1e-8)
            scores = (scores - mean) / std
            if dense is not None:
                dense = [d / std for d in dense]
        return scores, dense

    def _whiten(self, micro: list[dict], key: str, shift_mean: bool) -> None:
        """Whiten ``key`` over the masked tokens of every micro-batch on every rank (one set of moments)."""
        moments = sum(masked_moments(b[key], b["completion_mask"]) for b in micro)
        self.backend.all_reduce(moments)
        for b in micro:
            b[key] = whiten_with_moments(b[key], b["completion_mask"], moments, shift_mean=shift_mean)

    def _advantages(self, micro: list[dict]) -> dict[str, float]:
        """Token rewards (KL penalty + score), GAE advantages and returns of every micro-batch; KL statistics."""
        sc = self.stage_config
        beta = self.kl_ctl.value if sc.needs_reference else 0.0
        kl_sum = torch.zeros(3, dtype=torch.float64)          # Σ per-sequence KL, Σ non-score reward, sequences
        for b in micro:
            m = b["completion_mask"]
            ref = b.get("ref_logp", b["old_logp"])
            tok_r, kl = kl_penalized_rewards(b.pop("_scores"), b["old_logp"], ref, m, beta, sc.kl_estimator)
            if "_dense" in b:
                tok_r = tok_r + b.pop("_dense") * m
            b["rewards"] = tok_r
            kl_sum += torch.tensor([float(kl.sum()), float(-beta * kl.sum()), float((m.sum(-1) > 0).sum())],
                                   dtype=torch.float64)
        if sc.whiten_rewards:
            self._whiten(micro, "rewards", shift_mean=False)
        for b in micro:
            m = b["completion_mask"]
            T = m.size(1)
            values = b["old_values"][:, :T]
            lengths, fin = b.pop("_lengths"), b.pop("_finished")
            after_last = b["old_values"].gather(1, lengths.clamp(max=T).unsqueeze(1)).squeeze(1)
            boot = torch.where(fin, torch.zeros_like(after_last), after_last)   # V(s_T) only for truncated rows
            b["advantages"], b["returns"] = gae(b["rewards"], values, m, sc.gamma, sc.lam, bootstrap_values=boot)
            b["old_values"] = values
        if sc.whiten_advantages:
            self._whiten(micro, "advantages", shift_mean=True)
        self.backend.all_reduce(kl_sum)
        seqs = max(float(kl_sum[2]), 1.0)
        mean_kl = float(kl_sum[0]) / seqs
        if sc.needs_reference and sc.adaptive_kl is not None:
            self.kl_ctl.update(mean_kl, int(seqs))
        vals = sum(float((b["old_values"] * b["completion_mask"]).sum()) for b in micro)
        rets = sum(float((b["returns"] * b["completion_mask"]).sum()) for b in micro)
        cnt = max(sum(float(b["completion_mask"].sum()) for b in micro), 1.0)
        return {"kl": mean_kl, "kl_coef": beta, "non_score_reward": float(kl_sum[1]) / seqs,
                "value_mean": vals / cnt, "return_mean": rets / cnt}

    # -------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        sc = self.stage_config
        mask = batch["completion_mask"]
        out = self.policy_logps(model, batch, with_entropy=True, with_values=True)
        T = mask.size(1)
        pg_sum, pm = ppo_policy_loss(out["logp"], batch["old_logp"], batch["advantages"], mask, clip_eps=sc.clip_eps)
        vf_sum, vm = value_loss(out["values"][:, :T], batch["old_values"], batch["returns"], mask,
                                sc.value_clip_eps, sc.huber_delta)
        terms = {MAIN: pg_sum + sc.vf_coef * vf_sum}
        ntok = max(float(mask.sum()), 1.0)
        extra = {"policy_loss": float(pg_sum.detach()) / ntok, "value_loss": float(vf_sum.detach()) / ntok,
                 "clip_frac": float(pm["clip_frac"]), "approx_kl": float(pm["approx_kl"]),
                 "ratio_mean": float(pm["ratio/mean"]), "ratio_max": float(pm["ratio/max"]),
                 "vf_clip_frac": float(vm.get("vf_clip_frac", torch.zeros(()))),
                 "value_error": float(vm["value/error"]),
                 "entropy": float((out["entropy"] * mask).sum()) / ntok}
        if sc.ptx_coef > 0:
            ptx = self.ptx_loss(model, batch)
            terms["ptx"] = sc.ptx_coef * ptx
            extra["ptx_loss"] = float(ptx.detach()) / max(self.ptx_units(batch), 1)
        return LossOutput(loss=terms if len(terms) > 1 else terms[MAIN], aux_loss=out.get("aux_loss"), extra=extra)

    # --------------------------------------------------------------------------------- state / export
    def save_extra_state(self, directory: Path) -> None:
        if self.backend.is_main:
            state = {"kl_ctl": self.kl_ctl.state_dict(), "reward_stats": self.reward_stats.state_dict(),
                     "rollouts_done": self.rollouts_done}
            (Path(directory) / "ppo_state.json").write_text(json.dumps(state))

    def load_extra_state(self, directory: Path) -> None:
        f = Path(directory) / "ppo_state.json"
        if f.is_file():
            state = json.loads(f.read_text())
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            self.reward_stats.load_state_dict(state["reward_stats"])
            self.rollouts_done = int(state.get("rollouts_done", 0))

    def export(self) -> Path | None:
        """``output_dir/final``: the policy as an HF-format folder (LoRA merged); the value model's weights in
        ``output_dir/value_model/model.safetensors``."""
        def write(state: dict, plain: PolicyValueModel, path: Path) -> None:
            from safetensors.torch import save_file
            policy = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
            write_model_folder(policy, self.model_config, path)
            vdir = self.output_dir / "value_model"
            vdir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("policy.")},
                      str(vdir / "model.safetensors"))
            set_default_file_mode(vdir / "model.safetensors")

        return export_model(self.backend, self.model, self.output_dir / "final", self.tokenizer, write=write,
                            adapters=lambda plain: plain.policy)
