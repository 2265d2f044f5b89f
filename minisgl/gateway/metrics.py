"""Request metrics the gateway measures, plus the scheduler's per-worker view, for GET /metrics.

Names follow SGLang's (`sglang:` -> `minisgl:`). Latencies are measured where the client meets the
server; worker gauges come from the scheduler's `metrics` control command at scrape time.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
WINDOW_S = 60.0


@dataclass
class Finished:
    t: float
    ttft: float | None
    e2e: float
    itl: float | None
    completion_tokens: int


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("minisgl:num_requests", "Requests finished, by finish reason", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("minisgl:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("minisgl:generation_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter("minisgl:cached_tokens", "Prompt tokens served from the prefix cache", registry=r)
        self.rejected = Counter("minisgl:num_rejected_requests", "Requests refused before serving, by HTTP status", ["status"], registry=r)
        self.ttft = Histogram("minisgl:time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("minisgl:inter_token_latency_seconds", "Time between streamed chunks", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("minisgl:e2e_request_latency_seconds", "End-to-end request latency", buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("minisgl:num_running_reqs", "Requests running on a worker", ["worker"], registry=r)
        self.queued = Gauge("minisgl:num_queue_reqs", "Requests waiting in the scheduler queue", registry=r)
        self.token_usage = Gauge("minisgl:token_usage", "Fraction of the KV pool in use", ["worker"], registry=r)
        self.hit_rate = Gauge("minisgl:cache_hit_rate", "Prompt tokens served from cache / prompt tokens", ["worker"], registry=r)
        self.worker_up = Gauge("minisgl:worker_up", "1 when the worker is serving", ["worker"], registry=r)
        self.throughput = Gauge("minisgl:gen_throughput", f"Generated tokens per second over the last {WINDOW_S:.0f}s", registry=r)
        self.window: deque[Finished] = deque()

    def observe(self, finish_reason: str, prompt: int, completion: int, cached: int,
                ttft: float | None, itls: list[float], e2e: float) -> None:
        self.requests.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(completion)
        self.cached_tokens.inc(cached)
        if ttft is not None:
            self.ttft.observe(ttft)
        for x in itls:
            self.itl.observe(x)
        self.e2e.observe(e2e)
        self.window.append(Finished(time.time(), ttft, e2e, sum(itls) / len(itls) if itls else None, completion))

    def _trim(self) -> list[Finished]:
        cutoff = time.time() - WINDOW_S
        while self.window and self.window[0].t < cutoff:
            self.window.popleft()
        return list(self.window)

    def rolling(self) -> dict:
        recent = self._trim()
        out: dict = {"window_s": WINDOW_S, "requests": len(recent),
                     "gen_throughput_tok_s": sum(f.completion_tokens for f in recent) / WINDOW_S}
        for name, values in (("ttft_s", [f.ttft for f in recent if f.ttft is not None]),
                             ("itl_s", [f.itl for f in recent if f.itl is not None]),
                             ("e2e_s", [f.e2e for f in recent])):
            out[name] = {f"p{q}": _pct(values, q) for q in (50, 90, 99)}
        return out

    def update_from_scheduler(self, sched: dict | None) -> None:
        self.throughput.set(self.rolling()["gen_throughput_tok_s"])
        if not sched:
            return
        self.queued.set(sched.get("queued", 0))
        for w in sched.get("workers", []):
            label = str(w["worker_id"])
            self.running.labels(label).set(w["running"])
            self.worker_up.labels(label).set(1 if w["up"] else 0)
            total = w["kv_total_tokens"]
            self.token_usage.labels(label).set(w["kv_used_tokens"] / total if total else 0.0)
            self.hit_rate.labels(label).set(w["cache_hit_rate"])

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def totals(self) -> dict:
        """Counter values for the JSON view."""
        def value(counter: Counter) -> float:
            return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))

        return {"requests": value(self.requests), "prompt_tokens": value(self.prompt_tokens),
                "generation_tokens": value(self.generation_tokens), "cached_tokens": value(self.cached_tokens),
                "rejected": value(self.rejected)}
