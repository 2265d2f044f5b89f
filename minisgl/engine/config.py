"""EngineConfig, derived from the worker's BackendConfig, and the one builder of "load the model, size
the KV pool, make the EngineConfig" that the torch and sgl backends share."""

from __future__ import annotations

from typing import Callable

import msgspec
import torch

from minisgl.cache.kv_pool import kv_bytes_per_token
from minisgl.config import BackendConfig
from minisgl.models.config import ModelConfig
from minisgl.models.decoder import CausalLM
from minisgl.models.loader import load_model

MIN_KV_TOKENS = 256  # a pool sized from memory smaller than this is a configuration problem


class EngineConfig(BackendConfig, frozen=True, kw_only=True):
    """The backend's settings plus the model's shape and the pool size, known once the model is loaded."""

    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    kv_tokens: int = 0  # KV pool size in tokens
    model_max_len: int = 4096  # the model's max_position_embeddings

    @property
    def max_context_len(self) -> int:
        """Prompt + generated tokens of one request, at most (before the pool's size caps it)."""
        return self.max_model_len or self.model_max_len

    @classmethod
    def for_model(cls, config: BackendConfig, mc: ModelConfig, kv_tokens: int) -> EngineConfig:
        return cls(**msgspec.structs.asdict(config), num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads,
                   head_dim=mc.head_dim, kv_tokens=kv_tokens, model_max_len=mc.max_position_embeddings)


def load_for_engine(config: BackendConfig, device: torch.device, dtype: torch.dtype | None,
                    kv_tokens_for: Callable[[int], int],
                    prepare: Callable[[CausalLM], object] | None = None) -> tuple[CausalLM, EngineConfig]:
    """Load the model, let `prepare` change it (e.g. pack its linears), then size the KV pool:
    kv_cache_tokens when set, else `kv_tokens_for(bytes per token)` from the device's memory, never more
    than max_running requests of the longest context could use."""
    model = load_model(config.model_path, device, dtype, config.load_format, seed=config.seed)
    if prepare is not None:
        prepare(model)
    mc = model.config
    kv_tokens = config.kv_cache_tokens
    if not kv_tokens:
        per_token = kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, next(model.parameters()).dtype)
        kv_tokens = min(kv_tokens_for(per_token), config.max_running * (config.max_model_len or mc.max_position_embeddings))
        if kv_tokens < MIN_KV_TOKENS:
            raise RuntimeError(f"not enough free {device.type} memory for a KV cache ({kv_tokens} tokens); "
                               "set kv_cache_tokens or free some memory")
    return model, EngineConfig.for_model(config, mc, kv_tokens)
