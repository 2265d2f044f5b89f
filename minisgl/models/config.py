"""ModelConfig: the shape of a decoder, parsed from a checkpoint's config.json.

Apart from the loader so that the model classes, the loader and the sharded loader all import it from
below them (no import circle among models/); whether the architecture is one we run is checked where a
config is read (models/weights.py), which may import the model classes. EOS ids and the context length are not model shape: they
come from `minisgl.assets.checkpoint`, the one reader of those files for every process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minisgl.assets.checkpoint import DEFAULT_CONTEXT
from minisgl.models.layers import RopeScaling


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias
    bos_token_id: int | None
    torch_dtype: torch.dtype
    rope_scaling: RopeScaling | None = None
    mlp_bias: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """From a transformers config dict (config.json)."""
        arch = (d.get("architectures") or [None])[0]
        if arch is None:
            raise ValueError("config has no 'architectures' entry")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (only silu)")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        num_heads = d["num_attention_heads"]
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        dtype_name = d.get("torch_dtype") or d.get("dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=d.get("max_position_embeddings", DEFAULT_CONTEXT),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            torch_dtype=_parse_dtype(dtype_name),
            rope_scaling=_parse_rope_scaling(rope),
            mlp_bias=bool(d.get("mlp_bias", False)),
        )


def _parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def _parse_rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return RopeScaling("linear", factor=float(rope["factor"]))
    if rope_type == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, linear, llama3)")



# The one table of dtype names every backend accepts (DTYPE / --dtype), besides auto.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_named(name: str) -> torch.dtype | None:
    """The torch dtype of a DTYPE setting; None for auto (the loader's choice)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]
