"""`TrainConfig`: everything a trainer needs, with one slot per stage."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..config_io import ConfigMixin, coerce_field
from ..generation import GenerateConfig
from ..model.config import ModelConfig
from ..parallel.ds_config import DsConfig
from ..validation import check, int_ge, is_int, num_ge, one_of
from .optim import DataLoaderConfig, LoRAConfig, LossConfig, OptimConfig
from .rl import GRPOConfig, PPOConfig
from .stages import ClassifyConfig, DPOConfig, PretrainConfig, RewardConfig, SFTConfig

DTYPES = ("auto", "fp32", "bf16", "fp16")
REPORT_TO = ("tensorboard", "wandb")
STAGE_SLOTS = ("pretrain_config", "sft_config", "dpo_config", "reward_config", "grpo_config", "ppo_config",
               "classify_config")


@dataclass(kw_only=True)
class TrainConfig(ConfigMixin):
    """Everything a trainer needs. Intervals count optimizer steps.

    Global batch: supervised stages update on ``batch_size · gradient_accumulation_steps · world_size`` samples
    (pairs for DPO/reward). RL stages collect ``batch_size`` prompts per rank per rollout (× ``group_size``
    completions for GRPO) and update on micro-batches of ``grpo_batch_size``/``ppo_batch_size`` samples,
    ``gradient_accumulation_steps`` of them per update. A trainer reads only its own stage slot
    (``sft_config`` for SFT, ...); another stage's slot being set raises."""

    n_epochs: int = 1
    """Passes over the training data (RL: over the prompts)."""
    batch_size: int = 8
    """Per-process micro-batch (RL: prompts per rank per rollout)."""
    gradient_accumulation_steps: int | None = None
    """Micro-batches per optimizer update (None → the stage config's deprecated field, else 1)."""
    model_config: ModelConfig = field(default_factory=ModelConfig)
    """Architecture of a model built from scratch (an HF-format init_weights_path brings its own)."""
    init_weights_path: str | None = None
    """Our checkpoint or an HF-format folder to start from (None → random init)."""
    file_dataset: Any = None
    """Training data: a path, a list of paths, or a dataset object (not serialised)."""
    dataset_block_size: int | None = None
    """Tokens per row (None → model_config.max_position_embeddings)."""
    eval_file_dataset: Any = None
    """Held-out data evaluated every eval_interval steps (None → no eval loss)."""
    data_loader_config: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    """DataLoader settings."""
    optim_config: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    ds_config: DsConfig | None = field(default_factory=DsConfig)
    """DeepSpeed settings, used when the run is launched with ds_train (None → DeepSpeed defaults)."""
    eval_config: GenerateConfig = field(default_factory=GenerateConfig)
    """Sampling settings of the sample generations from eval_prompts."""
    save_interval: int | None = 100
    """Checkpoint every N optimizer steps (None → only at the end)."""
    eval_interval: int | None = 100
    """Evaluate every N optimizer steps (None → only at the end)."""
    log_interval: int = 10
    """Log metrics every N optimizer steps."""
    eval_batches: int | None = None
    """Batches of eval_file_dataset per evaluation (None → all)."""
    gradient_checkpointing: bool | int | list[int] = False
    """Recompute activations in the backward pass to save memory: True (every block), an int k (every k-th block)
    or a list of block indices (negative count from the end)."""
    pretrain_config: PretrainConfig | None = None
    """Settings of Trainer (pretraining)."""
    sft_config: SFTConfig | None = None
    """Settings of SFTTrainer."""
    dpo_config: DPOConfig | None = None
    """Settings of DPOTrainer."""
    ppo_config: PPOConfig | None = None
    """Settings of PPOTrainer."""
    grpo_config: GRPOConfig | None = None
    """Settings of GRPOTrainer."""
    reward_config: RewardConfig | None = None
    """Settings of RewardTrainer."""
    classify_config: ClassifyConfig | None = None
    """Settings of ClassificationTrainer."""
    loss_config: LossConfig = field(default_factory=LossConfig)
    """Loss options shared by the LM trainers."""
    lora: LoRAConfig | None = None
    """Train LoRA adapters instead of every weight (None → full fine-tuning)."""
    output_dir: str = "runs/train"
    """Checkpoints, metrics.jsonl, samples and the final export (output_dir/final)."""
    tokenizer: str | None = None
    """tokenizer.json or a folder holding it (None → no text I/O: no sample generations)."""
    chat_template: str | None = None
    """The chat template to use: a named template of the tokenizer folder, a built-in ('chatml', 'llama3', 'plain')
    or Jinja source (None → the folder's default: the model's own template)."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template, e.g. {"enable_thinking": False}; they reach every prompt the trainer
    renders (evaluation prompts, generation)."""
    seed: int = 42
    """Seeds model init, data order, dropout and sampling."""
    dtype: str = "auto"
    """'fp32', 'bf16', 'fp16' or 'auto' (bf16 on a GPU that supports it, else fp32)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None → n_epochs)."""
    resume_from: str | None = None
    """None (start fresh), 'auto' (the newest intact checkpoint in output_dir, fresh if none) or a checkpoint path."""
    overwrite_output_dir: bool = False
    """Start fresh in an output_dir that holds an earlier run (its checkpoints and metrics are deleted); without it
    such a run is refused."""
    reshard_on_resume: bool = False
    """Allow resuming a checkpoint written with another world size or batch size: the data position is re-sharded
    by global sample index (up to one global batch is seen twice; torch backends only)."""
    keep_last_checkpoints: int | None = 2
    """Checkpoints kept in output_dir (None → all)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm (None → no clipping; the norm is still logged)."""
    nan_policy: str = "stop"
    """'stop' raises on a non-finite loss; 'skip' skips the update (and counts it)."""
    report_to: list[str] = field(default_factory=list)
    """Also log to 'tensorboard' and/or 'wandb'."""
    run_name: str | None = None
    """Name of the run in TensorBoard / W&B."""

    _ALIASES = {"eval_batch_interval": "eval_interval"}

    def __post_init__(self) -> None:
        n = "TrainConfig"
        for name, cls in (("model_config", ModelConfig), ("data_loader_config", DataLoaderConfig),
                          ("optim_config", OptimConfig), ("ds_config", DsConfig), ("eval_config", GenerateConfig),
                          ("pretrain_config", PretrainConfig), ("sft_config", SFTConfig), ("dpo_config", DPOConfig),
                          ("ppo_config", PPOConfig), ("grpo_config", GRPOConfig), ("reward_config", RewardConfig),
                          ("classify_config", ClassifyConfig), ("loss_config", LossConfig), ("lora", LoRAConfig)):
            coerce_field(self, name, cls)
        int_ge(self, "n_epochs", 1)
        int_ge(self, "batch_size", 1)
        int_ge(self, "gradient_accumulation_steps", 1, allow_none=True)
        for slot in STAGE_SLOTS:
            stage = getattr(self, slot)
            alias = getattr(stage, "gradient_accumulation_steps", None)
            check(alias is None or self.gradient_accumulation_steps in (None, alias),
                  f"{n}.{slot}.gradient_accumulation_steps", alias,
                  f"conflicts with TrainConfig.gradient_accumulation_steps={self.gradient_accumulation_steps} "
                  f"(set it in one place: TrainConfig)")
        gc = self.gradient_checkpointing
        check(isinstance(gc, bool) or (is_int(gc) and gc >= 1) or
              (isinstance(gc, (list, tuple)) and all(is_int(i) for i in gc)), f"{n}.gradient_checkpointing", gc,
              "must be a bool, an int k >= 1 (every k-th block) or a list of block indices")
        if isinstance(gc, tuple):
            self.gradient_checkpointing = list(gc)
        int_ge(self, "dataset_block_size", 2, allow_none=True)
        max_pos = getattr(self.model_config, "max_position_embeddings", None)
        if self.dataset_block_size is not None and is_int(max_pos):
            check(self.dataset_block_size <= max_pos, f"{n}.dataset_block_size", self.dataset_block_size,
                  f"must be <= model_config.max_position_embeddings ({max_pos})")
        int_ge(self, "save_interval", 1, allow_none=True)
        int_ge(self, "eval_interval", 1, allow_none=True)
        int_ge(self, "log_interval", 1)
        int_ge(self, "eval_batches", 1, allow_none=True)
        check(isinstance(self.output_dir, (str, os.PathLike)) and str(self.output_dir) != "",
              f"{n}.output_dir", self.output_dir, "must be a non-empty path")
        self.output_dir = str(self.output_dir)
        check(is_int(self.seed), f"{n}.seed", self.seed, "must be an int")
        one_of(self, "dtype", DTYPES)
        int_ge(self, "max_steps", 1, allow_none=True)
        if self.resume_from is not None:
            self.resume_from = str(self.resume_from)
            check(self.resume_from != "", f"{n}.resume_from", self.resume_from, "must be None, 'auto' or a path")
        int_ge(self, "keep_last_checkpoints", 1, allow_none=True)
        num_ge(self, "max_grad_norm", 0.0, allow_none=True, strict=True)
        one_of(self, "nan_policy", ("stop", "skip"))
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        self.report_to = list(self.report_to or [])
        for r in self.report_to:
            check(r in REPORT_TO, f"{n}.report_to", self.report_to, f"entries must be in {REPORT_TO}")

    @property
    def block_size(self) -> int | None:
        """``dataset_block_size`` or, when None, the model's ``max_position_embeddings``."""
        if self.dataset_block_size is not None:
            return self.dataset_block_size
        return getattr(self.model_config, "max_position_embeddings", None)

    def stage_config(self, slot: str, trainer: str) -> Any:
        """The config in ``slot`` (a default one when unset) for ``trainer``; raises when another stage's slot
        is set, since that trainer would silently ignore it."""
        others = [s for s in STAGE_SLOTS if s != slot and getattr(self, s) is not None]
        check(not others, f"TrainConfig.{others[0] if others else slot}", "set",
              f"belongs to another stage: {trainer} reads only TrainConfig.{slot} and would ignore it; move its "
              f"settings to {slot} or clear it")
        value = getattr(self, slot)
        return value if value is not None else _SLOT_CLASSES[slot]()

    def accumulation_steps(self, stage_config: Any = None) -> int:
        """Micro-batches per optimizer update: this config's value, else the stage config's deprecated alias,
        else 1."""
        if self.gradient_accumulation_steps is not None:
            return self.gradient_accumulation_steps
        alias = getattr(stage_config, "gradient_accumulation_steps", None)
        return alias if alias is not None else 1


_SLOT_CLASSES = {"pretrain_config": PretrainConfig, "sft_config": SFTConfig, "dpo_config": DPOConfig,
                 "reward_config": RewardConfig, "grpo_config": GRPOConfig, "ppo_config": PPOConfig,
                 "classify_config": ClassifyConfig}

