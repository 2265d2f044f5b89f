"""Qwen3 (dense): like Llama plus an RMSNorm over each head of q and k before RoPE; head_dim comes from
the config rather than hidden_size / num_heads."""

from __future__ import annotations

from typing import ClassVar

from minisgl.models.decoder import CausalLM


class Qwen3ForCausalLM(CausalLM):
    qk_norm: ClassVar[bool] = True
