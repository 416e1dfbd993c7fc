"""Optimizer, data-loader, loss and LoRA settings shared by every trainer."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config_io import ConfigMixin
from ..validation import check, int_ge, is_int, is_num, num_ge, one_of, prob

OPTIM_TYPES = ("adam", "adamw", "lion")
OPTIM_STATE_DTYPES = ("fp32", "bf16")
_SCHEDULE_FIELDS = ("max_lr", "min_lr", "warmup_iters", "warmup_ratio", "cosine_annealing_period")


@dataclass(kw_only=True)
class DataLoaderConfig(ConfigMixin):
    """torch DataLoader settings. Shuffling is done by our sampler (never passed to DataLoader as `shuffle`)."""

    num_workers: int = 0
    """Worker processes that read and collate batches (0: in the training process)."""
    pin_memory: bool = False
    """Page-locked host memory for faster copies to a GPU."""
    shuffle: bool = True
    """Shuffle the training samples each epoch (a seeded, resumable permutation)."""
    drop_last: bool = True
    """Drop each epoch's last incomplete accumulation window (the original library always did)."""

    _ALIASES = {"data_loader_shuffle": "shuffle", "data_loader_num_workers": "num_workers",
                "data_loader_pin_memory": "pin_memory", "data_loader_drop_last": "drop_last"}

    def __post_init__(self) -> None:
        int_ge(self, "num_workers", 0)


@dataclass(kw_only=True)
class OptimConfig(ConfigMixin):
    """Optimizer and learning-rate schedule.

    Schedule (``enable_lr_scheduler=True``), with ``step`` = number of optimizer updates already done:
    linear warmup ``initial_lr → max_lr`` over ``warmup_iters`` updates (update 0 uses ``initial_lr``), then
    cosine ``max_lr → min_lr`` over ``cosine_annealing_period`` updates, with restarts:
    ``cosine_annealing_period_mul = 0``: one cycle, then ``min_lr`` forever; ``= 1``: equal cycles;
    ``> 1``: cycle k lasts ``period · mul**k`` (SGDR). Values in (0, 1) are rejected.
    ``enable_lr_scheduler=False`` → constant ``initial_lr``.
    Weight decay applies to ≥2-D weights except embedding tables (see ``decay_embeddings``); never to biases
    and norm weights.
    """

    optim_type: str = "adam"
    """'adam' and 'adamw' both mean AdamW (decoupled weight decay); 'lion' is Lion (Chen et al. 2023)."""
    initial_lr: float = 1e-4
    """Learning rate of update 0 (the constant rate when the schedule is off)."""
    max_lr: float | None = None
    """Peak rate after warmup (None → initial_lr)."""
    min_lr: float | None = None
    """Floor of the cosine decay (None → 0.1 · max_lr)."""
    warmup_iters: int | None = None
    """Warmup updates (None → warmup_ratio · total steps, or 0)."""
    warmup_ratio: float | None = None
    """Warmup as a fraction of the total steps; only when warmup_iters is None."""
    weight_decay: float | None = None
    """Decoupled weight decay (None → 0.01 for AdamW, 0.0 for Lion)."""
    decay_embeddings: bool = False
    """Apply weight decay to embedding tables too."""
    betas: tuple[float, float] | None = None
    """(beta1, beta2) (None → (0.9, 0.95) for AdamW, (0.9, 0.99) for Lion)."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    enable_lr_scheduler: bool | None = None
    """Warmup + cosine schedule; False → constant initial_lr; None → on exactly when a schedule field (max_lr,
    min_lr, warmup_iters, warmup_ratio, cosine_annealing_period) is set. False with a schedule field set raises."""
    cosine_annealing_period: int | None = None
    """Updates per cosine cycle (None → one cycle over the rest of training)."""
    cosine_annealing_period_mul: float = 0
    """0: one cycle then min_lr; 1: equal restarts; > 1: each cycle `mul` times longer (SGDR)."""
    auto_optimize_optimizer: bool = True
    """Use fused/foreach optimizer kernels where supported (CUDA)."""
    state_dtype: str = "fp32"
    """Dtype of the optimizer's moment buffers: 'fp32' or 'bf16' (halves Adam/Lion state; updates still fp32)."""

    def __post_init__(self) -> None:
        n = "OptimConfig"
        one_of(self, "optim_type", OPTIM_TYPES)
        one_of(self, "state_dtype", OPTIM_STATE_DTYPES)
        schedule = [f for f in _SCHEDULE_FIELDS if getattr(self, f) is not None]
        if self.enable_lr_scheduler is None:
            self.enable_lr_scheduler = bool(schedule)
        check(self.enable_lr_scheduler or not schedule, f"{n}.enable_lr_scheduler", self.enable_lr_scheduler,
              f"is False but {', '.join(schedule)} {'is' if len(schedule) == 1 else 'are'} set and would be ignored "
              f"(the rate would stay at initial_lr); leave enable_lr_scheduler unset or True, or drop them")
        num_ge(self, "initial_lr", 0.0)
        if not self.enable_lr_scheduler:
            check(self.initial_lr > 0, f"{n}.initial_lr", self.initial_lr, "must be > 0 when the scheduler is off")
        num_ge(self, "max_lr", 0.0, allow_none=True, strict=True)
        num_ge(self, "min_lr", 0.0, allow_none=True)
        max_lr = self.initial_lr if self.max_lr is None else self.max_lr
        if self.max_lr is not None:
            check(self.max_lr >= self.initial_lr, f"{n}.max_lr", self.max_lr,
                  f"must be >= initial_lr ({self.initial_lr})")
        if self.min_lr is not None:
            check(self.min_lr <= max_lr, f"{n}.min_lr", self.min_lr, f"must be <= max_lr ({max_lr})")
        int_ge(self, "warmup_iters", 0, allow_none=True)
        if self.warmup_ratio is not None:
            prob(self, "warmup_ratio")
            check(self.warmup_iters is None, f"{n}.warmup_ratio", self.warmup_ratio,
                  "cannot be set together with warmup_iters")
        num_ge(self, "weight_decay", 0.0, allow_none=True)
        if self.betas is not None:
            b = self.betas = tuple(self.betas)
            check(len(b) == 2 and all(is_num(x) and 0.0 <= x < 1.0 for x in b), f"{n}.betas", b,
                  "must be two numbers in [0, 1)")
        num_ge(self, "eps", 0.0, strict=True)
        int_ge(self, "cosine_annealing_period", 1, allow_none=True)
        mul = self.cosine_annealing_period_mul
        check(is_num(mul) and (mul == 0 or mul >= 1), f"{n}.cosine_annealing_period_mul", mul,
              "must be 0 (single cycle) or >= 1 (1: equal restarts, 2: doubling)")

    @property
    def peak_lr(self) -> float:
        return self.initial_lr if self.max_lr is None else self.max_lr

    @property
    def final_lr(self) -> float:
        return 0.1 * self.peak_lr if self.min_lr is None else self.min_lr

    def resolved_betas(self) -> tuple[float, float]:
        if self.betas is not None:
            return tuple(self.betas)
        return (0.9, 0.99) if self.optim_type == "lion" else (0.9, 0.95)

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return 0.0 if self.optim_type == "lion" else 0.01

    def resolved_warmup_iters(self, total_steps: int | None = None) -> int:
        if self.warmup_iters is not None:
            return self.warmup_iters
        if self.warmup_ratio is not None and total_steps:
            return int(round(self.warmup_ratio * total_steps))
        return 0


