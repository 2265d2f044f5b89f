"""The layers that communicate. Column-parallel q/k/v and gate/up are plain MergedLinear modules with
1/N of the rows (built from the per-rank config, see sharding.local_config), so they are not here.

None of these is an nn.Linear subclass on purpose: the CPU fast path (engine/cpu/linear.pack_linears)
swaps nn.Linear modules for packed ones, which would drop the collective; with TP>1 on CPU the torch
backend does not pack at all (plain torch path).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.distributed.group import TPGroup


class RowParallelLinear(nn.Module):
    """o_proj / down_proj: this rank's input columns, partial sums all-reduced (one all-reduce), bias
    added once after the sum. Parameter names match nn.Linear's (weight, bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the embedding. Token ids outside them give zeros; the all-reduce sums
    every rank's rows into the full embedding (exactly one rank contributes a non-zero row)."""

    def __init__(self, num_local: int, dim: int, start: int, tp: TPGroup) -> None:
        super().__init__()
        self.num_local, self.dim, self.start = num_local, dim, start
        self.weight = nn.Parameter(torch.empty(num_local, dim))
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0.0))


class VocabParallelLogits(nn.Module):
    """CausalLM's logits_proj hook: this rank's vocabulary slice of the logits, then one all-gather, so
    every rank gets the full [T, V] (bitwise the same on every rank: gathered, not summed)."""

    def __init__(self, weight: Callable[[], torch.Tensor], tp: TPGroup) -> None:
        super().__init__()
        self._weight = weight  # the model's lm_head_weight (tied: the embedding's local rows)
        self.tp = tp

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_last(F.linear(h, self._weight()))
