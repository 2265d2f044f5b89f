"""Our own model code: Llama, Qwen2 and Qwen3 decoders, their registry, and the weight loader."""

from minisgl.models.context import DenseContext, ForwardContext
from minisgl.models.decoder import CausalLM
from minisgl.models.loader import ModelConfig, load_config, load_model
from minisgl.models.registry import get_model_class, supported_architectures

__all__ = [
    "CausalLM",
    "DenseContext",
    "ForwardContext",
    "ModelConfig",
    "get_model_class",
    "load_config",
    "load_model",
    "supported_architectures",
]
