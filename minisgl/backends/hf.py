"""The plain Hugging Face baseline, served the way an HF user would serve it.

Each request gets its own `model.generate(..., streamer=...)` call in its own thread (at most
`hf_concurrency` at once; the rest wait), with no batching across requests and no shared KV cache. It
exists to be measured against, honestly, through the same gateway and bench as our engine.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from minisgl.backends.base import Backend
from minisgl.config import BackendConfig
from minisgl.engine.output import StepOutput
from minisgl.engine.sampler import mix_seed
from minisgl.messages import FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, LoadStats, TokenizedReq, TokenOut
from minisgl.models.config import dtype_named

log = logging.getLogger("minisgl.hf")



class IdStreamer(BaseStreamer):
    """TextIteratorStreamer's shape, but hands token ids (not text) to the worker's step loop: the
    tokenizer process detokenizes for every backend alike."""

    def __init__(self, rid: str, sink: "queue.Queue[tuple[str, list[int]]]") -> None:
        self.rid, self.sink, self.prompt_seen = rid, sink, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first pushes the prompt
            self.prompt_seen = True
            return
        self.sink.put((self.rid, value.reshape(-1).tolist()))

    def end(self) -> None:
        pass


class AbortFlag(StoppingCriteria):
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class HFRequest:
    req: TokenizedReq
    abort: AbortFlag = field(default_factory=AbortFlag)
    future: Future | None = None
    completion: list[int] = field(default_factory=list)


class HFBackend(Backend):
    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        dtype = dtype_named(config.dtype) or (torch.float32 if config.device == "cpu" else torch.bfloat16)
        self.model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=dtype).to(config.device).eval()
        self.pool = ThreadPoolExecutor(max_workers=max(1, config.hf_concurrency), thread_name_prefix="hf-generate")
        self.tokens: queue.Queue[tuple[str, list[int]]] = queue.Queue()
        self.reqs: dict[str, HFRequest] = {}
        self.seed_lock = threading.Lock()
        self.prompt_tokens_total = 0

    def max_context_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    def add_request(self, req: TokenizedReq) -> None:
        if req.warmup:
            return  # no cache to warm
        r = HFRequest(req)
        self.reqs[req.rid] = r
        self.prompt_tokens_total += len(req.input_ids)
        r.future = self.pool.submit(self._generate, r)

    def _generate(self, r: HFRequest) -> list[int]:
        p = r.req.params
        eos = None if p.ignore_eos else (list(r.req.eos_token_ids) + list(p.stop_token_ids)) or None
        kwargs: dict[str, object] = dict(max_new_tokens=p.max_new_tokens, eos_token_id=eos, pad_token_id=(eos or [0])[0])
        if p.temperature > 0:
            kwargs.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if p.ignore_eos:
            kwargs["min_new_tokens"] = p.max_new_tokens
        if r.abort.event.is_set():
            return []
        if p.seed is not None:
            # generate() has no per-call RNG: seeding the global one is what an HF user does, and it is
            # only reproducible when requests do not overlap.
            with self.seed_lock:
                torch.manual_seed(mix_seed(p.seed))  # all 64 bits count, as in our engine
        ids = torch.tensor([r.req.input_ids], device=self.config.device)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=IdStreamer(r.req.rid, self.tokens),
                                      stopping_criteria=StoppingCriteriaList([r.abort]), **kwargs)
        return out[0, ids.shape[1]:].tolist()

    def abort(self, rid: str) -> None:
        r = self.reqs.get(rid)
        if r is not None:
            r.abort.event.set()

    def has_work(self) -> bool:
        return bool(self.reqs)

    def step(self) -> StepOutput:
        """Collect what the generate() threads streamed since the last step."""
        # A thread streams every token before its future completes, so tokens of the requests seen done
        # here are all in the queue by now: drain it, then finish those requests.
        done = [rid for rid, r in self.reqs.items() if r.future is not None and r.future.done()]
        new: dict[str, list[int]] = {}
        try:
            rid, ids = self.tokens.get_nowait() if done else self.tokens.get(timeout=0.02)
            new.setdefault(rid, []).extend(ids)
            while True:
                rid, ids = self.tokens.get_nowait()
                new.setdefault(rid, []).extend(ids)
        except queue.Empty:
            pass
        out = StepOutput()
        for rid, ids in new.items():
            r = self.reqs.get(rid)
            if r is None:
                continue
            r.completion += ids
            out.outputs.append(TokenOut(rid=rid, token_ids=ids))
        for rid in done:
            r = self.reqs[rid]
            out.outputs.append(self._final(r))
            out.finished.append(rid)
            del self.reqs[rid]
        return out

    def _final(self, r: HFRequest) -> TokenOut:
        p = r.req.params
        base = dict(rid=r.req.rid, prompt_tokens=len(r.req.input_ids), completion_tokens=len(r.completion),
                    max_new_tokens_scaled_from=r.req.max_new_tokens_scaled_from)
        assert r.future is not None
        if r.future.exception() is not None:
            log.error("generate failed for rid=%s: %s", r.req.rid, r.future.exception())
            return TokenOut(**base, finish_reason=FINISH_ERROR, status=500, error=f"generation failed: {r.future.exception()}")
        if r.abort.event.is_set():
            return TokenOut(**base, finish_reason=FINISH_ABORT)
        stops = set(r.req.eos_token_ids) | set(p.stop_token_ids)
        hit_stop = not p.ignore_eos and bool(r.completion) and r.completion[-1] in stops
        return TokenOut(**base, finish_reason=FINISH_STOP if hit_stop else FINISH_LENGTH)

    def stats(self) -> LoadStats:
        running = sum(1 for r in self.reqs.values() if r.future is not None and r.future.running())
        return LoadStats(running=running, waiting=len(self.reqs) - running, prompt_tokens_total=self.prompt_tokens_total)

    def shutdown(self) -> None:
        for r in self.reqs.values():
            r.abort.event.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
