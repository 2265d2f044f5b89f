"""Qwen2 / Qwen2.5: like Llama, but q/k/v always carry a bias and o_proj never does."""

from __future__ import annotations

from typing import ClassVar

from minisgl.models.decoder import CausalLM


class Qwen2ForCausalLM(CausalLM):
    o_proj_bias: ClassVar[bool | None] = False  # config.attention_bias is forced True for Qwen2 by the loader
