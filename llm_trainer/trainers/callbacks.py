"""Callbacks: user code hooked into the training loop, with the events users know from `transformers`' and TRL's
``TrainerCallback``.

A callback subclasses :class:`Callback` and overrides the events it needs; each event gets the trainer (read its
``global_step``, ``config``, ``metrics`` ...) and a :class:`TrainerControl` through which it may request a stop, a
checkpoint or an evaluation. Events, in order::

    on_train_begin → [on_rollout_end (RL)] → on_step_begin → on_step_end → [on_log] → [on_evaluate] → [on_save]
    → ... → on_train_end

Rank-aware: a callback runs on the main rank only unless its ``main_process_only`` is False. Requests are agreed
over ranks (any rank's request holds for all), so a stop requested on rank 0 stops every rank at the same step.
Built-in callbacks (early stopping, TensorBoard / W&B reporting): :mod:`.callbacks_builtin`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

__all__ = ["Callback", "TrainerControl", "CallbackList"]


@dataclass
class TrainerControl:
    """Requests a callback can make; the loop acts on them after the event and resets them."""

    should_stop: bool = False
    """Stop training after this step (the final checkpoint, evaluation and export still run)."""
    should_save: bool = False
    """Write a checkpoint after this step."""
    should_evaluate: bool = False
    """Evaluate after this step."""


class Callback:
    """Override any of the ``on_*`` events; the defaults do nothing."""

    main_process_only: bool = True

    def on_train_begin(self, trainer: Any, control: TrainerControl) -> None: ...

    def on_step_begin(self, trainer: Any, control: TrainerControl) -> None: ...

    def on_step_end(self, trainer: Any, control: TrainerControl, stats: dict[str, Any]) -> None: ...

    def on_log(self, trainer: Any, control: TrainerControl, logs: dict[str, Any]) -> None: ...

    def on_evaluate(self, trainer: Any, control: TrainerControl, metrics: dict[str, Any]) -> None: ...

    def on_save(self, trainer: Any, control: TrainerControl, path: Any) -> None: ...

    def on_rollout_end(self, trainer: Any, control: TrainerControl, stats: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Any, control: TrainerControl, results: dict[str, Any]) -> None: ...


class CallbackList:
    """Calls the callbacks that run on this rank, then agrees the control requests over all ranks."""

    def __init__(self, callbacks: Sequence[Callback], backend) -> None:
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be llm_trainer Callback instances, got {type(cb).__name__}")
        self.backend = backend
        self.control = TrainerControl()

    def __call__(self, event: str, trainer: Any, *args: Any) -> TrainerControl:
        """Run ``event`` on every callback of this rank; returns the control agreed over ranks. Collective (every
        rank holds the same callbacks; with none registered nothing is communicated)."""
        if not self.callbacks:
            return self.control
        for cb in self.callbacks:
            if self.backend.is_main or not cb.main_process_only:
                getattr(cb, event)(trainer, self.control, *args)
        flags = torch.tensor([float(getattr(self.control, f.name)) for f in fields(TrainerControl)])
        self.backend.all_reduce(flags, "max")
        for f, v in zip(fields(TrainerControl), flags.tolist()):
            setattr(self.control, f.name, bool(v))
        return self.control

    def reset(self, *names: str) -> None:
        for name in names:
            setattr(self.control, name, False)
