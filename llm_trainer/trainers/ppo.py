"""`PPOTrainer`: PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022; Huang et al. 2024, "The N+
implementation details of RLHF with PPO") on the shared loop, with the rollout engine of `rollout.py`.

Per rollout (``batch_size`` prompts per rank, one completion each):

1. generate; score with the reward sources; ``missing_eos_penalty`` is subtracted from the score of completions that
   did not end with a stop token; optional reward normalisation (``normalize_rewards``: 'running' statistics over
   all rollouts and ranks, or 'batch': this rollout on all ranks): ``(score - mean) / std`` (dense rewards are only
   scaled by 1/std);
2. old log-probs and values (policy+value in eval mode), reference log-probs (β > 0 or adaptive KL);
3. token rewards ``r_t = -β KL_t`` (k1/k3 of the old policy vs the reference) plus the score on the last token
   (dense rewards: per token); ``whiten_rewards``: scale-only whitening over the rollout (all ranks);
4. GAE(γ, λ) with, for truncated completions (no stop token), the bootstrap value V(state after the last token);
   returns = A + V_old; ``whiten_advantages``: whitened over the rollout (all ranks);
5. ``ppo_epochs`` passes in micro-batches of ``ppo_batch_size``: ``Σ_t [policy clip loss + vf_coef · value loss]``
   over completion tokens (the loop divides by the window's tokens on all ranks); the value loss is clipped with
   its own ``value_clip_eps`` and is Huber(``huber_delta``) or squared error; ``ptx_coef`` adds the LM loss of
   prompt + reference answer; adaptive β (``adaptive_kl``) is updated after each rollout from the measured KL.

The value model is a separate LM backbone + scalar head (initialised from ``value_model_weights_path``, else from
the policy's initial weights) or, with ``value_head_on_policy=True``, a head on the policy's final hidden states.
Policy and value live in one :class:`PolicyValueModel` (one backend wrap, one optimizer); the value parameters get
their own optimizer group settings from ``value_optim_config`` (lr as a ratio to the policy's schedule, betas,
weight decay, eps). The export (``output_dir/final``) is the policy alone; the value model goes to
``output_dir/value_model/model.safetensors``.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..configs import PPOConfig
from ..losses.rl import (AdaptiveKLController, RunningMeanStd, gae, kl_penalized_rewards, masked_sum,
                         ppo_policy_loss, value_loss)
from ..optim import build_optimizer, build_param_groups
from .base import LossOutput
from .rollout import RLTrainer, build_sequences, completion_logps, disable_stochasticity

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

    @property
    def lm_head(self):
        return getattr(self.policy, "lm_head", None)

    def lm_head_weight(self) -> torch.Tensor:
        return self.policy.lm_head_weight()

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


def huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    a = x.abs()
    return torch.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


def clipped_value_loss(values, old_values, returns, mask, clip_range, huber_delta):
    """``max(ℓ(V - R), ℓ(V_old + clip(V - V_old, ±c) - R))`` summed over the mask, ℓ = Huber(δ) or ½x²."""
    if huber_delta is None:
        return value_loss(values, old_values, returns, mask, clip_range)
    v, ret, m = values.float(), returns.detach().float(), mask.float()
    err = huber(v - ret, huber_delta)
    metrics = {}
    if clip_range is not None:
        old = old_values.detach().float()
        err_c = huber(old + torch.clamp(v - old, -clip_range, clip_range) - ret, huber_delta)
        metrics["vf_clip_frac"] = (((err_c > err).float() * m).sum() / m.sum().clamp(min=1)).detach()
        err = torch.max(err, err_c)
    metrics["value/error"] = ((((v - ret) ** 2) * m).sum() / m.sum().clamp(min=1)).detach()
    return masked_sum(err, m), metrics


class PPOTrainer(RLTrainer):
    """``PPOTrainer(train_config=TrainConfig(ppo_config=PPOConfig(...), ...), reward_func=...).train()``."""

    stage = "ppo"
    loss_unit = "tokens"
    _mb_field = "ppo_batch_size"
    _epochs_field = "ppo_epochs"

    @classmethod
    def _stage_config_of(cls, train_config) -> PPOConfig:
        return train_config.ppo_config or PPOConfig()

    def __init__(self, **kwargs: Any) -> None:
        cfg = kwargs["train_config"]
        sc = self._stage_config_of(cfg)
        self.kl_ctl = AdaptiveKLController(sc.kl_beta, sc.adaptive_kl.target if sc.adaptive_kl else None,
                                           sc.adaptive_kl.horizon if sc.adaptive_kl else 10000)
        self.reward_stats = RunningMeanStd()
        super().__init__(**kwargs)

    @property
    def needs_reference(self) -> bool:
        sc = self.stage_config
        return sc.kl_beta > 0 or sc.adaptive_kl is not None

    # ------------------------------------------------------------------------------------------- model
    def prepare_model(self, model: nn.Module) -> nn.Module:
        sc, cfg = self.stage_config, self.config
        disable_stochasticity(model)
        hidden = self.model_config.hidden_size
        backbone = None
        if not sc.value_head_on_policy:
            from .setup import build_model
            zero3 = getattr(self.backend, "stage", None) == 3
            path = sc.value_model_weights_path
            if path is None and not zero3:
                backbone = copy.deepcopy(model)                    # the policy's initial weights
            else:
                vcfg = copy.copy(cfg)
                vcfg.lora = None
                backbone = build_model(vcfg, self.model_config, self.backend,
                                       weights_path=path if path is not None else cfg.init_weights_path)
            disable_stochasticity(backbone)
            if getattr(backbone, "lm_head", None) is not None:
                backbone.lm_head.requires_grad_(False)            # unused by the value function
        with self.backend.model_init_context():
            head = nn.Linear(hidden, 1)
        dtype = next(model.parameters()).dtype
        if not hasattr(head.weight, "ds_id"):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            head.to(dtype)
        return PolicyValueModel(model, backbone, head)

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

    def policy_module(self, plain: nn.Module) -> nn.Module:
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
        stats = self.rollout_stats(rollout, rewards)
        scores = rewards.scores.clone()
        dense = [d.clone() for d in rewards.dense] if rewards.dense is not None else None
        finished = torch.tensor(rollout.finished, dtype=torch.bool)
        if sc.missing_eos_penalty:
            scores = scores - sc.missing_eos_penalty * (~finished).float()
        if sc.normalize_rewards:
            mean, var = self._global_moments(scores)
            if sc.normalize_method == "running":
                self.reward_stats.update_from_moments(mean, var, float(self.sync_count(n, "sum")))
                mean, std = self.reward_stats.mean, self.reward_stats.std
            else:
                std = math.sqrt(var + 1e-8)
            scores = (scores - mean) / std
            if dense is not None:
                dense = [d / std for d in dense]
        chunks = self.split_micro_batches(n, list(range(n)))
        micro = []
        for idx in chunks:
            dummy = bool(idx) and idx[0] == -1
            idx = idx[1:] if dummy else idx
            b = build_sequences([rollout.prompt_ids[i] for i in idx], [rollout.completion_ids[i] for i in idx],
                                self.pad_token_id())
            if dummy:
                b["completion_mask"].zero_()
            b["units"] = int(b["completion_mask"].sum())
            b["_scores"] = scores[idx]
            b["_lengths"] = torch.tensor([len(rollout.completion_ids[i]) for i in idx])
            b["_finished"] = finished[idx]
            if dense is not None:
                T = b["completion_mask"].size(1)
                d = torch.zeros(len(idx), T)
                for r, i in enumerate(idx):
                    d[r, :dense[i].numel()] = dense[i]
                b["_dense"] = d
            if sc.ptx_coef > 0:
                b.update(self.ptx_tensors([rollout.prompt_ids[i] for i in idx],
                                          [rollout.answer_ids[i] for i in idx]))
            micro.append(b)
        self.score_micro_batches(micro, with_values=True)

        beta = self.kl_ctl.value if self.needs_reference else 0.0
        kl_sum = torch.zeros(3, dtype=torch.float64)          # Σ per-sequence KL, Σ non-score reward, sequences
        for b in micro:
            m = b["completion_mask"]
            ref = b.get("ref_logp", b["old_logp"])
            tok_r, kl = kl_penalized_rewards(b["_scores"], b["old_logp"], ref, m, beta, sc.kl_estimator)
            if "_dense" in b:
                tok_r = tok_r + b.pop("_dense") * m
            b["rewards"] = tok_r
            rows = m.sum(-1) > 0
            kl_sum += torch.tensor([float(kl.sum()), float(-beta * kl.sum()), float(rows.sum())], dtype=torch.float64)
        if sc.whiten_rewards:
            self._whiten(micro, "rewards", shift_mean=False)
        for b in micro:
            m = b["completion_mask"]
            T = m.size(1)
            values = b["old_values"][:, :T]
            lengths, fin = b.pop("_lengths"), b.pop("_finished")
            after_last = b["old_values"].gather(1, lengths.clamp(max=T).unsqueeze(1)).squeeze(1)
            boot = torch.where(fin, torch.zeros_like(after_last), after_last)   # V(s_T) only for truncated rows
            adv, ret = gae(b["rewards"], values, m, sc.gamma, sc.lam, bootstrap_values=boot)
            b["advantages"], b["returns"], b["old_values"] = adv, ret, values
            b.pop("_scores")
        if sc.whiten_advantages:
            self._whiten(micro, "advantages", shift_mean=True)
        self.backend.all_reduce(kl_sum)
        seqs = max(float(kl_sum[2]), 1.0)
        mean_kl = float(kl_sum[0]) / seqs
        stats.update({"kl": mean_kl, "kl_coef": beta, "non_score_reward": float(kl_sum[1]) / seqs,
                      "score_mean": float(scores.mean()) if n else 0.0})
        vals, rets, cnt = 0.0, 0.0, 0.0
        for b in micro:
            m = b["completion_mask"]
            vals += float((b["old_values"] * m).sum())
            rets += float((b["returns"] * m).sum())
            cnt += float(m.sum())
        stats["value_mean"] = vals / max(cnt, 1.0)
        stats["return_mean"] = rets / max(cnt, 1.0)
        if self.needs_reference and sc.adaptive_kl is not None:
            self.kl_ctl.update(mean_kl, int(seqs))
        for k, v in self.timer.times.items():
            stats[f"time/{k}"] = v
        for b in micro:
            b["stats"] = stats
        return micro

    def _global_moments(self, x: torch.Tensor) -> tuple[float, float]:
        t = torch.tensor([float(x.sum()), float((x.double() ** 2).sum()), float(x.numel())], dtype=torch.float64)
        self.backend.all_reduce(t)
        n = max(float(t[2]), 1.0)
        mean = float(t[0]) / n
        return mean, max(float(t[1]) / n - mean * mean, 0.0)

    def _whiten(self, micro: list[dict], key: str, shift_mean: bool) -> None:
        """Whiten ``key`` over the masked tokens of every micro-batch on every rank (one set of moments)."""
        t = torch.zeros(3, dtype=torch.float64)
        for b in micro:
            m = b["completion_mask"].double()
            x = b[key].double()
            t += torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()])
        self.backend.all_reduce(t)
        n = max(float(t[2]), 1.0)
        mean = float(t[0]) / n
        var = max(float(t[1]) / n - mean * mean, 0.0) * (n / max(n - 1.0, 1.0))
        for b in micro:
            x = (b[key] - mean) / math.sqrt(var + 1e-8)
            if not shift_mean:
                x = x + mean
            b[key] = x * b["completion_mask"]

    # -------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        sc = self.stage_config
        mask = batch["completion_mask"]
        plain = self.backend.unwrap(model)
        out = completion_logps(model, batch, self.temperature, with_entropy=True, plain=plain.policy,
                               with_values=True)
        T = mask.size(1)
        pg_sum, pm = ppo_policy_loss(out["logp"], batch["old_logp"], batch["advantages"], mask, clip_eps=sc.clip_eps)
        vf_sum, vm = clipped_value_loss(out["values"][:, :T], batch["old_values"], batch["returns"], mask,
                                        sc.value_clip_eps, sc.huber_delta)
        loss = pg_sum + sc.vf_coef * vf_sum
        ntok = max(float(mask.sum()), 1.0)
        extra = {"policy_loss": float(pg_sum.detach()) / ntok, "value_loss": float(vf_sum.detach()) / ntok,
                 "clip_frac": float(pm["clip_frac"]), "approx_kl": float(pm["approx_kl"]),
                 "ratio_mean": float(pm["ratio/mean"]), "ratio_max": float(pm["ratio/max"]),
                 "vf_clip_frac": float(vm.get("vf_clip_frac", torch.zeros(()))),
                 "value_error": float(vm["value/error"]),
                 "entropy": float((out["entropy"] * mask).sum()) / ntok}
        if sc.ptx_coef > 0:
            ptx = self.ptx_loss(model, batch)
            loss = loss + sc.ptx_coef * ptx * float(batch["units"])
            extra["ptx_loss"] = float(ptx.detach())
        extra.update(batch.get("stats", {}))
        return LossOutput(loss=loss, aux_loss=out.get("aux_loss"), extra=extra)

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
        from ..model.hf import save_pretrained
        from ..model.lora import has_lora, save_lora
        from .setup import merge_lora_state, new_model_for_export
        state = self.backend.full_state_dict(self.model)
        if not self.backend.is_main:
            return None
        plain = self.backend.unwrap(self.model)
        policy = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
        value = {k: v for k, v in state.items() if not k.startswith("policy.")}
        path = self.output_dir / "final"
        if has_lora(plain.policy):
            save_lora(plain.policy, self.output_dir / "lora_adapter")
            policy = merge_lora_state(policy, plain.policy)
        save_pretrained(new_model_for_export(self.model_config), path, state_dict=policy)
        if self.tokenizer is not None:
            self.tokenizer.save(path)
        from safetensors.torch import save_file
        vdir = self.output_dir / "value_model"
        vdir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in value.items()}, str(vdir / "model.safetensors"))
        return path
