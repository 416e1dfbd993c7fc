"""Settings of the supervised stages: pretraining, SFT (with distillation), DPO, reward models and sequence
classification."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config_io import ConfigMixin, coerce_field
from ..losses.lm import KD_KINDS
from ..losses.preference import PREFERENCE_LOSS_TYPES
from ..validation import check, int_ge, is_num, num_ge, one_of, prob


@dataclass(kw_only=True)
class KDConfig(ConfigMixin):
    """Knowledge distillation: ``loss = (1 - kd_coef)·LM + kd_coef·KD`` against a teacher given either as a
    callable or as a model folder (exactly one)."""

    teacher_logits_provider: Callable | None = None
    """``fn(input_ids, attention_mask) -> logits [B, S, V]`` (not serialisable)."""
    teacher_model_path: str | None = None
    """Our checkpoint or an HF-format folder; built frozen by the backend (partitioned under ZeRO-3)."""
    kd_coef: float = 0.4
    """Weight of the distillation term; 1 - kd_coef weighs the LM cross-entropy."""
    kind: str = "forward_kl"
    """'forward_kl', 'reverse_kl' or 'jsd' (the generalised JSD of GKD, Agarwal et al. 2024)."""
    jsd_beta: float = 0.5
    """GKD's beta for kind='jsd' (0 → forward KL limit, 1 → reverse KL limit)."""
    temperature: float = 1.0
    """Divides student and teacher logits; the divergence is scaled by temperature² (Hinton et al. 2015)."""

    def __post_init__(self) -> None:
        check(self.teacher_logits_provider is None or callable(self.teacher_logits_provider),
              "KDConfig.teacher_logits_provider", self.teacher_logits_provider, "must be callable")
        prob(self, "kd_coef", hi_inclusive=True)
        one_of(self, "kind", KD_KINDS)
        prob(self, "jsd_beta", hi_inclusive=True)
        num_ge(self, "temperature", 0.0, strict=True)
        check(self.teacher_logits_provider is None or self.teacher_model_path is None,
              "KDConfig.teacher_model_path", self.teacher_model_path,
              "cannot be set together with teacher_logits_provider (pick one teacher)")

    def check_teacher(self) -> None:
        """Raise unless exactly one teacher source is set (call when KD is about to be used)."""
        n = (self.teacher_logits_provider is not None) + (self.teacher_model_path is not None)
        check(n == 1, "KDConfig.teacher_logits_provider/teacher_model_path",
              (self.teacher_logits_provider, self.teacher_model_path), "must have exactly one set")


@dataclass(kw_only=True)
class PretrainConfig(ConfigMixin):
    """Pretraining on flat token files."""

    gradient_accumulation_steps: int | None = None
    """Deprecated alias of TrainConfig.gradient_accumulation_steps (a different value in both raises)."""
    kd_config: KDConfig | None = None
    """Distil from a teacher while pretraining (None → plain LM loss)."""
    chunked_cross_entropy_size: int | None = 4096
    """Tokens projected onto the vocabulary at a time (chunked cross-entropy and distillation: no full [B, S, V]
    logits tensor); None → plain CE over full logits."""
    packing: bool = False
    """Attention and positions restart at each EOS inside a block (document masking)."""

    def __post_init__(self) -> None:
        coerce_field(self, "kd_config", KDConfig)
        int_ge(self, "gradient_accumulation_steps", 1, allow_none=True)
        int_ge(self, "chunked_cross_entropy_size", 1, allow_none=True)


@dataclass(kw_only=True)
class SFTConfig(ConfigMixin):
    """Supervised fine-tuning on chat data. Image paths travel with the SFT data itself (``prepare_data
    --image-field``), not in a separate file."""

    mask_prompt: bool = True
    """Train only on assistant tokens (False: on every token)."""
    packing: bool = False
    """Several samples per row with document masking."""
    freeze_llm_model: bool = False
    """VLM: freeze the language model (train the projector / vision tower)."""
    freeze_vision_encoder: bool = False
    """VLM: freeze the vision tower."""
    gradient_accumulation_steps: int | None = None
    """Deprecated alias of TrainConfig.gradient_accumulation_steps (a different value in both raises)."""
    kd_config: KDConfig | None = None
    """Distil from a teacher while fine-tuning (None → plain LM loss)."""
    chunked_cross_entropy_size: int | None = 4096
    """Tokens projected onto the vocabulary at a time (chunked cross-entropy and distillation: no full [B, S, V]
    logits tensor); None → plain CE over full logits."""
    pixel_values_provider: Callable | None = None
    """VLM: ``fn(image_paths) -> Tensor [N, 3, H, W]`` (None → the vision config's default loader)."""

    def __post_init__(self) -> None:
        coerce_field(self, "kd_config", KDConfig)
        int_ge(self, "gradient_accumulation_steps", 1, allow_none=True)
        int_ge(self, "chunked_cross_entropy_size", 1, allow_none=True)
        check(self.pixel_values_provider is None or callable(self.pixel_values_provider),
              "SFTConfig.pixel_values_provider", self.pixel_values_provider, "must be callable")


