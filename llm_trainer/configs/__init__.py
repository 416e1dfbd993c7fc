"""Training configuration dataclasses.

Every config is a keyword-only dataclass validated in ``__post_init__``; an invalid value raises ``ValueError``
naming ``Class.field`` and the value. Every default constructs (``TrainConfig()`` works), so a config only needs
the fields you want to change. Field names follow the original ``llm_trainer`` (``initial_lr``, ``max_lr``,
``cosine_annealing_period``, ``kd_coef``, ``loss_beta`` ...). Each field is documented by the string under it.

Serialisation (:mod:`llm_trainer.config_io`): ``cfg.to_dict()`` / ``Cls.from_dict(d)`` round-trip nested configs
through plain dicts, so configs can live in TOML or JSON files (``cfg.save(path)`` / ``Cls.load(path)``).
Callables (``KDConfig.teacher_logits_provider``, ``SFTConfig.pixel_values_provider``) and other non-plain objects
(e.g. a dataset object in ``TrainConfig.file_dataset``) are left out of ``to_dict()`` and must be passed again in
code after loading.

``ModelConfig``/``RoPEScalingConfig``/``MoEConfig`` (``llm_trainer.model``), ``GenerateConfig``
(``llm_trainer.generation``) and ``DsConfig`` & friends (``llm_trainer.parallel.ds_config``) live with the code
they configure and are re-exported here.
"""
from __future__ import annotations

from ..config_io import ConfigMixin, dict_to_toml, load_dict
from ..generation import GenerateConfig
from ..model.config import ModelConfig, MoEConfig, RoPEScalingConfig
from ..parallel.ds_config import (DsActivationCheckpointingConfig, DsBf16Config, DsConfig, DsFlopsProfilerConfig,
                                  DsFp16Config, DsOffloadConfig, DsZero0Config, DsZero1Config, DsZero2Config,
                                  DsZero3Config, DsZeROConfig)
from .optim import DataLoaderConfig, LoRAConfig, LossConfig, OptimConfig
from .rl import AdaptiveKLConfig, GRPOConfig, PPOConfig
from .stages import ClassifyConfig, DPOConfig, KDConfig, PretrainConfig, RewardConfig, SFTConfig
from .train import TrainConfig

EvalConfig = GenerateConfig   # the original library's name for the type of ``TrainConfig.eval_config``

__all__ = [
    "AdaptiveKLConfig", "ClassifyConfig", "ConfigMixin", "DPOConfig", "DataLoaderConfig", "EvalConfig", "KDConfig", "LoRAConfig",
    "LossConfig", "OptimConfig", "PPOConfig", "PretrainConfig", "RewardConfig", "SFTConfig", "GRPOConfig",
    "TrainConfig", "dict_to_toml", "load_dict", "ModelConfig", "MoEConfig", "RoPEScalingConfig", "GenerateConfig",
    "DsConfig", "DsZeROConfig", "DsZero0Config", "DsZero1Config", "DsZero2Config", "DsZero3Config",
    "DsOffloadConfig", "DsFp16Config", "DsBf16Config", "DsActivationCheckpointingConfig", "DsFlopsProfilerConfig",
]
