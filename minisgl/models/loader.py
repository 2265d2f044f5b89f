"""Building a model and loading its weights: safetensors (streamed), GGUF (dequantized), or dummy weights.

The model is first built on the meta device (no memory, no random init), materialized empty on the
target device in the target dtype, then filled. safetensors and dummy loading need no transformers
model class; GGUF goes through transformers' GGUF reader, which needs one for its name mapping.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minisgl.models.config import ModelConfig
from minisgl.models.decoder import CausalLM
from minisgl.models.registry import get_model_class
from minisgl.models.weights import open_checkpoint


@torch.no_grad()
def init_dummy_weights(model: CausalLM, seed: int = 0) -> None:
    """Random weights, reproducible for a seed and device: N(0, 0.02) like a fresh transformers model,
    norms 1 and biases 0 so activations keep a realistic scale."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            if param.device not in generators:
                generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.normal_(0.0, 0.02, generator=generators[param.device])


def build_empty_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """The model on `device` in `dtype` with uninitialized parameters (no wasted random init)."""
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.init_buffers()
    return model


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    load_format: str = "auto",
    seed: int = 0,
) -> CausalLM:
    """Loads a checkpoint directory. dtype None: the config's torch_dtype on CUDA, float32 elsewhere.
    load_format: auto (safetensors, else .gguf), safetensors, gguf, dummy (config.json only)."""
    model_dir = Path(model_dir)
    device = torch.device(device)
    from minisgl.distributed.group import get_tp

    tp = get_tp()
    if tp is not None and tp.world > 1:  # a tensor-parallel rank: load only its shard
        from minisgl.models.sharding import load_sharded_model

        return load_sharded_model(model_dir, device, dtype, load_format, seed, tp)
    _, config, tensors = open_checkpoint(model_dir, load_format)
    if dtype is None:
        dtype = config.torch_dtype if device.type == "cuda" else torch.float32
    model = build_empty_model(config, device, dtype)
    if tensors is None:
        init_dummy_weights(model, seed)
    else:
        model.load_weights(tensors)
    model.requires_grad_(False)
    return model.eval()
