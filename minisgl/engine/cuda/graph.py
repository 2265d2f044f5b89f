"""CUDA graphs for decode-only steps (the `sgl` backend).

A decode step of B sequences runs the same few hundred small kernels every time; launched from Python
they cost far more than the GPU work. We capture the whole model forward once per batch size in
`graph_batch_sizes(max_bs)` (1, 2, 4, 8, then every 16) and replay it, padding a batch up to the next
captured size. The graphs read static input buffers, filled before each replay:

  flat[0:4*bs] viewed as [4, bs]: input ids | positions | table rows | sequence lengths
      (one host-to-device copy from pinned memory per step)
  slots[:bs]: the KV slot each decode token writes (copied on the device from the allocator's tensor)

Padded entries read row 0 with length 1, write the scratch slot 0 and feed token 0 at position 0: all
valid memory and finite values, and their logits are dropped. The decode attention is the Triton kernel
of `triton_attention.py`, whose grid depends only on the batch size. Graphs share one memory pool and
are captured from the largest down, so the pool is sized by the largest.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from minisgl.cache.kv_pool import KVPool

logger = logging.getLogger("minisgl.cuda_graph")


def graph_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, 48, ... up to max_bs (always included)."""
    if max_bs < 1:
        return []
    sizes = {s for s in (1, 2, 4, 8) if s < max_bs} | set(range(16, max_bs, 16)) | {max_bs}
    return sorted(sizes)


def padded_batch_size(sizes: list[int], b: int) -> int | None:
    """The smallest captured size that holds b sequences, or None when b is larger than all of them."""
    i = bisect.bisect_left(sizes, b)
    return sizes[i] if i < len(sizes) else None


def pad_decode_inputs(ids: list[int], positions: list[int], rows: list[int], bs: int) -> list[int]:
    """The flat host buffer of a padded step: ids | positions | rows | seq lens (= position + 1), each
    padded to bs with the harmless entry (token 0, position 0, row 0, length 1)."""
    pad = bs - len(ids)
    return (ids + [0] * pad + positions + [0] * pad + rows + [0] * pad
            + [p + 1 for p in positions] + [1] * pad)


@dataclass
class GraphStep:
    """Handed to the model wrapper in place of a ForwardContext: replay graph `bs` for `b` sequences."""

    bs: int
    b: int


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    slots: torch.Tensor
    logits: torch.Tensor
    ctx: Any  # triton_attention.SGLContext (imported lazily: the helpers above need no Triton)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, pool: KVPool, table: torch.Tensor, max_bs: int,
                 num_heads: int, num_kv_heads: int, device: torch.device, num_sms: int | None = None) -> None:
        self.model = model
        self.pool = pool
        self.table = table
        self.device = device
        self.num_heads = num_heads
        self.sizes = graph_batch_sizes(max_bs)
        self.max_bs = self.sizes[-1] if self.sizes else 0
        self.num_sms = num_sms or torch.cuda.get_device_properties(device).multi_processor_count
        self.pin = device.type == "cuda"
        self.num_kv_heads = num_kv_heads
        self.flat = torch.zeros(4 * self.max_bs, dtype=torch.int64, device=device)
        self.slots = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.graphs: dict[int, _Graph] = {}
        self.capture_s = 0.0

    @torch.inference_mode()
    def capture(self) -> None:
        from minisgl.engine.cuda.triton_attention import SGLContext, decode_params

        t0 = time.perf_counter()
        mempool = None
        for bs in reversed(self.sizes):
            view = self.flat[:4 * bs].view(4, bs)
            ids, positions, rows, lens = view[0], view[1], view[2], view[3]
            view.zero_()
            lens.fill_(1)
            slots = self.slots[:bs]
            slots.zero_()
            splits, block_n = decode_params(bs, self.num_kv_heads, self.num_sms)
            ctx = SGLContext(self.pool, slots, torch.arange(bs, device=self.device), bs, self.table, rows,
                             lens, [], splits, self.num_heads, block_n)
            graph, logits = self._capture_one(ids, positions, ctx, mempool)
            if mempool is None:
                mempool = graph.pool()
            self.graphs[bs] = _Graph(graph, ids, positions, rows, slots, logits, ctx)
        if self.pin:
            torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1fs", len(self.sizes),
                    _short(self.sizes), self.capture_s)

    def _capture_one(self, ids: torch.Tensor, positions: torch.Tensor, ctx: Any, mempool: Any
                     ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.model(ids, positions, ctx)  # warm-up: compiles the Triton kernels, sets up cuBLAS
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=mempool):
            logits = self.model(ids, positions, ctx)
        return graph, logits

    def prepare(self, ids: list[int], positions: list[int], rows: list[int], slots: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, GraphStep]:
        """Fill the static inputs of the graph for len(ids) sequences and record each new token's slot in
        the req -> slot table. Returns (ids, positions, step) for the model wrapper."""
        b = len(ids)
        bs = padded_batch_size(self.sizes, b)
        assert bs is not None, f"batch of {b} is larger than the largest graph ({self.max_bs})"
        g = self.graphs[bs]
        host = torch.tensor(pad_decode_inputs(ids, positions, rows, bs), dtype=torch.int64, pin_memory=self.pin)
        self.flat[:4 * bs].copy_(host, non_blocking=True)
        g.slots[:b].copy_(slots)
        if bs > b:
            g.slots[b:].zero_()
        self.table[g.rows[:b], g.positions[:b]] = slots
        return g.ids[:b], g.positions[:b], GraphStep(bs, b)

    def replay(self, step: GraphStep) -> torch.Tensor:
        g = self.graphs[step.bs]
        g.graph.replay()
        return g.logits[:step.b]


def _short(sizes: list[int]) -> str:
    return ",".join(map(str, sizes)) if len(sizes) <= 8 else f"{sizes[0]},{sizes[1]},...,{sizes[-1]}"
