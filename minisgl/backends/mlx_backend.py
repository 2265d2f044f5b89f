"""The `mlx` backend: an engine on Apple MLX through mlx-lm (the default on Apple silicon with MLX).

We do not reimplement the engine: mlx-lm 0.32's `BatchGenerator` already does continuous batching
(`insert` requests at any time, `next()` runs one decode step for every running request plus one
prefill chunk for newly arrived ones, `remove` drops a request and its KV at once), with per-request
samplers, stop-token matchers and token limits, and batched KV caches (`BatchKVCache`, left-padded)
underneath. Prefix reuse uses mlx-lm's `LRUPromptCache` (what `mlx_lm.server` uses): a finished
request leaves its KV keyed by all its tokens, and a new request starts from the longest cached
prefix (trimmed copies of longer entries included). This module maps our request/step contract onto
that API: one `BatchGenerator.next()` per `step()`, one TokenOut per request per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import LRUPromptCache, PromptTrie, trim_prompt_cache
from mlx_lm.sample_utils import apply_top_k, apply_top_p, make_sampler
from mlx_lm.utils import load_model

from minisgl.backends.base import Backend
from minisgl.config import BackendConfig
from minisgl.engine.output import StepOutput
from minisgl.cache.kv_pool import free_memory_bytes
from minisgl.models.config import dtype_named
from minisgl.messages import (FINISH_ABORT, LoadStats, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, SamplingParams,
                              TokenizedReq, TokenOut)

log = logging.getLogger("minisgl.mlx")

PREFILL_BATCH = 8  # prompts prefilled together in one step (mlx-lm's default)
# Prefix-cache budget when kv_cache_tokens is 0: kv_memory_fraction of free host memory (MLX's memory
# is host memory, unified with the GPU on Apple silicon), at most this many tokens.
DEFAULT_MAX_CACHE_TOKENS = 65536
MAX_CACHE_ENTRIES = 256  # LRUPromptCache entries; the byte budget usually binds first

Sampler = Callable[[mx.array], mx.array]


class _LoggingTrie(PromptTrie):
    """PromptTrie that records evictions, so the scheduler's prefix index can follow them.

    LRUPromptCache evicts through `_trie.pop` (LRU and byte limits). `pop_prefixes` is not an
    eviction: those prefixes stay reachable by trimming the longer entry that replaced them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.evicted: list[list[int]] = []

    def pop(self, model: Any, tokens: list[int]) -> Any:
        self.evicted.append(list(tokens))
        return super().pop(model, tokens)


class _PromptCache(LRUPromptCache):
    def __init__(self, max_size: int, max_bytes: int) -> None:
        super().__init__(max_size=max_size, max_bytes=max_bytes)
        # mlx-lm 0.32 keeps its trie in `_trie`: swap in one that logs evictions. Should another
        # version lay it out differently, serve without reporting to the scheduler's prefix index
        # (cache_aware dispatch then sees no prefixes here) rather than report insertions only.
        self.reports = isinstance(getattr(self, "_trie", None), PromptTrie) and len(self) == 0
        if self.reports:
            self._trie = _LoggingTrie()
        else:
            log.warning("mlx-lm's LRUPromptCache changed; prefix cache changes will not be reported")

    def drain_evicted(self) -> list[list[int]]:
        if not self.reports:
            return []
        out, self._trie.evicted = self._trie.evicted, []
        return out


def _seeded_sampler(temperature: float, top_p: float, top_k: int, seed: int) -> Sampler:
    """make_sampler's chain, drawing from the request's own key: its tokens do not depend on what else
    runs in the batch (make_sampler draws from MLX's global RNG)."""
    key = mx.random.key(seed)
    inv_temp = 1.0 / temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample


