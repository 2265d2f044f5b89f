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

`PrefillGraphs` does the same for the prompt chunks of a step (every chunk of the step, up to
`max_segments` of them and 2048 tokens in all; a mixed step replays a decode graph and then one of
these): eager, a 44-token prompt costs ~19 ms of Python launching ~300 kernels whose GPU work is ~1 ms.
Captured per token-count bucket, with the paged extend kernel's grid fixed to the bucket's most query
blocks; its metadata (`triton_fused.extend_meta`, padded) sends the unused blocks to an empty segment.
Padded tokens (token 0 at position 0) write slot 0 and get a zero attention output, so every value stays
finite; only the real chunks' last rows are read out as logits.
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


class _ForwardGraphs:
    """What decode and prefill graphs share: capturing one forward of the model over static inputs."""

    model: torch.nn.Module
    device: torch.device

    def _capture_one(self, ids: torch.Tensor, positions: torch.Tensor, ctx: Any, mempool: Any
                     ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.model(ids, positions, ctx)  # warm-up: compiles this shape's Triton kernels, sets up cuBLAS
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=mempool):
            logits = self.model(ids, positions, ctx)
        return graph, logits


class DecodeGraphs(_ForwardGraphs):
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


PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)
MAX_SEGMENTS = 8


@dataclass
class PrefillStep:
    """Handed to the model wrapper: replay prefill graph `tokens` for a step whose chunks hold `n` tokens
    and `n_logits` sampled rows."""

    tokens: int
    n: int
    n_logits: int


@dataclass
class _PrefillGraph:
    graph: torch.cuda.CUDAGraph
    flat: torch.Tensor  # ids | positions | logits rows | extend meta (int64), one host copy per step
    slots: torch.Tensor
    logits: torch.Tensor
    max_blocks: int


class PrefillGraphs(_ForwardGraphs):
    """CUDA graphs of the forward over a step's prompt chunks, by token-count bucket (see the module doc)."""

    def __init__(self, model: torch.nn.Module, pool: KVPool, table: torch.Tensor, num_heads: int,
                 device: torch.device, max_tokens: int, max_segments: int = MAX_SEGMENTS) -> None:
        self.model, self.pool, self.table, self.num_heads, self.device = model, pool, table, num_heads, device
        self.buckets = [b for b in PREFILL_BUCKETS if b <= max_tokens]
        self.max_tokens = self.buckets[-1] if self.buckets else 0
        self.max_segments = max_segments
        self.pin = device.type == "cuda"
        self.graphs: dict[int, _PrefillGraph] = {}
        self.capture_s = 0.0

    def fits(self, total_tokens: int, segments: int) -> bool:
        return 0 < total_tokens <= self.max_tokens and segments <= self.max_segments

    def _layout(self, tokens: int) -> tuple[int, int]:
        """(query blocks the extend grid has, length of the flat buffer) for a bucket."""
        from minisgl.engine.cuda.triton_fused import EXTEND_BLOCK_M

        max_blocks = -(-tokens // EXTEND_BLOCK_M) + self.max_segments  # each chunk may end in a partial block
        meta = 2 * max_blocks + 4 * (self.max_segments + 1)  # + the empty segment the unused blocks take
        return max_blocks, 2 * tokens + self.max_segments + meta

    def host_buffer(self, tokens: int, ids: list[int], positions: list[int], logits_rows: list[int],
                    specs: list[tuple[int, int, int, int]]) -> list[int]:
        """ids | positions (padded with token 0 at position 0) | logits rows (padded with row 0) | the
        extend metadata for max_blocks blocks and max_segments + 1 segments."""
        from minisgl.engine.cuda.triton_fused import extend_meta

        max_blocks, _ = self._layout(tokens)
        n, segs = len(ids), self.max_segments + 1
        flat, blocks, _ = extend_meta(specs)
        block_seg, block_start, cols = flat[:blocks], flat[blocks:2 * blocks], flat[2 * blocks:]
        k = len(specs)
        pad_seg = [0] * (segs - k)
        meta = (block_seg + [segs - 1] * (max_blocks - blocks) + block_start + [0] * (max_blocks - blocks)
                + [c for i in range(4) for c in cols[i * k:(i + 1) * k] + pad_seg])
        return (ids + [0] * (tokens - n) + positions + [0] * (tokens - n) + logits_rows
                + [0] * (self.max_segments - len(logits_rows)) + meta)

    @torch.inference_mode()
    def capture(self, mempool: Any = None) -> None:
        from minisgl.engine.cuda.triton_attention import SGLContext

        t0 = time.perf_counter()
        for tokens in reversed(self.buckets):
            max_blocks, length = self._layout(tokens)
            flat = torch.tensor(self.host_buffer(tokens, [], [], [], []), dtype=torch.int64, device=self.device)
            assert flat.numel() == length
            slots = torch.zeros(tokens, dtype=torch.int64, device=self.device)
            ids, positions = flat[:tokens], flat[tokens:2 * tokens]
            rows = flat[2 * tokens:2 * tokens + self.max_segments]
            meta = flat[2 * tokens + self.max_segments:]
            ctx = SGLContext(self.pool, slots, rows, 0, self.table, None, None, [], 1, self.num_heads,
                             extend=(meta, max_blocks, self.max_segments + 1), zero_pad=True)
            graph, logits = self._capture_one(ids, positions, ctx, mempool)
            if mempool is None:
                mempool = graph.pool()
            self.graphs[tokens] = _PrefillGraph(graph, flat, slots, logits, max_blocks)
        if self.pin:
            torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        logger.info("captured %d prefill CUDA graphs (up to %d tokens, %d chunks) in %.1fs", len(self.buckets),
                    self.max_tokens, self.max_segments, self.capture_s)

    def prepare(self, ids: list[int], positions: list[int], slots: torch.Tensor, logits_rows: list[int],
                specs: list[tuple[int, int, int, int]]) -> PrefillStep:
        """Fill a bucket's static inputs for a step's chunks (their table columns are written by the caller)."""
        n = len(ids)
        tokens = self.buckets[bisect.bisect_left(self.buckets, n)]
        g = self.graphs[tokens]
        host = torch.tensor(self.host_buffer(tokens, ids, positions, logits_rows, specs), dtype=torch.int64,
                            pin_memory=self.pin)
        g.flat.copy_(host, non_blocking=True)
        g.slots[:n].copy_(slots)
        if tokens > n:
            g.slots[n:].zero_()
        return PrefillStep(tokens, n, len(logits_rows))

    def replay(self, step: PrefillStep) -> torch.Tensor:
        g = self.graphs[step.tokens]
        g.graph.replay()
        return g.logits[:step.n_logits]


def _short(sizes: list[int]) -> str:
    return ",".join(map(str, sizes)) if len(sizes) <= 8 else f"{sizes[0]},{sizes[1]},...,{sizes[-1]}"