@dataclass(kw_only=True)
class LossConfig(ConfigMixin):
    """Loss options shared by the LM trainers."""

    critical_tokens: list[int] | None = None
    """Token ids whose cross-entropy is multiplied by critical_token_weight."""
    critical_token_weight: float = 1.0
    """Weight of the critical tokens' cross-entropy (the loss is still normalised by the token count)."""
    moe_aux_loss_coef: float | None = None
    """Override of the model's ``MoEConfig.aux_loss_coef`` (load balancing) for this run; None → the model's."""
    moe_z_loss_coef: float | None = None
    """Override of the model's ``MoEConfig.z_loss_coef`` (router z-loss) for this run; None → the model's."""

    def __post_init__(self) -> None:
        if self.critical_tokens is not None:
            self.critical_tokens = list(self.critical_tokens)
            check(all(is_int(t) and t >= 0 for t in self.critical_tokens), "LossConfig.critical_tokens",
                  self.critical_tokens, "must be a list of non-negative token ids")
        num_ge(self, "critical_token_weight", 0.0)
        num_ge(self, "moe_aux_loss_coef", 0.0, allow_none=True)
        num_ge(self, "moe_z_loss_coef", 0.0, allow_none=True)


@dataclass(kw_only=True)
class LoRAConfig(ConfigMixin):
    """LoRA adapters (Hu et al. 2021): ``W + (alpha / r)·B·A`` on linear layers whose name ends with one of
    ``target_modules``; the base weights are frozen."""

    r: int = 8
    """Rank of the adapters."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / r)·B·A."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Suffixes of the linear layers that get adapters."""
    quantize_base: str | None = None
    """QLoRA: store the frozen base linear weights as 'nf4' or 'int8' (needs the ``quant`` extra); None = full."""
    trainable_token_rows_from: int | None = None
    """Vocabulary extension: also train the embedding (and untied head) rows from this token id on, next to the
    adapters (the new tokens' rows; the old rows stay frozen). None → off."""

    def __post_init__(self) -> None:
        int_ge(self, "r", 1)
        if self.quantize_base is not None:
            one_of(self, "quantize_base", ("nf4", "int8"))
        int_ge(self, "trainable_token_rows_from", 0, allow_none=True)
        num_ge(self, "alpha", 0.0, strict=True)
        prob(self, "dropout")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        check(len(self.target_modules) > 0 and all(isinstance(m, str) and m for m in self.target_modules),
              "LoRAConfig.target_modules", self.target_modules, "must be a non-empty list of module names")


