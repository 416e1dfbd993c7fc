"""The model layer: config, LlmModel, VlmModel (+ vision encoder), KV cache, HF-format IO."""
from .cache import KVCache
from .config import ModelConfig, MoEConfig, RoPEScalingConfig, swiglu_intermediate_size
from .hf import load_hf_state_dict
from .llm import LlmModel, ModelOutput
from .vision import VisionConfig, VisionEncoder
from .vlm import VLMConfig, VlmModel

__all__ = [
    "KVCache",
    "LlmModel",
    "ModelConfig",
    "ModelOutput",
    "MoEConfig",
    "RoPEScalingConfig",
    "VLMConfig",
    "VisionConfig",
    "VisionEncoder",
    "VlmModel",
    "load_hf_state_dict",
    "swiglu_intermediate_size",
]
