"""The one streaming client of `/generate`, shared by the bench and the tools.

The gateway streams newline-delimited JSON: `{"text_delta": ...}` chunks, then a last line that is
either `{"event": "done", "finish_reason", "usage"}` or `{"event": "error", "error", "status"}`.
Errors found before the stream starts come as an HTTP 4xx/5xx with `{"error": {"message", ...}}`.

Timing is client-side, so it includes everything a user would wait for (HTTP, tokenizer, queueing):
TTFT is the time to the first *non-empty* text delta (an empty chunk shows the user nothing), and the
inter-token latencies are the gaps between successive non-empty deltas.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import httpx


@dataclass
class StreamResult:
    ok: bool = False
    error: str | None = None
    status: int = 200
    text: str = ""
    ttft_s: float | None = None  # request sent -> first non-empty delta
    e2e_s: float = 0.0  # request sent -> stream closed
    itl_s: list[float] = field(default_factory=list)  # gaps between non-empty deltas
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    max_new_tokens_scaled_from: int | None = None

    @property
    def num_deltas(self) -> int:
        return len(self.itl_s) + (1 if self.ttft_s is not None else 0)

    def decode_tok_s(self) -> float | None:
        """Tokens per second after the first one arrived (what a reader sees while it streams)."""
        if self.ttft_s is None or self.completion_tokens < 2 or self.e2e_s <= self.ttft_s:
            return None
        return (self.completion_tokens - 1) / (self.e2e_s - self.ttft_s)

    def record(self) -> dict[str, Any]:
        """A compact, JSON-able record (the text is left out)."""
        d = asdict(self)
        d.pop("text")
        d.pop("itl_s")
        d["num_deltas"] = self.num_deltas
        return d


class _Tracker:
    """Folds stream lines into a StreamResult; `on_delta` sees each non-empty delta as it arrives."""

    def __init__(self, t0: float, on_delta: Callable[[str], None] | None) -> None:
        self.t0 = t0
        self.last: float | None = None
        self.res = StreamResult()
        self.parts: list[str] = []
        self.on_delta = on_delta

    def feed(self, line: str, now: float) -> None:
        line = line.strip()
        if not line:
            return
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            self._fail(f"malformed stream line: {line[:200]!r}", self.res.status)
            return
        if "text_delta" in obj:
            self._delta(obj["text_delta"] or "", now)
        event = obj.get("event")
        if event == "done":
            self._done(obj)
        elif event == "error":
            self._fail(str(obj.get("error", "unknown error")), int(obj.get("status", 500)))

    def _delta(self, text: str, now: float) -> None:
        if not text:
            return
        if self.last is None:
            self.res.ttft_s = now - self.t0
        else:
            self.res.itl_s.append(now - self.last)
        self.last = now
        self.parts.append(text)
        if self.on_delta:
            self.on_delta(text)

    def _done(self, obj: dict[str, Any]) -> None:
        usage = obj.get("usage") or {}
        self.res.ok = self.res.error is None
        self.res.finish_reason = obj.get("finish_reason")
        self.res.prompt_tokens = int(usage.get("prompt_tokens", 0))
        self.res.completion_tokens = int(usage.get("completion_tokens", 0))
        self.res.cached_tokens = int(usage.get("cached_tokens", 0))
        self.res.max_new_tokens_scaled_from = obj.get("max_new_tokens_scaled_from")

    def _fail(self, message: str, status: int) -> None:
        self.res.ok = False
        self.res.error = message
        self.res.status = status

    def finish(self, now: float) -> StreamResult:
        self.res.e2e_s = now - self.t0
        self.res.text = "".join(self.parts)
        if self.res.error is None and self.res.finish_reason is None:
            self._fail("stream ended without a done event", self.res.status)
        return self.res


def http_error_message(status: int, body: bytes) -> str:
    """The gateway's `{"error": {"message": ...}}`, or the raw body when it is something else."""
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict):
            return f"HTTP {status}: {err.get('message', err)}"
        if err:
            return f"HTTP {status}: {err}"
    except (json.JSONDecodeError, AttributeError):
        pass
    return f"HTTP {status}: {body[:300].decode(errors='replace')}"


def generate_payload(prompt: str | None = None, messages: list[dict[str, str]] | None = None,
                     **params: Any) -> dict[str, Any]:
    """A /generate body; None-valued params are left out so the server's defaults apply."""
    body: dict[str, Any] = {"stream": True}
    if messages is not None:
        body["messages"] = messages
    else:
        body["prompt"] = prompt or ""
    body.update({k: v for k, v in params.items() if v is not None})
    return body


async def astream_generate(client: httpx.AsyncClient, base_url: str, payload: dict[str, Any],
                           on_delta: Callable[[str], None] | None = None) -> StreamResult:
    return await _astream(client, base_url.rstrip("/") + "/generate", payload, _Tracker(time.perf_counter(), on_delta))


