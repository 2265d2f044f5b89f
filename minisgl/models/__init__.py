"""Our own model code: Llama, Qwen2 and Qwen3 decoders, their registry, and the weight loader.

Layered bottom-up: `config.py` (ModelConfig) <- `layers.py`, `decoder.py` and the model classes <-
`registry.py` <- `weights.py` (reading checkpoint tensors) <- `loader.py` and `sharding.py` (a TP rank's
shard). Checkpoint files themselves (the embedded model, the Hub) are `minisgl.assets`.
"""

from minisgl.models.config import ModelConfig
from minisgl.models.weights import load_config
from minisgl.models.context import DenseContext, ForwardContext
from minisgl.models.decoder import CausalLM
from minisgl.models.loader import load_model
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