@dataclass
class _Req:
    req: TokenizedReq
    uid: int
    cached: int  # prompt tokens served from the prefix cache
    report: bool = True  # False for insert_prefix's internal requests: nobody outside knows them
    started: bool = False  # prefill began (counts as running, not waiting)
    completion: int = 0

    @property
    def rid(self) -> str:
        return self.req.rid

    @property
    def silent(self) -> bool:  # warm-ups prefill and cache, and emit nothing
        return self.req.warmup


class MLXBackend(Backend):
    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        if config.load_format not in ("auto", "safetensors"):
            raise ValueError(f"the mlx backend loads safetensors checkpoints only, not {config.load_format!r}")
        dtype_named(config.dtype)  # the one table of dtype names: an unknown one is refused here too
        if config.device == "cpu":
            mx.set_default_device(mx.cpu)  # on Apple silicon MLX would otherwise pick the GPU
        mx.random.seed(config.seed)
        # load_model reads a local directory only (mlx_lm.load would also accept a hub repo id).
        self.model, model_cfg = load_model(Path(config.model_path))
        if config.dtype != "auto":
            self.model.set_dtype(getattr(mx, config.dtype))
            mx.eval(self.model.parameters())
        self._max_context = int(config.max_model_len or model_cfg.get("max_position_embeddings") or 0)
        self._vocab = int(model_cfg.get("vocab_size") or 0)
        self._dtype = tree_flatten(self.model.parameters())[0][1].dtype
        self._per_token = self._kv_bytes_per_token(model_cfg, self._dtype.size)
        self._cache_tokens = config.kv_cache_tokens or min(
            DEFAULT_MAX_CACHE_TOKENS, int(free_memory_bytes("cpu") * config.kv_memory_fraction) // self._per_token)
        self._cache_bytes = self._cache_tokens * self._per_token
        self._cache_key = str(config.model_path)
        self.prompt_cache = _PromptCache(MAX_CACHE_ENTRIES, self._cache_bytes)
        self.gen = self._new_generator()
        self._by_uid: dict[int, _Req] = {}
        self._by_rid: dict[str, _Req] = {}
        self._finals: list[TokenOut] = []  # aborts and rejections, emitted at the next step
        self._finished: list[str] = []
        self._inserted: list[list[int]] = []
        self._evicted: list[list[int]] = []
        # unseeded samplers, shared by equal settings: a batch whose rows share one samples in one call
        self._samplers: dict[tuple[float, float, int], Sampler] = {}
        self._prefix_ids = 0
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        log.info("mlx backend: %s on %s (%s), context %d, prefix cache %d tokens (%.2f GiB)",
                 model_cfg.get("model_type"), mx.default_device(), self._dtype, self._max_context,
                 self._cache_tokens, self._cache_bytes / 2**30)

    def _new_generator(self) -> BatchGenerator:
        c = self.config
        return BatchGenerator(
            self.model, completion_batch_size=c.max_running, prefill_batch_size=min(PREFILL_BATCH, c.max_running),
            prefill_step_size=c.chunk_size, stream=mx.new_stream(mx.default_device()))

    @staticmethod
    def _kv_bytes_per_token(cfg: dict, itemsize: int) -> int:
        heads = int(cfg.get("num_attention_heads") or 1)
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size", 0)) // heads or 1)
        return 2 * int(cfg.get("num_hidden_layers") or 1) * kv_heads * head_dim * itemsize

    def max_context_len(self) -> int:
        return self._max_context

    # ------------------------------------------------------------------ intake

    def add_request(self, req: TokenizedReq) -> None:
        if req.rid in self._by_rid:
            log.warning("ignoring a duplicate request id %r", req.rid)
            return
        error = self._validate(req)
        if error is not None:
            self._finals.append(TokenOut(rid=req.rid, finish_reason=FINISH_ERROR, error=error, status=400,
                                         prompt_tokens=len(req.input_ids),
                                         max_new_tokens_scaled_from=req.max_new_tokens_scaled_from))
            self._finished.append(req.rid)
            return
        self._insert(req, report=True)

    def insert_prefix(self, input_ids: list[int]) -> None:
        if not input_ids or len(input_ids) > self._max_context:
            log.warning("insert_prefix: ignoring a prefix of %d tokens (limit %d)", len(input_ids), self._max_context)
            return
        self._prefix_ids += 1
        req = TokenizedReq(rid=f"__prefix-{self._prefix_ids}", input_ids=list(input_ids),
                           params=SamplingParams(max_new_tokens=1), arrival=0.0, warmup=True)
        self._insert(req, report=False)

    def _validate(self, req: TokenizedReq) -> str | None:
        n, p = len(req.input_ids), req.params
        if n == 0:
            return "the prompt is empty"
        if p.max_new_tokens < 1 and not req.warmup:
            return "max_new_tokens must be at least 1"
        total = n + (0 if req.warmup else p.max_new_tokens)
        if self._max_context and total > self._max_context:
            return (f"prompt ({n} tokens) + max_new_tokens ({p.max_new_tokens}) = {total} "
                    f"exceeds this worker's context length of {self._max_context} tokens")
        return None

    def _insert(self, req: TokenizedReq, report: bool) -> None:
        prompt = list(req.input_ids)
        cache, rest = self.prompt_cache.fetch_nearest_cache(self._cache_key, prompt)
        if cache is not None and not rest:
            # An exact hit: the last prompt token must still run to produce the first logits.
            if trim_prompt_cache(cache, 1) == 1:
                rest = prompt[-1:]
            else:
                cache, rest = None, prompt
        cached = len(prompt) - len(rest)
        p = req.params
        stops = [] if p.ignore_eos else list(req.eos_token_ids)
        stops += list(p.stop_token_ids)
        (uid,) = self.gen.insert(
            [rest], max_tokens=[1 if req.warmup else p.max_new_tokens], caches=[cache],
            all_tokens=[prompt[:cached]], samplers=[None if req.warmup else self._sampler(p)],
            stop_sequences=[StopSequences([[t] for t in sorted(set(stops))] or None)])
        r = _Req(req, uid, cached, report=report)
        self._by_uid[uid] = r
        self._by_rid[req.rid] = r
        if not req.warmup:
            self.prompt_tokens_total += len(prompt)
            self.cached_tokens_total += cached

    def _sampler(self, p: SamplingParams) -> Sampler | None:
        """None means the generator's greedy sampler: every greedy row is sampled in one argmax."""
        top_k = p.top_k if 0 < p.top_k < self._vocab else 0
        if p.temperature <= 0.0 or top_k == 1:
            return None
        if p.seed is not None:
            return _seeded_sampler(p.temperature, p.top_p, top_k, p.seed)
        key = (p.temperature, p.top_p, top_k)
        if key not in self._samplers:
            self._samplers[key] = make_sampler(temp=p.temperature, top_p=p.top_p, top_k=top_k)
        return self._samplers[key]

    def abort(self, rid: str) -> None:
        r = self._by_rid.get(rid)
        if r is None:
            return
        self.gen.remove([r.uid])  # frees its KV now (batch rows are filtered out)
        self._retire(r)
        if not r.silent:
            self._finals.append(self._final(r, FINISH_ABORT))

    def flush_cache(self) -> None:
        self.prompt_cache.trim_to(n_sequences=0)
        # The worker tells the scheduler to clear its whole index for us: pending events are moot.
        self.prompt_cache.drain_evicted()
        self._inserted, self._evicted = [], []

    # ------------------------------------------------------------------ the step

    def has_work(self) -> bool:
        return bool(self._by_uid or self._finals or self._finished)

    def step(self) -> StepOutput:
        out = StepOutput(outputs=self._finals)
        self._finals = []
        if self._by_uid:
            try:
                prompt_resps, gen_resps = self.gen.next()
            except Exception as e:  # noqa: BLE001 - fail the batch, not the worker
                log.exception("mlx step failed; failing %d request(s)", len(self._by_uid))
                self._fail_all(f"generation failed: {e}", out)
                prompt_resps, gen_resps = [], []
            for pr in prompt_resps:
                r = self._by_uid.get(pr.uid)
                if r is not None:
                    r.started = True
            if self.config.narrate and prompt_resps:
                log.info("prefill: %d prompt(s) advanced", len(prompt_resps))
            if self.config.narrate and gen_resps:
                log.info("decode step: batch of %d", len(gen_resps))
            for g in gen_resps:
                self._on_token(g, out)
        out.finished, self._finished = self._finished, []
        self._note_evicted(self.prompt_cache.drain_evicted())
        out.cache_inserted, out.cache_evicted = self._inserted, self._evicted
        self._inserted, self._evicted = [], []
        return out

    def _on_token(self, g: Any, out: StepOutput) -> None:
        r = self._by_uid.get(g.uid)
        if r is None:
            return
        r.started = True
        r.completion += 1
        if g.finish_reason is None:
            if not r.silent:
                out.outputs.append(TokenOut(rid=r.rid, token_ids=[g.token],
                                            max_new_tokens_scaled_from=r.req.max_new_tokens_scaled_from))
            return
        self._cache(list(g.all_tokens), g.prompt_cache)
        self._retire(r)
        if not r.silent:
            item = self._final(r, FINISH_STOP if g.finish_reason == "stop" else FINISH_LENGTH)
            item.token_ids = [g.token]
            out.outputs.append(item)

    def _cache(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep a finished request's KV (every token it fed the model) for later prefix hits."""
        self.prompt_cache.insert_cache(self._cache_key, tokens, cache)
        # Running requests' KV counts against the same budget (as in mlx_lm.server).
        self.prompt_cache.trim_to(n_bytes=max(0, self._cache_bytes - self.gen.prompt_cache_nbytes))
        if self.prompt_cache.reports:
            self._inserted.append(tokens)
        self._note_evicted(self.prompt_cache.drain_evicted())

    def _note_evicted(self, evicted: list[list[int]]) -> None:
        # The scheduler applies a report's evictions before its insertions, so a sequence inserted and
        # evicted within one step must also leave the insert list.
        if evicted:
            self._inserted = [t for t in self._inserted if t not in evicted]
            self._evicted += evicted

    def _retire(self, r: _Req) -> None:
        del self._by_uid[r.uid]
        del self._by_rid[r.rid]
        if r.report:
            self._finished.append(r.rid)

    def _final(self, r: _Req, reason: str, error: str | None = None) -> TokenOut:
        return TokenOut(rid=r.rid, finish_reason=reason, prompt_tokens=len(r.req.input_ids),
                        cached_tokens=r.cached, completion_tokens=r.completion, error=error,
                        status=500 if reason == FINISH_ERROR else 200,
                        max_new_tokens_scaled_from=r.req.max_new_tokens_scaled_from)

    def _fail_all(self, error: str, out: StepOutput) -> None:
        for r in list(self._by_uid.values()):
            self._retire(r)
            if not r.silent:
                out.outputs.append(self._final(r, FINISH_ERROR, error))
        self.gen.close()
        self.gen = self._new_generator()  # its batches may be half-updated: start clean

    # ------------------------------------------------------------------ reporting

    def stats(self) -> LoadStats:
        running = sum(1 for r in self._by_uid.values() if r.started)
        # KV the generator's batches and the prefix cache really hold (padding and MLX's 256-token
        # allocation steps included), in tokens.
        used = (self.gen.prompt_cache_nbytes + self.prompt_cache.nbytes) // self._per_token
        return LoadStats(running=running, waiting=len(self._by_uid) - running,
                            kv_used_tokens=used, kv_total_tokens=self._cache_tokens,
                            cached_tokens_total=self.cached_tokens_total,
                            prompt_tokens_total=self.prompt_tokens_total)

    def shutdown(self) -> None:
        self.gen.close()
