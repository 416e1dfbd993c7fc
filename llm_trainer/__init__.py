"""llm_trainer: pretraining, SFT, DPO, PPO and GRPO for LLMs and VLMs, from one CPU to many GPUs."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, imported lazily so `import llm_trainer` stays fast and optional parts load on use.
_EXPORTS = {
    "ModelConfig": "llm_trainer.model",
    "LlmModel": "llm_trainer.model",
    "Tokenizer": "llm_trainer.tokenizer",
    "GenerateConfig": "llm_trainer.generation",
    "generate": "llm_trainer.generation",
    "streaming_generate": "llm_trainer.generation",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llm_trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