@dataclass(kw_only=True)
class DPOConfig(ConfigMixin):
    """Direct preference optimisation and variants (maths in :mod:`llm_trainer.losses.preference`)."""

    ref_model_weights_path: str | None = None
    """Reference model weights (None → a frozen copy of the initial policy; with LoRA, the adapters switched off)."""
    mask_prompt: bool = True
    """Score only the response tokens (False: the prompt tokens count in the log-probs too)."""
    gradient_accumulation_steps: int | None = None
    """Deprecated alias of TrainConfig.gradient_accumulation_steps (a different value in both raises)."""
    loss_type: str = "dpo"
    """'dpo' (Rafailov et al. 2023), 'ipo' (Azar et al. 2023), 'hinge' (SLiC), 'robust' (Chowdhury et al. 2024),
    'orpo' (Hong et al. 2024), 'simpo' (Meng et al. 2024); ORPO and SimPO need no reference model."""
    loss_beta: float = 0.1
    """The beta of the loss (ORPO: lambda)."""
    loss_label_smoothing: float = 0.0
    """'dpo': conservative DPO's label noise; 'robust': the preference flip rate. In [0, 0.5)."""
    loss_ipo: bool = False
    """The original library's spelling of loss_type='ipo'."""
    nll_loss_coef: float | None = None
    """Add this times the chosen responses' NLL (RPO); None → 1 for 'orpo' (its definition), else 0."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma."""
    precompute_ref_log_probs: bool = False
    """Score the data with the reference once before training, then free the reference model."""
    skip_bad_pairs: bool = False
    """Skip (and count) pairs with an empty response or identical sides instead of raising."""

    def __post_init__(self) -> None:
        if self.loss_ipo:
            check(self.loss_type in ("dpo", "ipo"), "DPOConfig.loss_ipo", self.loss_ipo,
                  f"conflicts with loss_type={self.loss_type!r}")
            self.loss_type = "ipo"
        one_of(self, "loss_type", PREFERENCE_LOSS_TYPES)
        int_ge(self, "gradient_accumulation_steps", 1, allow_none=True)
        num_ge(self, "loss_beta", 0.0, strict=True)
        v = self.loss_label_smoothing
        check(is_num(v) and 0.0 <= v < 0.5, "DPOConfig.loss_label_smoothing", v, "must be in [0, 0.5)")
        check(v == 0.0 or self.loss_type in ("dpo", "robust"), "DPOConfig.loss_label_smoothing", v,
              f"only applies to loss_type 'dpo' or 'robust' (loss_type={self.loss_type!r})")
        num_ge(self, "nll_loss_coef", 0.0, allow_none=True)
        num_ge(self, "simpo_gamma", 0.0)

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in ("orpo", "simpo")


@dataclass(kw_only=True)
class RewardConfig(ConfigMixin):
    """Reward-model training with the Bradley–Terry loss ``-log σ(r_chosen - r_rejected - margin)``."""

    margin: float = 0.0
    """Constant margin; a per-pair ``margin`` in the data is added to it (Llama 2, Touvron et al. 2023)."""
    gradient_accumulation_steps: int | None = None
    """Deprecated alias of TrainConfig.gradient_accumulation_steps (a different value in both raises)."""
    center_rewards_coef: float | None = None
    """Penalty coef·(r_c + r_r)² keeping rewards centred (None → off)."""

    def __post_init__(self) -> None:
        check(is_num(self.margin), "RewardConfig.margin", self.margin, "must be a finite number")
        int_ge(self, "gradient_accumulation_steps", 1, allow_none=True)
        num_ge(self, "center_rewards_coef", 0.0, allow_none=True)




CLASSIFY_TRAINABLE = ("all", "head", "last_blocks")


@dataclass(kw_only=True)
class ClassifyConfig(ConfigMixin):
    """Sequence classification: a linear head on the last real token's hidden state, trained with (class-weighted)
    cross-entropy; the loss unit is the sample."""

    num_labels: int | None = None
    """Number of classes (None → the training data's meta.json; set it to check the data against it)."""
    label_names: list[str] | None = None
    """Class names in id order (None → the training data's; written to the export's id2label)."""
    class_weights: list[float] | None = None
    """Weight of each class's samples in the loss, sum_i w[y_i]·CE_i over the samples (None → all 1)."""
    trainable: str = "all"
    """What trains besides the head: 'all' (the whole backbone; with TrainConfig.lora its adapters), 'head' (the head
    only) or 'last_blocks' (the last trainable_blocks decoder blocks and the final norm)."""
    trainable_blocks: int = 1
    """Decoder blocks trained when trainable='last_blocks', counted from the top."""
    gradient_accumulation_steps: int | None = None
    """Deprecated alias of TrainConfig.gradient_accumulation_steps (a different value in both raises)."""

    def __post_init__(self) -> None:
        int_ge(self, "num_labels", 1, allow_none=True)
        one_of(self, "trainable", CLASSIFY_TRAINABLE)
        int_ge(self, "trainable_blocks", 1)
        int_ge(self, "gradient_accumulation_steps", 1, allow_none=True)
        if self.label_names is not None:
            self.label_names = [str(n) for n in self.label_names]
            check(len(set(self.label_names)) == len(self.label_names) and self.label_names,
                  "ClassifyConfig.label_names", self.label_names, "must be distinct names")
            check(self.num_labels in (None, len(self.label_names)), "ClassifyConfig.label_names", self.label_names,
                  f"has {len(self.label_names)} names for num_labels={self.num_labels}")
        if self.class_weights is not None:
            self.class_weights = list(self.class_weights)
            check(all(is_num(w) and w >= 0 for w in self.class_weights) and any(self.class_weights),
                  "ClassifyConfig.class_weights", self.class_weights, "must be non-negative numbers, not all 0")
            n = self.num_labels if self.num_labels is not None else \
                (len(self.label_names) if self.label_names is not None else None)
            check(n in (None, len(self.class_weights)), "ClassifyConfig.class_weights", self.class_weights,
                  f"has {len(self.class_weights)} entries for {n} classes")