async def _astream(client: httpx.AsyncClient, url: str, body: dict[str, Any], tracker: _Tracker) -> StreamResult:
    """POST body to url and feed every streamed line to tracker (its t0 is the request's start)."""
    try:
        async with client.stream("POST", url, json=body) as resp:
            tracker.res.status = resp.status_code
            if resp.status_code != 200:
                tracker._fail(http_error_message(resp.status_code, await resp.aread()), resp.status_code)
            else:
                async for line in resp.aiter_lines():
                    tracker.feed(line, time.perf_counter())
    except httpx.HTTPError as exc:
        tracker._fail(f"{type(exc).__name__}: {exc}", 0)
    return tracker.finish(time.perf_counter())


def openai_request(payload: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """(path, body) of the OpenAI streaming request equal to a /generate payload: chat completions
    for a prompt the server wraps in the chat template (our /generate default), plain completions for
    a raw one; greedy, ignore_eos and the seed carry over, usage comes in the stream's last chunk."""
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "max_tokens": payload["max_new_tokens"]}
    for key in ("temperature", "ignore_eos", "seed"):
        if payload.get(key) is not None:
            body[key] = payload[key]
    if payload.get("messages") is not None:
        return "/v1/chat/completions", {**body, "messages": payload["messages"]}
    if payload.get("raw"):
        return "/v1/completions", {**body, "prompt": payload.get("prompt", "")}
    return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": payload.get("prompt", "")}]}


class _OpenAITracker(_Tracker):
    """Folds OpenAI server-sent events (`data: {...}` chunks, `data: [DONE]`) into a StreamResult."""

    def feed(self, line: str, now: float) -> None:
        line = line.strip()
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            if self.res.error is None:
                self.res.ok = self.res.finish_reason is not None
            return
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            self._fail(f"malformed stream line: {line[:200]!r}", self.res.status)
            return
        if "error" in obj:
            err = obj["error"]
            self._fail(str(err.get("message", err) if isinstance(err, dict) else err), 500)
            return
        for choice in obj.get("choices") or []:
            delta = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
            self._delta(delta or "", now)
            if choice.get("finish_reason"):
                self.res.finish_reason = choice["finish_reason"]
        usage = obj.get("usage")
        if usage:
            self.res.prompt_tokens = int(usage.get("prompt_tokens", 0))
            self.res.completion_tokens = int(usage.get("completion_tokens", 0))
            details = usage.get("prompt_tokens_details") or {}
            self.res.cached_tokens = int(details.get("cached_tokens", 0) or 0)


async def astream_openai(client: httpx.AsyncClient, base_url: str, payload: dict[str, Any], model: str,
                         on_delta: Callable[[str], None] | None = None) -> StreamResult:
    """astream_generate's twin for any OpenAI-compatible server (vLLM, ours): the same /generate
    payload, sent as the equivalent streaming chat/completions request."""
    path, body = openai_request(payload, model)
    res = await _astream(client, base_url.rstrip("/") + path, body, _OpenAITracker(time.perf_counter(), on_delta))
    if res.ok and res.completion_tokens == 0:
        res.ok, res.error = False, "no usage in the stream"
    return res


def stream_generate(base_url: str, payload: dict[str, Any], on_delta: Callable[[str], None] | None = None,
                    timeout: float = 600.0, client: httpx.Client | None = None) -> StreamResult:
    """Synchronous twin of astream_generate (for the CLI tools)."""
    t0 = time.perf_counter()
    tracker = _Tracker(t0, on_delta)
    own = client is None
    client = client or httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0))
    try:
        with client.stream("POST", base_url.rstrip("/") + "/generate", json=payload) as resp:
            tracker.res.status = resp.status_code
            if resp.status_code != 200:
                tracker._fail(http_error_message(resp.status_code, resp.read()), resp.status_code)
            else:
                for line in resp.iter_lines():
                    tracker.feed(line, time.perf_counter())
    except httpx.HTTPError as exc:
        tracker._fail(f"{type(exc).__name__}: {exc}", 0)
    finally:
        if own:
            client.close()
    return tracker.finish(time.perf_counter())


def server_info(base_url: str, timeout: float = 10.0) -> dict[str, Any]:
    """What the server says about itself: served model id and, where /metrics tells it, the backend."""
    info: dict[str, Any] = {}
    try:
        models = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=timeout).json()
        info["model"] = models["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError, TypeError):
        info["model"] = None
    try:
        resp = httpx.get(base_url.rstrip("/") + "/metrics", headers={"Accept": "application/json"}, timeout=timeout)
        metrics = resp.json()
        for key in ("backend", "backend_impl", "device"):
            if isinstance(metrics, dict) and key in metrics:
                info[key] = metrics[key]
    except (httpx.HTTPError, ValueError):
        pass
    return info
