"""The one seam between model code and the engine's KV cache.

A model never sees how KV is stored. Each attention layer hands its new q/k/v to the context and gets
the attention output back; the engine's context writes k/v into the paged pool and attends over each
sequence's cached tokens. `DenseContext` is the trivial version (one sequence, no cache) used to check
models against transformers.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ForwardContext(Protocol):
    # Positions in the flattened token dimension whose logits the caller wants (e.g. the last token of
    # each sequence). The model computes the lm_head only there.
    logits_indices: torch.Tensor

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, n_heads, head_dim]; k, v: [T, n_kv_heads, head_dim] (RoPE already applied).
        Returns [T, n_heads, head_dim]. T is every token of every sequence in this step, flattened."""
        ...


class DenseContext:
    """Single sequence, full causal attention, no KV cache: for correctness checks."""

    def __init__(self, num_tokens: int, all_logits: bool = True) -> None:
        self.logits_indices = torch.arange(num_tokens) if all_logits else torch.tensor([num_tokens - 1])

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            is_causal=True,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.squeeze(0).transpose(0, 1)
