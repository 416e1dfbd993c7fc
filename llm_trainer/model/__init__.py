"""The model layer: config, LlmModel, KV cache, HF-format IO."""
from .cache import KVCache
from .config import ModelConfig, MoEConfig, RoPEScalingConfig, swiglu_intermediate_size
from .hf import load_hf_state_dict
from .llm import LlmModel, ModelOutput

__all__ = [
    "KVCache",
    "LlmModel",
    "ModelConfig",
    "ModelOutput",
    "MoEConfig",
    "RoPEScalingConfig",
    "load_hf_state_dict",
    "swiglu_intermediate_size",
]
