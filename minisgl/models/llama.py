"""Llama family (Llama 2/3, SmolLM, Mistral-style dense models): the plain decoder."""

from __future__ import annotations

from minisgl.models.decoder import CausalLM


class LlamaForCausalLM(CausalLM):
    pass
