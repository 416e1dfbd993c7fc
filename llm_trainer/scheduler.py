"""Learning-rate schedule: linear warmup, then cosine annealing to ``min_lr`` with optional warm restarts.

The lr is a pure function of the step (`lr_at`), so a resumed run reproduces it exactly: the scheduler's whole
state is the number of optimizer updates done. ``step`` below is that number, i.e. the index of the update about
to be applied: update 0 uses ``initial_lr``; update ``warmup_iters`` is the first at ``max_lr``.

    step < W:            lr = initial + (max − initial)·step/W
    t = step − W ≥ 0:    cycle k has length T_k = period·mul^k (mul = 1 → all equal; mul = 0 → one cycle);
                         τ = position inside the cycle: lr = min + (max − min)·(1 + cos(π·τ/T_k))/2
                         mul = 0 and t ≥ period → min
    disabled:            lr = initial (constant)

Restarts return to ``max_lr`` without a new warmup (SGDR, Loshchilov & Hutter 2017).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["Schedule", "lr_at", "WarmupCosineScheduler", "schedule_preview"]


@dataclass(frozen=True)
class Schedule:
    """Resolved schedule parameters (no None left). ``period=None`` → constant ``max_lr`` after warmup."""

    enabled: bool
    initial_lr: float
    max_lr: float
    min_lr: float
    warmup_iters: int
    period: int | None
    period_mul: float

    @classmethod
    def from_config(cls, optim_config, total_steps: int | None = None) -> "Schedule":
        c = optim_config
        warmup = c.resolved_warmup_iters(total_steps)
        period = c.cosine_annealing_period
        if period is None and total_steps is not None and c.enable_lr_scheduler:
            period = max(1, total_steps - warmup)
        return cls(enabled=bool(c.enable_lr_scheduler), initial_lr=float(c.initial_lr), max_lr=float(c.peak_lr),
                   min_lr=float(c.final_lr), warmup_iters=int(warmup), period=period,
                   period_mul=float(c.cosine_annealing_period_mul))

    def lr_at(self, step: int) -> float:
        return lr_at(step, self)


def lr_at(step: int, s: Schedule) -> float:
    """The learning rate of update number `step` (0-based) under schedule `s`. Pure."""
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    if not s.enabled:
        return s.initial_lr
    if step < s.warmup_iters:
        return s.initial_lr + (s.max_lr - s.initial_lr) * step / s.warmup_iters
    t = step - s.warmup_iters
    if s.period is None:
        return s.max_lr
    length = float(s.period)
    if s.period_mul == 0:
        if t >= length:
            return s.min_lr
        tau = float(t)
    elif s.period_mul == 1:
        tau = float(t % s.period)
    else:
        tau = float(t)
        while tau >= length:  # cycles grow geometrically: O(log t) iterations
            tau -= length
            length *= s.period_mul
    return s.min_lr + (s.max_lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * tau / length))


class WarmupCosineScheduler:
    """Sets ``lr`` of every param group of `optimizer` to ``lr_at(step)`` (times the group's ``lr_scale`` if it
    has one). Call `step()` after each optimizer update. Interface-compatible with torch's LRScheduler where it
    matters (``step``, ``get_last_lr``, ``state_dict``, ``load_state_dict``, ``last_epoch``).

    ``total_steps`` resolves ``warmup_ratio`` and ``cosine_annealing_period=None`` (one cycle over the run).
    State = ``{"step": n}`` plus the resolved schedule (for a warning when a resumed run's schedule differs).
    """

    def __init__(self, optimizer, optim_config, total_steps: int | None = None, start_step: int = 0):
        self.optimizer = optimizer
        self.schedule = Schedule.from_config(optim_config, total_steps)
        self.step_count = int(start_step)
        self._apply()

    @property
    def last_epoch(self) -> int:
        return self.step_count

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.schedule)

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        s = self.schedule
        return {"step": self.step_count, "schedule": {
            "enabled": s.enabled, "initial_lr": s.initial_lr, "max_lr": s.max_lr, "min_lr": s.min_lr,
            "warmup_iters": s.warmup_iters, "period": s.period, "period_mul": s.period_mul}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("schedule")
        if saved is not None and saved != self.state_dict()["schedule"]:
            warnings.warn(f"WarmupCosineScheduler: resuming with a different schedule than the checkpoint's "
                          f"(saved {saved}, now {self.state_dict()['schedule']}); using the new one",
                          stacklevel=2)
        self.step_count = int(state["step"])
        self._apply()


def schedule_preview(optim_config, total_steps: int) -> list[float]:
    """The lr of each of the first `total_steps` updates (``total_steps`` also resolves ratio/period)."""
    s = Schedule.from_config(optim_config, total_steps)
    return [lr_at(i, s) for i in range(total_steps)]
