"""Settings of the RL stages: GRPO (and its variants) and PPO."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config_io import ConfigMixin, coerce_field
from ..generation import GenerateConfig
from ..losses.policy import GRPO_LOSS_TYPES, KL_ESTIMATORS
from ..validation import check, int_ge, is_num, num_ge, one_of, prob
from .optim import OptimConfig

SCALE_REWARDS = ("group", "batch", "none")


def _check_weights(cfg) -> None:
    if cfg.reward_weights is not None:
        cfg.reward_weights = [float(w) for w in cfg.reward_weights]
        check(all(math.isfinite(w) for w in cfg.reward_weights), f"{type(cfg).__name__}.reward_weights",
              cfg.reward_weights, "must be finite numbers")


@dataclass(kw_only=True)
class GRPOConfig(ConfigMixin):
    """Group relative policy optimisation (Shao et al. 2024) and variants: Dr. GRPO, DAPO, GSPO, CISPO.

    Each prompt gets ``group_size`` completions; advantages are group-normalised. The completion length limit is
    ``generate_config.max_new_tokens``. See docs/rl.md for the loss types and their normalisers."""

    group_size: int = 12
    """Completions sampled per prompt."""
    grpo_epochs: int = 1
    """Passes over each rollout buffer."""
    grpo_batch_size: int | None = None
    """Samples per update micro-batch (None → the whole rollout in one micro-batch)."""
    gradient_accumulation_steps: int | None = None
    """Deprecated alias of TrainConfig.gradient_accumulation_steps (micro-batches per update)."""
    loss_type: str = "grpo"
    """'grpo' (per-sequence token mean), 'bnpo' (micro-batch token mean), 'dr_grpo' (sum / (sequences ·
    max_new_tokens)), 'dapo' (token mean over the accumulation window), 'cispo' (clipped stop-gradient IS weight)."""
    loss_beta: float = 0.04
    """Weight of the KL penalty to the reference (0 → no reference model is loaded)."""
    kl_estimator: str = "k3"
    """Per-token KL estimator of the penalty: 'k3' (gradient follows KL(ref‖π)) or 'k2' (KL(π‖ref)); 'k1' is
    refused as a loss term (its expected gradient is zero)."""
    loss_clip_eps: float = 0.2
    """Lower clip: the ratio is clipped to [1 - loss_clip_eps, 1 + loss_clip_eps_high]."""
    loss_clip_eps_high: float | None = None
    """Upper clip (DAPO clip-higher; None → loss_clip_eps)."""
    loss_delta: float | None = None
    """Cap on the unclipped ratio of negative-advantage tokens (INTELLECT-2; > 1, None → off)."""
    loss_importance_sampling_level: str = "token"
    """'token' (GRPO) or 'sequence' (GSPO; use much smaller eps, e.g. 3e-4/4e-4)."""
    scale_rewards: str | bool = "group"
    """Divide advantages by the reward std of the 'group' (GRPO), the 'batch', or 'none' (Dr. GRPO);
    True/False are accepted for 'group'/'none'."""
    filter_zero_variance_groups: bool = False
    """Drop groups whose rewards are all equal (zero advantage)."""
    dynamic_sampling: bool = False
    """DAPO: re-sample prompts to refill the batch with groups that have signal."""
    dynamic_sampling_max_rounds: int = 3
    """Sampling rounds per rollout with dynamic_sampling."""
    mask_truncated_completions: bool = False
    """Completions cut at max_new_tokens get no loss (DAPO overlong filtering)."""
    chunked_rollout_size: int | None = None
    """Samples decoded at once during a rollout (None → all)."""
    ref_model_weights_path: str | None = None
    """Reference weights (None → a frozen copy of the initial policy; with LoRA, the adapters switched off)."""
    ptx_coef: float = 0.0
    """Weight of the LM loss on prompt + reference answer (pretraining mix, InstructGPT's PPO-ptx)."""
    reward_weights: list[float] | None = None
    """One weight per reward function (None → all 1)."""
    generate_config: GenerateConfig = field(default_factory=GenerateConfig)
    """Sampling settings of the rollouts (max_new_tokens is the completion length limit)."""

    _ALIASES = {"importance_sampling_level": "loss_importance_sampling_level"}

    def __post_init__(self) -> None:
        n = "GRPOConfig"
        coerce_field(self, "generate_config", GenerateConfig)
        int_ge(self, "group_size", 1)
        int_ge(self, "grpo_epochs", 1)
        int_ge(self, "grpo_batch_size", 1, allow_none=True)
        int_ge(self, "gradient_accumulation_steps", 1, allow_none=True)
        one_of(self, "loss_type", tuple(GRPO_LOSS_TYPES))
        num_ge(self, "loss_beta", 0.0)
        one_of(self, "kl_estimator", KL_ESTIMATORS)
        check(not (self.kl_estimator == "k1" and self.loss_beta > 0), f"{n}.kl_estimator", self.kl_estimator,
              "'k1' as a loss term regularises nothing: its expected gradient is E_π[∇log π] = 0, so it only "
              "adds noise; use 'k3' (gradient of KL(ref‖π)) or 'k2' (gradient of KL(π‖ref))")
        num_ge(self, "loss_clip_eps", 0.0, strict=True)
        num_ge(self, "loss_clip_eps_high", 0.0, allow_none=True, strict=True)
        if self.loss_delta is not None:
            check(is_num(self.loss_delta) and self.loss_delta > 1.0, f"{n}.loss_delta", self.loss_delta,
                  "must be > 1 (a cap on the importance ratio) or None")
        one_of(self, "loss_importance_sampling_level", ("token", "sequence"))
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        one_of(self, "scale_rewards", SCALE_REWARDS)
        int_ge(self, "dynamic_sampling_max_rounds", 1)
        check(not (self.dynamic_sampling and self.filter_zero_variance_groups), f"{n}.dynamic_sampling",
              self.dynamic_sampling, "and filter_zero_variance_groups are alternatives; set one")
        int_ge(self, "chunked_rollout_size", 1, allow_none=True)
        num_ge(self, "ptx_coef", 0.0)
        _check_weights(self)

    @property
    def importance_sampling_level(self) -> str:
        return self.loss_importance_sampling_level

    @property
    def clip_eps_high(self) -> float:
        return self.loss_clip_eps if self.loss_clip_eps_high is None else self.loss_clip_eps_high

    @property
    def needs_reference(self) -> bool:
        return self.loss_beta > 0

    @property
    def update_epochs(self) -> int:
        """Passes over each rollout buffer (the RL loop's name for grpo_epochs)."""
        return self.grpo_epochs

    @property
    def update_batch_size(self) -> int | None:
        """Samples per update micro-batch (the RL loop's name for grpo_batch_size)."""
        return self.grpo_batch_size


@dataclass(kw_only=True)
class AdaptiveKLConfig(ConfigMixin):
    """Adaptive KL controller (Ziegler et al. 2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·n_steps/horizon)."""

    target: float = 6.0
    """KL the controller steers towards."""
    horizon: int = 10000
    """Samples over which β may change by the clipped proportional error."""

    def __post_init__(self) -> None:
        num_ge(self, "target", 0.0, strict=True)
        int_ge(self, "horizon", 1)


@dataclass(kw_only=True)
class PPOConfig(ConfigMixin):
    """PPO for LLMs (Ouyang et al. 2022 / Huang et al. 2024 "N+ implementation details")."""

    ppo_epochs: int = 1
    """Passes over each rollout buffer."""
    ppo_batch_size: int | None = None
    """Samples per update micro-batch (None → the whole rollout)."""
    gradient_accumulation_steps: int | None = None
    """Deprecated alias of TrainConfig.gradient_accumulation_steps (micro-batches per update)."""
    ref_model_weights_path: str | None = None
    """Reference weights (None → a frozen copy of the initial policy; with LoRA, the adapters switched off)."""
    value_model_weights_path: str | None = None
    """Value backbone weights (None → the policy's initial weights), with a fresh zero scalar head."""
    value_head_on_policy: bool = False
    """A value head on the policy's final hidden states instead of a separate value model."""
    value_optim_config: OptimConfig | None = None
    """Optimizer settings of the value parameters (lr as a ratio to the policy's schedule; None → the policy's)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """Policy ratio clip."""
    value_clip_eps: float | None = 0.2
    """Value clip around the old values (None → unclipped)."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    kl_beta: float = 0.02
    """KL penalty in the token rewards (r_t = -β·KL_t)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator of the reward penalty: 'k1', 'k2' or 'k3' (in the reward, not differentiated)."""
    adaptive_kl: AdaptiveKLConfig | None = None
    """Make β adaptive (None → fixed)."""
    huber_delta: float | None = 1.0
    """Huber delta of the value loss (None → squared error)."""
    ptx_coef: float = 0.0
    """Weight of the LM loss on prompt + reference answer (InstructGPT's PPO-ptx)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of completions that did not end with a stop token."""
    normalize_rewards: bool = False
    """Normalise scores by their mean and std (see normalize_method)."""
    normalize_method: str = "running"
    """'running' statistics over all rollouts and ranks, or 'batch' (this rollout on all ranks)."""
    whiten_rewards: bool = False
    """Whiten token rewards over the rollout while keeping their mean: (r − μ)/σ + μ (all ranks)."""
    whiten_advantages: bool = True
    """Whiten advantages over the rollout: (A − μ)/σ (all ranks)."""
    chunked_rollout_size: int | None = None
    """Samples decoded at once during a rollout (None → all)."""
    reward_weights: list[float] | None = None
    """One weight per reward function (None → all 1)."""
    generate_config: GenerateConfig = field(default_factory=GenerateConfig)
    """Sampling settings of the rollouts."""

    def __post_init__(self) -> None:
        coerce_field(self, "value_optim_config", OptimConfig)
        coerce_field(self, "adaptive_kl", AdaptiveKLConfig)
        coerce_field(self, "generate_config", GenerateConfig)
        int_ge(self, "ppo_epochs", 1)
        int_ge(self, "ppo_batch_size", 1, allow_none=True)
        int_ge(self, "gradient_accumulation_steps", 1, allow_none=True)
        prob(self, "gamma", hi_inclusive=True)
        prob(self, "lam", hi_inclusive=True)
        num_ge(self, "clip_eps", 0.0, strict=True)
        num_ge(self, "value_clip_eps", 0.0, allow_none=True, strict=True)
        num_ge(self, "vf_coef", 0.0)
        num_ge(self, "kl_beta", 0.0)
        one_of(self, "kl_estimator", KL_ESTIMATORS)
        num_ge(self, "huber_delta", 0.0, allow_none=True, strict=True)
        num_ge(self, "ptx_coef", 0.0)
        num_ge(self, "missing_eos_penalty", 0.0, allow_none=True)
        one_of(self, "normalize_method", ("running", "batch"))
        int_ge(self, "chunked_rollout_size", 1, allow_none=True)
        _check_weights(self)

    @property
    def needs_reference(self) -> bool:
        return self.kl_beta > 0 or self.adaptive_kl is not None

    @property
    def update_epochs(self) -> int:
        """Passes over each rollout buffer (the RL loop's name for ppo_epochs)."""
        return self.ppo_epochs

    @property
    def update_batch_size(self) -> int | None:
        """Samples per update micro-batch (the RL loop's name for ppo_batch_size)."""
        return self.ppo_batch_size


