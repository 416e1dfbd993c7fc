"""Built-in callbacks: early stopping on an evaluation metric, and TensorBoard / Weights & Biases reporting.

``TrainConfig.report_to = ["tensorboard", "wandb"]`` adds :class:`TensorBoardCallback` / :class:`WandbCallback`
automatically (:func:`reporting_callbacks`; an instance passed in ``callbacks=`` takes the place of the automatic
one). ``tensorboard`` and ``wandb`` are optional packages: a reporter whose package is missing warns once and does
nothing. All three run on the main rank only (``Callback.main_process_only``); a stop requested by
:class:`EarlyStopping` on rank 0 is agreed over ranks by the loop, so every rank stops at the same step.

Config files name them by the keys of :data:`BUILTIN_CALLBACKS` (``docs/cli.md``).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from .callbacks import Callback, TrainerControl

__all__ = ["EarlyStopping", "TensorBoardCallback", "WandbCallback", "reporting_callbacks", "BUILTIN_CALLBACKS"]


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a log record (``step`` is the x axis, not a series)."""
    return {k: v for k, v in values.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def config_dict(trainer: Any) -> dict | None:
    """The trainer's TrainConfig as a plain dict (None when it cannot be serialised)."""
    try:
        return trainer.config.to_dict()
    except Exception:  # noqa: BLE001 - configs holding callables/datasets are reported without them
        return None


class EarlyStopping(Callback):
    """Stop training when ``metric`` has not improved for ``patience`` evaluations in a row.

    An evaluation improves on the best value so far when it is lower by more than ``min_delta`` (``mode='min'``)
    or higher by more than ``min_delta`` (``mode='max'``); the first evaluation sets the best. ``metric`` is any key
    the evaluation returns: ``eval_loss`` / ``eval_ppl`` (``eval_file_dataset``) or an evaluator's metric. A
    non-finite value counts as no improvement; an evaluation without the metric is skipped with a warning (once), so
    a misspelt name never stops a run. The state is not checkpointed: a resumed run starts counting afresh."""

    def __init__(self, metric: str = "eval_loss", mode: str = "min", patience: int = 3,
                 min_delta: float = 0.0) -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"EarlyStopping.metric must be a metric name, got {metric!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping.mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"EarlyStopping.patience must be an int >= 1, got {patience!r}")
        if not isinstance(min_delta, (int, float)) or isinstance(min_delta, bool) or not min_delta >= 0 \
                or not math.isfinite(min_delta):
            raise ValueError(f"EarlyStopping.min_delta must be a finite number >= 0, got {min_delta!r}")
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, float(min_delta)
        self.best: float | None = None
        self.best_step: int | None = None
        self.evaluations_without_improvement = 0
        self._warned = False

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return math.isfinite(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_evaluate(self, trainer: Any, control: TrainerControl, metrics: dict[str, Any]) -> None:
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            if not self._warned:
                warnings.warn(f"EarlyStopping: the evaluation has no metric {self.metric!r} (it has "
                              f"{sorted(metrics) or 'none'}); not counting it", stacklevel=2)
                self._warned = True
            return
        if self._improves(float(value)):
            self.best, self.best_step = float(value), trainer.global_step
            self.evaluations_without_improvement = 0
            return
        self.evaluations_without_improvement += 1
        if self.evaluations_without_improvement >= self.patience:
            control.should_stop = True
            trainer.metrics.print(f"early stopping: {self.metric} has not improved on {self.best} (step "
                                  f"{self.best_step}) for {self.patience} evaluation(s)")


class TensorBoardCallback(Callback):
    """Log every logged and evaluated scalar to TensorBoard event files in ``log_dir`` (default
    ``output_dir/tensorboard``), plus the run's config as text. Needs ``tensorboard`` (``pip install tensorboard``)."""

    def __init__(self, log_dir: str | os.PathLike | None = None) -> None:
        self.log_dir = log_dir
        self.writer = None

    def on_train_begin(self, trainer: Any, control: TrainerControl) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("report_to has 'tensorboard' but tensorboard is not installed (pip install tensorboard); "
                          "not logging to TensorBoard", stacklevel=2)
            return
        self.writer = SummaryWriter(log_dir=str(self.log_dir or Path(trainer.output_dir) / "tensorboard"))
        config = config_dict(trainer)
        if config:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def _write(self, values: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in _scalars(values).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()                      # a crashed run keeps what it logged

    def on_log(self, trainer: Any, control: TrainerControl, logs: dict[str, Any]) -> None:
        self._write(logs, int(logs.get("step", trainer.global_step)))

    def on_evaluate(self, trainer: Any, control: TrainerControl, metrics: dict[str, Any]) -> None:
        self._write(metrics, trainer.global_step)

    def on_train_end(self, trainer: Any, control: TrainerControl, results: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbCallback(Callback):
    """Log every logged and evaluated scalar to a Weights & Biases run (project ``project``, else
    ``$WANDB_PROJECT``, else 'llm_trainer'; name ``TrainConfig.run_name``; files under ``output_dir/wandb``; the
    config attached). ``WANDB_MODE=offline`` works without an account. Needs ``wandb`` (``pip install wandb``)."""

    def __init__(self, project: str | None = None) -> None:
        self.project = project
        self.run = None

    def on_train_begin(self, trainer: Any, control: TrainerControl) -> None:
        try:
            import wandb
        except ImportError:
            warnings.warn("report_to has 'wandb' but wandb is not installed (pip install wandb); "
                          "not logging to Weights & Biases", stacklevel=2)
            return
        self.run = wandb.init(project=self.project or os.environ.get("WANDB_PROJECT", "llm_trainer"),
                              name=trainer.config.run_name, config=config_dict(trainer),
                              dir=str(trainer.output_dir), resume="allow" if trainer.resumed_from else None)

    def on_log(self, trainer: Any, control: TrainerControl, logs: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(_scalars(logs), step=int(logs.get("step", trainer.global_step)))

    def on_evaluate(self, trainer: Any, control: TrainerControl, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(_scalars(metrics), step=trainer.global_step)

    def on_train_end(self, trainer: Any, control: TrainerControl, results: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


BUILTIN_CALLBACKS: dict[str, type[Callback]] = {"early_stopping": EarlyStopping, "tensorboard": TensorBoardCallback,
                                                "wandb": WandbCallback}
"""Short names of the built-in callbacks, for config files."""

_REPORTERS = {"tensorboard": TensorBoardCallback, "wandb": WandbCallback}


def reporting_callbacks(report_to: Iterable[str], existing: Sequence[Callback] = ()) -> list[Callback]:
    """The reporting callbacks ``TrainConfig.report_to`` asks for, except those already in ``existing``."""
    return [_REPORTERS[name]() for name in dict.fromkeys(report_to)
            if not any(isinstance(cb, _REPORTERS[name]) for cb in existing)]
