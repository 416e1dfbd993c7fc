"""llm_trainer: pretraining, SFT, DPO, PPO and GRPO for LLMs and VLMs, from one CPU to many GPUs."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, imported lazily so `import llm_trainer` stays fast and optional parts load on use.
_EXPORTS = {
    **{name: "llm_trainer.configs" for name in (
        "TrainConfig", "OptimConfig", "PretrainConfig", "SFTConfig", "DPOConfig", "PPOConfig", "GRPOConfig",
        "RewardConfig", "ClassifyConfig", "KDConfig", "LossConfig", "LoRAConfig", "DataLoaderConfig", "AdaptiveKLConfig")},
    **{name: "llm_trainer.parallel.ds_config" for name in (
        "DsConfig", "DsZero0Config", "DsZero1Config", "DsZero2Config", "DsZero3Config", "DsOffloadConfig",
        "DsFp16Config", "DsBf16Config", "DsActivationCheckpointingConfig", "DsFlopsProfilerConfig")},
    **{name: "llm_trainer.model" for name in ("ModelConfig", "MoEConfig", "RoPEScalingConfig", "LlmModel")},
    "VLMConfig": "llm_trainer.model.vlm",
    "VlmModel": "llm_trainer.model.vlm",
    "VisionConfig": "llm_trainer.model.vision",
    "DefaultPixelValuesProvider": "llm_trainer.images",
    "Tokenizer": "llm_trainer.tokenizer",
    "GenerateConfig": "llm_trainer.generation",
    "generate": "llm_trainer.generation",
    "streaming_generate": "llm_trainer.generation",
    "FileDataset": "llm_trainer.data",
    "Trainer": "llm_trainer.trainers.pretrain",
    "SFTTrainer": "llm_trainer.trainers.sft",
    "DPOTrainer": "llm_trainer.trainers.dpo",
    "RewardTrainer": "llm_trainer.trainers.reward",
    "RewardModel": "llm_trainer.model.reward",
    "ClassificationTrainer": "llm_trainer.trainers.classify",
    "SequenceClassifier": "llm_trainer.model.heads",
    "GRPOTrainer": "llm_trainer.trainers.grpo",
    "PPOTrainer": "llm_trainer.trainers.ppo",
    "run_pipeline": "llm_trainer.pipeline",
    **{name: "llm_trainer.evaluation" for name in (
        "Evaluator", "GenerationTask", "MultipleChoiceTask", "PerplexityTask")},
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llm_trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
