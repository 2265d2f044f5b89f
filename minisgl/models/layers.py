"""The small building blocks of a Llama-style decoder: RMSNorm, fused linears, rotary embedding, SiLU MLP.

Every op here works on the flattened token dimension ([T, ...]): the engine packs all sequences of a
step into one batch, so there is no batch or padding dimension anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual). One seam, so a device backend can swap in a fused
        kernel."""
        residual = x + residual
        return self.forward(residual), residual


class MergedLinear(nn.Linear):
    """One Linear standing for several that share an input (q/k/v, gate/up): one matmul instead of
    several. Checkpoints keep them apart; `load_shard` copies each into its rows."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = list(shard_sizes)
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        param: torch.Tensor | None = getattr(self, param_name)
        if param is None:
            raise ValueError(f"checkpoint has a {param_name} for a layer built without one")
        rows = param.narrow(0, self.shard_offsets[shard], self.shard_sizes[shard])
        if rows.shape != tensor.shape:
            raise ValueError(f"shard {shard} of {param_name}: expected {tuple(rows.shape)}, got {tuple(tensor.shape)}")
        rows.copy_(tensor)


class SiluMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size], bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


@dataclass(frozen=True)
class RopeScaling:
    """The rope_scaling variants we support: "linear" and "llama3" (Llama 3.1+)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        # Same formula as transformers' _compute_llama3_parameters: slow down low frequencies by
        # `factor`, keep high ones, interpolate smoothly in between.
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {scaling.rope_type!r} (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate halves, as transformers' Llama/Qwen do). For every position the cache holds
    cos|cos and -sin|sin over the whole head dim, so that a forward only gathers the rows of this step's
    positions and `apply_rope` is three ops per call."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos_sin", torch.empty(max_positions, 2, head_dim), persistent=False)
        self.init_cache()

    @torch.no_grad()
    def init_cache(self) -> None:
        """(Re)compute the cache in float32, then store it in the buffer's dtype and device. Called again
        after the model is materialized from the meta device."""
        if self.cos_sin.is_meta:
            return
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        self.cos_sin.copy_(torch.stack((torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)), dim=1))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, head_dim] (sin with the rotation's sign), broadcastable over
        heads."""
        cos_sin = self.cos_sin[positions]
        return cos_sin[:, :1], cos_sin[:, 1:]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; rotates the two halves of D. transformers' q*cos + rotate_half(q)*sin, with the minus
    of rotate_half folded into `sin`."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin)
