"""The trainers, all on the one loop of `base.py`. :func:`trainer_class` maps a stage type to its trainer class
(imported on first use, so importing the package stays light)."""
from __future__ import annotations

import importlib

_CLASSES = {"pretrain": ("pretrain", "Trainer"), "sft": ("sft", "SFTTrainer"), "dpo": ("dpo", "DPOTrainer"),
            "reward": ("reward", "RewardTrainer"), "grpo": ("grpo", "GRPOTrainer"), "ppo": ("ppo", "PPOTrainer"),
            "classify": ("classify", "ClassificationTrainer")}
STAGE_TYPES = tuple(_CLASSES)


def trainer_class(stage: str) -> type:
    """The trainer class of a stage type ('pretrain', 'sft', 'dpo', 'reward', 'grpo', 'ppo', 'classify')."""
    if stage not in _CLASSES:
        raise ValueError(f"unknown stage type {stage!r}; one of {STAGE_TYPES}")
    module, name = _CLASSES[stage]
    return getattr(importlib.import_module(f"llm_trainer.trainers.{module}"), name)
