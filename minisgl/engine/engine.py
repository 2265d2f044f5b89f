"""The continuous-batching engine: admission, chunked prefill mixed with batched decode, sampling.

One `step()` is one forward pass over a mixed batch:

    [ one token of every decoding request | prefill chunks, at most `chunk_size` tokens in all ]

Decode tokens always go in, so a long prompt never stalls running streams: it is cut into chunks that
ride along with the decode tokens of the following steps. Scheduling per step, oldest request first:

  1. decode: one new KV slot per decoding request. When the pool (free + evictable cached prefixes) is
     short, the newest running request is preempted: its computed tokens go to the prefix cache (so
     recomputing them later is often a cache hit), it releases everything else and is requeued at the
     front; the tokens it already emitted are kept and never re-emitted.
  2. prefill: continue running requests' unfinished prompts, then admit waiting requests (matching their
     longest cached prefix, locking it, and allocating only for the rest) while the token budget, free
     rows and KV allow. Warm-up requests (`insert_prefix`) are admitted only when nothing else waits.
  3. run the model once, sample every request whose prompt is now complete or that is decoding, and
     emit one TokenOut per request. Finished requests hand their KV (prompt + output minus the newest
     token, which has none) to the radix cache and drop their locks.

A request whose prompt finished prefilling also caches its prompt right away, so identical prefixes
arriving a moment later share it. Request state is in `request.py`, sampling in `sampler.py`, the
paged-attention context in `attention.py`.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from minisgl.cache.kv_cache import KVCache
from minisgl.cache.kv_pool import KVPool
from minisgl.engine.attention import PagedAttention, PrefillSegment, prefix_causal_mask
from minisgl.engine.config import EngineConfig
from minisgl.engine.logprobs import PromptRows, extend, prompt_logprobs, sampled_logprobs
from minisgl.engine.output import StepOutput
from minisgl.engine.request import Req, Status
from minisgl.engine.sampler import Sampler
from minisgl.messages import (FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, LoadStats, SamplingParams,
                              TokenizedReq, TokenOut)

logger = logging.getLogger("minisgl.engine")


@dataclass
class _Chunk:
    req: Req
    n: int
    slots: torch.Tensor


class Engine:
    def __init__(self, model: torch.nn.Module, config: EngineConfig, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        self.model = model
        self.config = config
        self.device = torch.device(device)
        self.pool = KVPool(config.num_layers, config.num_kv_heads, config.head_dim, config.kv_tokens,
                           dtype, self.device)
        self.kv = KVCache(self.pool)
        self.max_context_len = min(config.max_context_len, config.kv_tokens)
        # req -> token slots: row r, column i is the slot of token i of the request holding row r
        self.table = torch.zeros(config.max_running, self.max_context_len + 1, dtype=torch.int64,
                                 device=self.device)
        self.free_rows = list(range(config.max_running - 1, -1, -1))
        self.sampler = Sampler(self.device, config.seed)
        self.reqs: dict[str, Req] = {}  # every request not yet finished
        self.waiting: deque[Req] = deque()
        self.warmups: deque[Req] = deque()
        self.running: list[Req] = []  # admission order (Req.seq)
        self._finals: list[TokenOut] = []  # final items of aborted / rejected requests
        self._finished: list[str] = []
        self._seq = 0
        self._prefix_ids = 0
        self._decode_steps = 0
        self.cached_tokens_total = 0
        self.prompt_tokens_total = 0
        self.preemptions = 0
        self._prompt_rows: list[PromptRows] = []  # this step's echo rows, after the sampled rows

    # ------------------------------------------------------------------ intake

    def add_request(self, req: TokenizedReq) -> None:
        if req.rid in self.reqs:  # a bug upstream; answering would mix two streams, crashing is worse
            logger.error("ignoring a second request with the live id %r", req.rid)
            return
        r = Req(req.rid, req.input_ids, req.params, eos_token_ids=req.eos_token_ids, warmup=req.warmup,
                scaled_from=req.max_new_tokens_scaled_from, group=req.group)
        error = self._validate(r)
        if error is not None:
            if r.warmup:
                logger.warning("dropping warm-up %s: %s", r.rid, error)
            else:
                self._finals.append(TokenOut(rid=r.rid, finish_reason=FINISH_ERROR, error=error,
                                             status=400, prompt_tokens=r.prompt_len))
            self._finished.append(r.rid)
            return
        self._enqueue(r)

    def insert_prefix(self, input_ids: list[int]) -> None:
        """Prefill input_ids into the prefix cache; emits nothing."""
        if not input_ids or len(input_ids) > self.max_context_len:
            logger.warning("insert_prefix: ignoring a prefix of %d tokens (limit %d)", len(input_ids),
                           self.max_context_len)
            return
        self._prefix_ids += 1
        params = SamplingParams(max_new_tokens=1)
        self._enqueue(Req(f"__prefix-{self._prefix_ids}", input_ids, params, warmup=True, report=False))

    def _validate(self, r: Req) -> str | None:
        if r.prompt_len == 0:
            return "the prompt is empty"
        if r.max_new_tokens < 1 and not r.warmup:
            return "max_new_tokens must be at least 1"
        total = r.prompt_len + (0 if r.warmup else r.max_new_tokens)
        if total > self.max_context_len:
            return (f"prompt ({r.prompt_len} tokens) + max_new_tokens ({r.max_new_tokens}) = {total} "
                    f"exceeds this worker's context length of {self.max_context_len} tokens")
        return None

    def _enqueue(self, r: Req) -> None:
        self.reqs[r.rid] = r
        (self.warmups if r.warmup else self.waiting).append(r)

    @torch.inference_mode()
    def abort(self, rid: str) -> None:
        r = self.reqs.get(rid)
        if r is None:
            return
        if r.status is Status.RUNNING:
            self._release(r)
            self.running.remove(r)
        else:
            (self.warmups if r.warmup else self.waiting).remove(r)
        self._retire(r)
        if r.report and not r.warmup:
            self._finals.append(self._final_item(r, FINISH_ABORT))

    @torch.inference_mode()
    def flush_cache(self) -> None:
        self.kv.flush()

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.warmups or self._finals or self._finished)

    def stats(self) -> LoadStats:
        return LoadStats(running=len(self.running), waiting=len(self.waiting),
                            kv_used_tokens=self.pool.total - self.kv.available,
                            kv_total_tokens=self.pool.total,
                            cached_tokens_total=self.cached_tokens_total,
                            prompt_tokens_total=self.prompt_tokens_total)

    # ------------------------------------------------------------------ the step

    @torch.inference_mode()
    def step(self) -> StepOutput:
        out = StepOutput(outputs=self._finals)
        self._finals = []
        decode, decode_slots, chunks = self._schedule()
        if decode or chunks:
            self._run(decode, decode_slots, chunks, out)
        out.finished, self._finished = self._finished, []
        out.cache_inserted, out.cache_evicted, out.cache_extended = self.kv.drain_logs()
        return out

    def _schedule(self) -> tuple[list[Req], torch.Tensor | None, list[_Chunk]]:
        # 1. decode: every running request with exactly its newest token to process
        decode = [r for r in self.running if self._decode_ready(r)]
        while decode and self.kv.available < len(decode):
            victim = self._victim()
            self._preempt(victim)
            if victim in decode:
                decode.remove(victim)
        decode_slots = self.kv.alloc(len(decode)) if decode else None
        # 2. prefill chunks, oldest first; 3. admission
        while True:
            chunks = self._continue_prefills()
            self._admit(chunks)
            if decode or chunks or len(self.running) <= 1:
                break
            # every running request is mid-prefill and the pool is full: make room, try again
            self._preempt(self._victim())
        if not decode and not chunks and self.running:
            r = self.running[0]  # cannot happen when max_context_len <= pool size; fail, never hang
            self._release(r)
            self.running.remove(r)
            self._retire(r)
            self._finals.append(self._final_item(r, FINISH_ERROR, "out of KV cache memory"))
        return decode, decode_slots, chunks

    def _decode_ready(self, r: Req) -> bool:
        """r decodes this step: exactly its newest token is still to run (an overlapped engine also
        leaves out requests whose in-flight token is their last)."""
        return r.pending == 1 and not r.warmup

    def _continue_prefills(self) -> list[_Chunk]:
        chunks: list[_Chunk] = []
        budget = self.config.chunk_size
        for r in self.running:
            if budget <= 0:
                break
            if r.pending > 1 or (r.warmup and r.pending > 0):
                n = min(r.pending, budget, self.kv.available)
                if n <= 0:
                    break
                slots = self.kv.alloc(n)
                assert slots is not None
                chunks.append(_Chunk(r, n, slots))
                budget -= n
        return chunks

    def _admit(self, chunks: list[_Chunk]) -> None:
        budget = self.config.chunk_size - sum(c.n for c in chunks)
        while budget > 0 and self.free_rows:
            queue = self.waiting or self.warmups
            if not queue:
                return
            r = queue[0]
            if r.group and any(x.group == r.group and x.pending > 1 for x in self.running):
                return  # a sibling choice is prefilling the same prompt: next step, share its cached KV
            # leave one prompt token uncached: its logits give the first output token. A prompt to
            # score (echo) must run whole: cached tokens get no logits.
            match_ids = r.all_ids if r.warmup else ([] if r.scores_prompt else r.all_ids[:-1])
            length, node, cached_slots = self.kv.match(match_ids)
            # keep one slot per running request free for its next decode token
            headroom = len(self.running) + 1 if self.running else 0
            n = min(len(r.all_ids) - length, budget, self.kv.available - headroom)
            if n <= 0 and not (r.warmup and length == len(r.all_ids)):
                self.kv.unlock(node)
                return
            queue.popleft()
            r.status = Status.RUNNING
            r.row = self.free_rows.pop()
            r.node, r.kv_len, r.cached_len = node, length, length
            if length:
                self.table[r.row, :length] = cached_slots
            if not r.started:
                r.started = True
                self._seq += 1
                r.seq = self._seq
                if not r.warmup:
                    r.cached_tokens = length
                    self.cached_tokens_total += length
                    self.prompt_tokens_total += r.prompt_len
                    if r.params.seed is not None:
                        r.generator = self.sampler.request_generator(r.params.seed)
            bisect.insort(self.running, r, key=lambda x: x.seq)
            if n <= 0:  # a warm-up whose whole prefix is already cached
                self._finish_warmup(r)
                continue
            slots = self.kv.alloc(n)
            assert slots is not None
            chunks.append(_Chunk(r, n, slots))
            budget -= n

    def _victim(self) -> Req:
        """Warm-ups go first, then the newest request."""
        for r in reversed(self.running):
            if r.warmup:
                return r
        return self.running[-1]

    # ------------------------------------------------------------------ forward + sample

    def _run(self, decode: list[Req], decode_slots: torch.Tensor | None, chunks: list[_Chunk],
             out: StepOutput) -> None:
        t0 = time.perf_counter() if self.config.narrate else 0.0
        self._prompt_rows = []
        ids, positions, ctx, sample_reqs = self._build_batch(decode, decode_slots, chunks)
        logits = self.forward(ids, positions, ctx)
        for r in decode:
            r.kv_len += 1
        for c in chunks:
            c.req.kv_len += c.n
        if self._prompt_rows:  # echo rows come after the sampled ones
            self._score_prompts(logits[len(sample_reqs):])
            logits = logits[:len(sample_reqs)]
        tokens = self.sampler.sample(logits, sample_reqs) if sample_reqs else []
        if self.config.narrate:
            self._narrate(decode, chunks, time.perf_counter() - t0)
        lp_rows = [i for i, r in enumerate(sample_reqs) if r.params.logprobs is not None]
        scores = sampled_logprobs(logits[lp_rows], [tokens[i] for i in lp_rows],
                                  [sample_reqs[i].params.logprobs or 0 for i in lp_rows]) if lp_rows else []
        items = [self._append_token(r, tok, out) for r, tok in zip(sample_reqs, tokens)]
        for i, score in zip(lp_rows, scores):
            items[i].logprobs = score
        for r, item in zip(sample_reqs, items):
            if r.prompt_scores is not None and r.num_output == 1:  # echo: the first item carries them
                item.prompt_logprobs = r.prompt_scores
        for c in chunks:
            r = c.req
            if r.status is not Status.RUNNING:
                continue
            if r.warmup and r.pending == 0:
                self._finish_warmup(r)
            else:  # cache the prompt computed so far, so requests arriving now can share it
                self._cache_running(r)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:  # noqa: ANN001
        """The step's one forward pass: the model's (or a fused CPU forward's) call. An engine that runs
        some steps another way (the CUDA engine: graph replay) overrides this."""
        return self.model(ids, positions, ctx)

    def _prompt_rows_of(self, r: Req, start: int, k0: int, n: int) -> list[int]:
        """Rows (in the step's flat layout) of a chunk whose prompt tokens still need scores; records
        them in self._prompt_rows. Tokens scored before a preemption are not scored twice."""
        done = 0 if r.prompt_scores is None else len(r.prompt_scores.logprobs)
        first, end = max(k0, done), min(k0 + n, r.prompt_len - 1)  # position p predicts token p + 1
        if end <= first:
            return []
        self._prompt_rows.append(PromptRows(r, first, end - first))
        return list(range(start + first - k0, start + end - k0))

    def _score_prompts(self, logits: torch.Tensor) -> None:
        rows = self._prompt_rows
        for pr, score in zip(rows, prompt_logprobs(logits, rows, [pr.req.params.prompt_logprobs or 0 for pr in rows])):
            r = pr.req
            if r.prompt_scores is None:
                r.prompt_scores = score
            else:
                extend(r.prompt_scores, score)

    def _build_batch(self, decode: list[Req], decode_slots: torch.Tensor | None, chunks: list[_Chunk]
                     ) -> tuple[torch.Tensor, torch.Tensor, PagedAttention, list[Req]]:
        """Lay the step's tokens out flat (decode first, then the chunks), record their slots in the
        table, and build every index the attention needs, once for all layers."""
        dev = self.device
        ids: list[int] = [r.all_ids[-1] for r in decode]
        positions: list[int] = [r.kv_len for r in decode]
        b = len(decode)
        table_dec = lens_dec = None
        if b:
            assert decode_slots is not None
            rows = torch.tensor([r.row for r in decode], device=dev)
            pos = torch.tensor(positions, device=dev)
            self.table[rows, pos] = decode_slots
            lens_dec = pos + 1
            table_dec = self.table[rows, : max(positions) + 1]
        logits_idx = list(range(b))
        sample_reqs = list(decode)
        specs, prompt_idx = self._lay_out_chunks(chunks, b, ids, positions, logits_idx, sample_reqs)
        logits_idx += prompt_idx  # echo rows, after every sampled row (_run splits them off)
        write = ([decode_slots] if b else []) + [c.slots for c in chunks]
        segments: list[PrefillSegment] = []
        for (start, n, row, k0), c in zip(specs, chunks):
            if k0:  # part of the sequence is in the pool already: attend over it, causal with an offset
                segments.append(PrefillSegment(start, start + n, self.table[row, :k0 + n],
                                               prefix_causal_mask(k0, n, self.pool.dtype, dev)))
            else:
                segments.append(PrefillSegment(start, start + n, c.slots, None))
        ctx = PagedAttention(self.pool, torch.cat(write) if len(write) > 1 else write[0],
                             torch.tensor(logits_idx, dtype=torch.int64, device=dev), b, table_dec,
                             lens_dec, segments)
        return (torch.tensor(ids, dtype=torch.int64, device=dev), torch.tensor(positions, dtype=torch.int64, device=dev),
                ctx, sample_reqs)

    def _lay_out_chunks(self, chunks: list[_Chunk], start: int, ids: list[int], positions: list[int],
                        logits_idx: list[int], sample_reqs: list[Req]
                        ) -> tuple[list[tuple[int, int, int, int]], list[int]]:
        """The one chunk-layout loop (this engine's and the CUDA engine's batches): append the chunks'
        tokens after `start` others (ids, positions), write their slots into the table, and add the row
        of each prompt that completes (it samples) and its request. Returns (first row, tokens, table
        row, tokens before it) per chunk, and the echo rows to score (for after every sampled row)."""
        specs: list[tuple[int, int, int, int]] = []
        prompt_idx: list[int] = []
        for c in chunks:
            r, k0 = c.req, c.req.kv_len
            ids.extend(r.all_ids[k0:k0 + c.n])
            positions.extend(range(k0, k0 + c.n))
            self.table[r.row, k0:k0 + c.n] = c.slots
            specs.append((start, c.n, r.row, k0))
            if r.scores_prompt:
                prompt_idx += self._prompt_rows_of(r, start, k0, c.n)
            start += c.n
            if k0 + c.n == len(r.all_ids) and not r.warmup:  # prompt complete: sample from its last token
                logits_idx.append(start - 1)
                sample_reqs.append(r)
        return specs, prompt_idx

    def _narrate(self, decode: list[Req], chunks: list[_Chunk], seconds: float) -> None:
        ms = seconds * 1000
        for c in chunks:  # kv_len has moved past the chunk already
            logger.info("prefill rid=%s %d new tokens (%d cached), step %.0f ms", c.req.rid, c.n,
                        c.req.kv_len - c.n, ms)
        if decode:
            self._decode_steps += 1
            logger.info("decode step %d: batch of %d, %.0f ms", self._decode_steps, len(decode), ms)

    def _append_token(self, r: Req, tok: int, out: StepOutput) -> TokenOut:
        r.all_ids.append(tok)
        reason = None
        if tok in r.stop_ids:
            reason = FINISH_STOP
        elif r.num_output >= r.max_new_tokens:
            reason = FINISH_LENGTH
        if reason is None:
            item = TokenOut(rid=r.rid, token_ids=[tok], max_new_tokens_scaled_from=r.scaled_from)
            out.outputs.append(item)
            return item
        item = self._final_item(r, reason)
        item.token_ids = [tok]
        out.outputs.append(item)
        self._release(r)
        self.running.remove(r)
        self._retire(r)
        return item

    # ------------------------------------------------------------------ KV ownership

    def _cache_running(self, r: Req) -> None:
        """Move r's computed tokens into the tree and re-lock them (r keeps running on them)."""
        tokens = r.all_ids[:r.kv_len]
        assert r.node is not None
        self.kv.cache(tokens, self.table[r.row, :r.kv_len].clone(), r.cached_len, r.node, r.cache_key)
        length, node, slots = self.kv.match(tokens)
        assert length == r.kv_len
        self.table[r.row, :length] = slots  # duplicates were freed: point at the tree's copies
        r.node, r.cached_len = node, length

    def _release(self, r: Req) -> None:
        """Give r's KV to the prefix cache, drop its lock and its table row."""
        assert r.node is not None
        self.kv.cache(r.all_ids[:r.kv_len], self.table[r.row, :r.kv_len].clone(), r.cached_len, r.node, r.cache_key)
        self.free_rows.append(r.row)
        r.node, r.row, r.kv_len, r.cached_len = None, -1, 0, 0

    def _preempt(self, r: Req) -> None:
        self.preemptions += 1
        logger.info("preempting rid=%s (%d tokens) to free KV; it will be recomputed", r.rid,
                    len(r.all_ids))
        self._release(r)
        self.running.remove(r)
        r.status = Status.WAITING
        (self.warmups if r.warmup else self.waiting).appendleft(r)

    def _finish_warmup(self, r: Req) -> None:
        self._release(r)
        self.running.remove(r)
        self._retire(r)

    def _retire(self, r: Req) -> None:
        r.status = Status.FINISHED
        del self.reqs[r.rid]
        self.kv.forget(r.cache_key)
        if r.report:
            self._finished.append(r.rid)

    def _final_item(self, r: Req, reason: str, error: str | None = None) -> TokenOut:
        return TokenOut(rid=r.rid, finish_reason=reason, prompt_tokens=r.prompt_len,
                        cached_tokens=r.cached_tokens, completion_tokens=r.num_output, error=error,
                        status=200 if reason != FINISH_ERROR else 500,
                        max_new_tokens_scaled_from=r.scaled_from)
