"""SGLEngine: our batching engine (minisgl.engine) on CUDA with fast kernels, run by the `sgl` backend
(minisgl/backends/sgl_backend.py, which loads the model, sizes the pool and reads the options).

What differs from the portable Engine (same scheduling, radix cache, sampling):

  - attention reads K/V straight from the pool through the req -> slot table: a Triton paged decode
    kernel (`minisgl/engine/cuda/triton_attention.py`) and a Triton paged extend kernel that runs every
    prompt chunk of a step in one launch, causal with each chunk's cached-prefix offset
    (`minisgl/engine/cuda/triton_fused.py`);
  - fused Triton kernels between the matmuls (add+RMSNorm, silu*up, q/k norm + RoPE + the KV write),
    swapped into the model's modules at load; at batch 1 the matmuls themselves are Triton GEMVs with the
    norms and silu*up folded in (`minisgl/engine/cuda/triton_gemv.py`);
  - decode tokens run in a CUDA graph of the whole forward, captured per batch size and padded up to
    the next one (`minisgl/engine/cuda/graph.py`); the prompt chunks of a step (up to 2048 tokens) replay a
    prefill graph captured per token-count bucket, so a mixed step is two graph replays (longer chunks run
    eagerly right after the decode graph: their launches overlap it on the GPU);
  - overlap scheduling: step N+1 is scheduled and launched before step N's sampled tokens are read
    (see SGLEngine.step), one host sync per step;
  - each step's host-side indices go to the GPU in one pinned copy; sampling stays on the GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from minisgl.engine.config import EngineConfig
from minisgl.engine.cuda.graph import PrefillStep  # (graph.py imports no CUDA or Triton module at the top)
from minisgl.engine.engine import Engine
from minisgl.engine.output import StepOutput
from minisgl.engine.request import Req, Status

if TYPE_CHECKING:  # the CUDA / Triton modules are imported only once a GPU is known to be there
    from minisgl.engine.cuda.graph import GraphStep, PrefillGraphs
    from minisgl.engine.cuda.triton_attention import SGLContext

DEFAULT_GRAPH_MAX_BS = 512
PREFILL_GRAPH_MAX_TOKENS = 2048  # prompt chunks up to this many tokens a step replay a graph


class SGLEngine(Engine):
    """The engine with the sgl step: its own batch layout and context, and graph replay for decode."""

    def __init__(self, model: torch.nn.Module, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                 cuda_graph_max_bs: int = DEFAULT_GRAPH_MAX_BS, warm_kernels: bool = True, fused: bool = True,
                 extend_kernel: bool = True, overlap: bool = True, gemv: bool = True,
                 prefill_graphs: bool = True) -> None:
        from minisgl.engine.cuda.graph import DecodeGraphs
        from minisgl.engine.cuda.triton_attention import decode_params
        from minisgl.engine.cuda.triton_fused import install_fused

        super().__init__(model, config, device, dtype)
        # fused Triton kernels in the model's layers (engine/cuda/triton_fused.py); before any graph capture
        self.fused_modules = install_fused(model, gemv=gemv) if fused else 0
        self.extend_kernel = extend_kernel  # prompt chunks through the paged extend kernel, else SDPA
        # overlap scheduling: step N+1 is scheduled and launched before step N's tokens are read
        self.overlap = overlap
        self._inflight: _Inflight | None = None
        self._unresolved: dict[str, int] = {}  # rid -> index in all_ids of its token still on the GPU
        # each table row's newest sampled token, on the device: the next decode's input id
        self.last_tok = torch.zeros(config.max_running, dtype=torch.int64, device=self.device)
        # forwards run each way
        self.step_kinds = {"graph": 0, "graph+eager": 0, "graph+prefill graph": 0, "prefill graph": 0, "eager": 0}
        mc = model.config
        self.num_heads, self.num_kv_heads = mc.num_heads, mc.num_kv_heads
        self.group = mc.num_heads // mc.num_kv_heads
        cuda = self.device.type == "cuda"  # the engine also runs on CPU (Triton interpreter) for tests
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 4
        self._pin = cuda
        self._params = lambda b: decode_params(b, self.num_kv_heads, self.num_sms)
        if warm_kernels:
            self._warm_kernels()
        self.graphs: DecodeGraphs | None = None
        max_bs = min(cuda_graph_max_bs, config.max_running) if cuda else 0
        if max_bs > 0:
            self.graphs = DecodeGraphs(model, self.pool, self.table, max_bs, self.num_heads, self.num_kv_heads,
                                       self.device, self.num_sms)
            self.graphs.capture()
        self.prefill_graphs: PrefillGraphs | None = None
        if max_bs > 0 and prefill_graphs and fused and extend_kernel:  # the graphs need the extend kernel
            from minisgl.engine.cuda.graph import PrefillGraphs

            self.prefill_graphs = PrefillGraphs(model, self.pool, self.table, self.num_heads, self.device,
                                                max_tokens=min(PREFILL_GRAPH_MAX_TOKENS, config.chunk_size))
            self.prefill_graphs.capture()

    def _warm_kernels(self) -> None:
        """Compile the decode kernel for every split count an eager (mixed) step can use, so no Triton
        compile lands inside a timed run."""
        from minisgl.engine.cuda.triton_attention import decode_attention

        seen: dict[tuple[int, int], int] = {}
        for b in range(1, self.config.max_running + 1):
            seen.setdefault(self._params(b), b)
        dev = self.device
        head_dim = self.pool.k.shape[-1]
        for (splits, block_n), b in seen.items():
            q = torch.zeros(b, self.num_heads, head_dim, dtype=self.pool.dtype, device=dev)
            meta = torch.zeros(2 * _even(b), dtype=torch.int64, device=dev)
            meta[_even(b):_even(b) + b] = 1
            decode_attention(q, self.pool.k[0], self.pool.v[0], self.table, meta[:b], meta[_even(b):_even(b) + b],
                             splits, block_n=block_n)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # ------------------------------------------------------------------ overlap scheduling
    #
    # step() launches step N+1 and only then reads step N's tokens, so the host's work (scheduling,
    # batch building, output handling, the worker's messages) runs while the GPU computes. A request
    # sampled in step N gets a placeholder token until then; step N+1 takes its input id from
    # `last_tok` on the device. A request whose step-N token ends it (stop id or length) may already be
    # in step N+1: that extra token is dropped, and the KV it writes (for the real last token) is what
    # the prefix cache gets. Scheduling waits for step N first whenever it might preempt (KV short) or
    # would find nothing to run, so no placeholder is ever re-prefilled.

    def has_work(self) -> bool:
        return self._inflight is not None or super().has_work()

    def _decode_ready(self, r: Req) -> bool:
        if not super()._decode_ready(r):
            return False
        # its in-flight token is its last: nothing more to decode
        return not (r.rid in self._unresolved and r.num_output >= r.max_new_tokens)

    @torch.inference_mode()
    def step(self) -> StepOutput:
        if not self.overlap:
            return super().step()
        if any(r.reads_logits for r in self.running) or any(r.reads_logits for r in self.waiting):
            return self._step_in_sync()
        out = StepOutput(outputs=self._finals)
        self._finals = []
        prev, self._inflight = self._inflight, None
        # scheduling might preempt (KV short) or find no decode: read step N first, no placeholders then
        if prev is not None and (self.kv.available < len(self.running) + 1
                                 or not any(self._decode_ready(r) for r in self.running)):
            self._resolve(prev, out)
            prev = None
        decode, decode_slots, chunks = self._schedule()
        if decode or chunks:
            self._inflight = self._launch(decode, decode_slots, chunks)
        if prev is not None:
            self._resolve(prev, out)
        out.finished, self._finished = self._finished, []
        out.cache_inserted, out.cache_evicted, out.cache_extended = self.kv.drain_logs()
        return out

    def _step_in_sync(self) -> StepOutput:
        """A step for a batch holding a request that reads its logits on the host (logprobs, echo,
        penalties): the step in flight is read first, then this one runs as Engine.step() does."""
        prev, self._inflight = self._inflight, None
        early = StepOutput(outputs=[])
        if prev is not None:
            self._resolve(prev, early)
        out = super().step()  # takes self._finals / self._finished, now including what prev ended
        out.outputs = early.outputs + out.outputs
        return out

    def _launch(self, decode: list[Req], decode_slots, chunks) -> _Inflight | None:
        t0 = time.perf_counter() if self.config.narrate else 0.0
        ids, positions, ctx, sample_reqs = self._build_batch(decode, decode_slots, chunks)
        if decode:  # decode input ids from the device: some are still placeholders on the host
            from minisgl.engine.cuda.graph import GraphStep

            # (a request with one prompt token left also decodes: its input is known on the host)
            ph = [i for i, r in enumerate(decode) if r.all_ids[-1] == PLACEHOLDER]
            if ph:
                b = len(decode)
                step = ctx.decode if isinstance(ctx, SplitStep) else ctx
                if isinstance(step, GraphStep):  # the graph's static buffers (filled by prepare())
                    g = self.graphs.graphs[step.bs]
                    dst, rows_t = g.ids, g.rows
                else:
                    dst, rows_t = ids, ctx.rows
                if len(ph) == b:
                    dst[:b] = self.last_tok[rows_t[:b]]
                else:
                    idx = torch.tensor(ph, dtype=torch.int64, pin_memory=self._pin).to(self.device, non_blocking=True)
                    dst[idx] = self.last_tok[rows_t[idx]]
        logits = self.forward(ids, positions, ctx)
        for r in decode:
            r.kv_len += 1
        for c in chunks:
            c.req.kv_len += c.n
        inflight = None
        if sample_reqs:
            tokens = self.sampler.sample_tensor(logits, sample_reqs)
            rows = torch.tensor([r.row for r in sample_reqs], dtype=torch.int64, pin_memory=self._pin)
            self.last_tok[rows.to(self.device, non_blocking=True)] = tokens
            host = torch.empty(len(sample_reqs), dtype=torch.int64, pin_memory=self._pin)
            host.copy_(tokens, non_blocking=True)
            event = None
            if self._pin:
                event = torch.cuda.Event()
                event.record()
            positions_out = []
            for r in sample_reqs:
                positions_out.append(len(r.all_ids))
                r.all_ids.append(PLACEHOLDER)
                self._unresolved[r.rid] = self._unresolved.get(r.rid, 0) + 1
            inflight = _Inflight(sample_reqs, positions_out, host, event)
        if self.config.narrate:
            self._narrate(decode, chunks, time.perf_counter() - t0)
        for c in chunks:  # as Engine._run: warm-ups end, prompts computed so far go to the cache
            r = c.req
            if r.status is not Status.RUNNING:
                continue
            if r.warmup and r.pending == 0:
                self._finish_warmup(r)
            else:
                self._cache_running(r)
        return inflight

    def _resolve(self, inflight: _Inflight, out: StepOutput) -> None:
        """Read a launched step's tokens (its one host sync) and hand them to the requests."""
        if inflight.event is not None:
            inflight.event.synchronize()
        for r, pos, tok in zip(inflight.reqs, inflight.positions, inflight.host.tolist()):
            if r.status is not Status.RUNNING:
                assert r.status is not Status.WAITING, "a request was preempted with a token in flight"
                continue  # aborted, or ended by its previous token: this one is dropped
            # r's placeholders: this one at pos, and maybe one of the step launched since, after it
            later = r.all_ids.pop() if pos == len(r.all_ids) - 2 else None
            assert pos == len(r.all_ids) - 1 and r.all_ids[pos] == PLACEHOLDER
            r.all_ids.pop()
            self._unresolved[r.rid] -= 1
            self._append_token(r, tok, out)
            if r.status is Status.RUNNING:
                if later is not None:
                    r.all_ids.append(later)
            else:
                # ended: a later token is dropped; the KV that step writes is that of its real last
                # token, which _append_token's release gave the prefix cache with the rest
                self._unresolved.pop(r.rid, None)
            if not self._unresolved.get(r.rid, 1):
                del self._unresolved[r.rid]

    def abort(self, rid: str) -> None:
        r = self.reqs.get(rid)
        if r is not None and r.status is Status.RUNNING:
            for _ in range(self._unresolved.pop(rid, 0)):  # between steps: at most the in-flight one
                r.all_ids.pop()  # never delivered; the KV of every real token is written or in flight
        super().abort(rid)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:  # noqa: ANN001
        """Engine.forward, chosen by the step's context: a decode-only step replays its CUDA graph, a
        prompt-only one its prefill graph, a mixed one both (or the decode graph and the prefill chunks
        eagerly), anything else runs eagerly."""
        from minisgl.engine.cuda.graph import GraphStep

        if isinstance(ctx, GraphStep):
            assert self.graphs is not None
            self.step_kinds["graph"] += 1
            return self.graphs.replay(ctx)
        if isinstance(ctx, PrefillStep):
            assert self.prefill_graphs is not None
            self.step_kinds["prefill graph"] += 1
            return self.prefill_graphs.replay(ctx)
        if isinstance(ctx, SplitStep):
            assert self.graphs is not None
            decode_logits = self.graphs.replay(ctx.decode)  # queued; the GPU runs it while we launch the rest
            if isinstance(ctx.prefill, PrefillStep):
                assert self.prefill_graphs is not None
                self.step_kinds["graph+prefill graph"] += 1
                prefill_logits = self.prefill_graphs.replay(ctx.prefill)
            else:
                self.step_kinds["graph+eager"] += 1
                prefill_logits = self.model(ids, positions, ctx.prefill)
            return torch.cat([decode_logits, prefill_logits])
        self.step_kinds["eager"] += 1
        return self.model(ids, positions, ctx)

    def _build_batch(self, decode, decode_slots, chunks):  # type: ignore[override]
        """As Engine._build_batch (tokens laid out [decode | chunk 1 | chunk 2 ...]), but the decode
        attention reads the slot table by row and every host index travels in one pinned copy. When the
        decode batch fits a CUDA graph, its tokens go to the graph, and the step's prefill chunks (if any)
        run eagerly after it as a second forward (a SplitStep): the Python launches of the prefill then
        overlap the graph's GPU work instead of the whole mixed batch being launched op by op."""
        b = len(decode)  # narration and the decode-step count are Engine._run's (after the forward)
        if b and self.graphs is not None and b <= self.graphs.max_bs:
            assert decode_slots is not None
            ids_t, pos_t, step = self.graphs.prepare([r.all_ids[-1] for r in decode], [r.kv_len for r in decode],
                                                     [r.row for r in decode], decode_slots)
            if not chunks:
                return ids_t, pos_t, step, list(decode)
            graphed = self._graph_prefill(chunks)
            if graphed is not None:
                return ids_t, pos_t, SplitStep(step, graphed[0]), list(decode) + graphed[1]
            ids_t, pos_t, ctx, prefill_reqs = self._eager_batch([], None, chunks)
            return ids_t, pos_t, SplitStep(step, ctx), list(decode) + prefill_reqs
        if not b and chunks:
            graphed = self._graph_prefill(chunks)
            if graphed is not None:
                return None, None, graphed[0], graphed[1]
        return self._eager_batch(decode, decode_slots, chunks)

    def _graph_prefill(self, chunks) -> tuple[PrefillStep, list[Req]] | None:
        """The step's chunks as a prefill-graph replay, when a captured bucket holds them (and no request
        scores its prompt: echo needs every row's logits)."""
        pg = self.prefill_graphs
        if pg is None or not pg.fits(sum(c.n for c in chunks), len(chunks)) or any(c.req.scores_prompt for c in chunks):
            return None
        ids: list[int] = []
        positions: list[int] = []
        logits_rows: list[int] = []
        sample_reqs: list[Req] = []
        specs, _ = self._lay_out_chunks(chunks, 0, ids, positions, logits_rows, sample_reqs)
        slots = torch.cat([c.slots for c in chunks]) if len(chunks) > 1 else chunks[0].slots
        return pg.prepare(ids, positions, slots, logits_rows, specs), sample_reqs

    def _eager_batch(self, decode, decode_slots, chunks):
        from minisgl.engine.cuda.triton_attention import Segment, SGLContext, prefix_mask
        from minisgl.engine.cuda.triton_fused import extend_meta

        dev = self.device
        b = len(decode)
        ids = [r.all_ids[-1] for r in decode]
        pos = [r.kv_len for r in decode]
        rows = [r.row for r in decode]
        positions = list(pos)
        logits_idx = list(range(b))
        sample_reqs = list(decode)
        write = ([decode_slots] if b else []) + [c.slots for c in chunks]
        specs, prompt_idx = self._lay_out_chunks(chunks, b, ids, positions, logits_idx, sample_reqs)
        logits_idx += prompt_idx  # echo rows, after every sampled row (Engine._run splits them off)
        total, eb = len(ids), _even(b)
        meta: list[int] = []
        blocks = segs = 0
        if specs and self.extend_kernel:
            meta, blocks, segs = extend_meta(specs)
        # [rows | seq lens | ids | positions | logits indices | extend meta]; rows and lens 16-byte aligned
        host = torch.tensor(rows + [0] * (eb - b) + [p + 1 for p in pos] + [0] * (eb - b) + ids + positions
                            + logits_idx + meta, dtype=torch.int64, pin_memory=self._pin)
        flat = host.to(dev, non_blocking=True)
        rows_t, lens_t = flat[:b], flat[eb:eb + b]
        ids_t = flat[2 * eb:2 * eb + total]
        pos_t = flat[2 * eb + total:2 * eb + 2 * total]
        n_logits = len(logits_idx)
        logits_t = flat[2 * eb + 2 * total:2 * eb + 2 * total + n_logits]
        if b:
            self.table[rows_t, pos_t[:b]] = decode_slots
        segments = []
        extend = None
        if meta:
            extend = (flat[2 * eb + 2 * total + n_logits:], blocks, segs)
        else:
            for s, n, row, k0 in specs:
                if k0:
                    segments.append(Segment(s, s + n, self.table[row, :k0 + n], prefix_mask(k0, n, self.group, dev)))
                else:
                    segments.append(Segment(s, s + n, None))
        splits, block_n = self._params(b) if b else (1, 64)
        ctx = SGLContext(self.pool, torch.cat(write) if len(write) > 1 else write[0], logits_t, b, self.table,
                         rows_t, lens_t, segments, splits, self.num_heads, block_n, extend)
        return ids_t, pos_t, ctx, sample_reqs


PLACEHOLDER = -1  # a sampled token still on the device (overlap scheduling)


@dataclass
class _Inflight:
    """A launched step's sampled tokens: on their way to pinned host memory."""

    reqs: list[Req]
    positions: list[int]  # where each request's placeholder sits in its all_ids
    host: torch.Tensor
    event: torch.cuda.Event | None


@dataclass
class SplitStep:
    """A mixed step run as a decode graph replay plus an eager forward over the prefill chunks."""

    decode: GraphStep
    prefill: SGLContext


def _even(n: int) -> int:
    return n + (n & 1)
