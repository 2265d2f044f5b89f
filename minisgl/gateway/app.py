"""The HTTP gateway: a Starlette app that streams text deltas. It holds no model and no tokenizer.

Each request gets an id and an asyncio queue (its n choices, when it asks several, are engine requests
sharing that queue); one reader task takes TextBatch messages off the gateway's PULL socket and hands
every item to its request's queue (TokenizeReply answers /tokenize; Narration feeds the dashboard). The first item decides the HTTP status (a
request refused by the tokenizer or scheduler gets its 4xx/5xx before any byte is streamed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from minisgl import ipc
from minisgl.config import ServerConfig
from minisgl.config import context_window
from minisgl.gateway import pages
from minisgl.gateway.errors import error_response
from minisgl.narration import relay_local
from minisgl.gateway.live import LiveStats
from minisgl.gateway.metrics import GatewayMetrics
from minisgl.gateway.openai_extras import chat_logprobs, choice_seed, completion_logprobs
from minisgl.gateway.requests import (
    ParsedRequest,
    RequestError,
    check_encodable,
    parse_chat,
    parse_completion,
    parse_generate,
)
from minisgl.gateway.security import guard_middleware
from minisgl.messages import (
    FINISH_ERROR,
    AbortReq,
    ControlReply,
    ControlReq,
    GatewayInMsg,
    GenerateReq,
    Narration,
    PeerRestarted,
    TextBatch,
    TextOut,
    TokenizeReply,
    TokenizeReq,
    TokenLogprob,
    Usage,
)

log = logging.getLogger("minisgl.gateway")


@dataclass
class Stream:
    """One request in flight, seen from the gateway: its n choices (engine requests) share one queue."""

    rid: str
    queue: asyncio.Queue[TextOut]
    arrival: float
    choices: list[str] = field(default_factory=list)  # rid of each choice; [rid] when n is 1
    finished: set[str] = field(default_factory=set)
    first_token_at: float | None = None
    last_chunk_at: float | None = None
    itls: list[float] = field(default_factory=list)
    checked_at: float = 0.0  # time.monotonic() of the last client-disconnect check

    @property
    def done(self) -> bool:
        return len(self.finished) >= len(self.choices)

    def index(self, rid: str) -> int:
        return 0 if len(self.choices) == 1 else self.choices.index(rid)

    async def next(self) -> TextOut:
        item = await self.queue.get()
        self._book(item)
        return item

    def drain(self) -> list[TextOut]:
        """Every item already queued, without waiting."""
        items = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            self._book(item)
            items.append(item)
        return items

    async def next_or_gone(self, request: Request, poll_s: float = 0.5) -> TextOut | None:
        """The next item, or None once the client has disconnected (checked every poll_s, whether
        items keep coming or not)."""
        while True:
            now = time.monotonic()
            if now - self.checked_at >= poll_s:
                self.checked_at = now
                if await request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(self.next(), timeout=poll_s)
            except asyncio.TimeoutError:
                pass

    def _book(self, item: TextOut) -> None:
        now = time.time()
        if item.text:
            if self.first_token_at is None:
                self.first_token_at = now
            elif self.last_chunk_at is not None:
                self.itls.append(now - self.last_chunk_at)
            self.last_chunk_at = now
        if item.finish_reason is not None:
            self.finished.add(item.rid)


@dataclass
class ChoiceResult:
    """A whole (non-streamed) choice, gathered item by item."""

    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    last: TextOut | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, item: TextOut) -> None:
        self.parts.append(item.text)
        self.logprobs += item.logprobs
        self.prompt_logprobs = self.prompt_logprobs or item.prompt_logprobs
        if item.finish_reason is not None:
            self.last = item


_JSON = msgspec.json.Encoder()


def coalesce(items: list[TextOut]) -> list[TextOut]:
    """Back-to-back items of one choice as one: a stream that fell behind (its queue holds several
    steps' deltas when it wakes) writes one event for all of them instead of one per token, so the
    gateway's work per token falls as its load rises. Same text, logprobs and final fields."""
    out: list[TextOut] = []
    for item in items:
        last = out[-1] if out else None
        if last is not None and last.rid == item.rid and last.finish_reason is None and last.error is None:
            item = msgspec.structs.replace(item, text=last.text + item.text, logprobs=last.logprobs + item.logprobs,
                                           prompt_logprobs=last.prompt_logprobs or item.prompt_logprobs)
            out[-1] = item
        else:
            out.append(item)
    return out


def merged_usage(lasts: list[TextOut]) -> Usage | None:
    """n choices: the prompt counts once; cached_tokens is the best reuse among them."""
    usages = [t.usage for t in lasts if t.usage is not None]
    if not usages:
        return None
    return Usage(prompt_tokens=usages[0].prompt_tokens, completion_tokens=sum(u.completion_tokens for u in usages),
                 cached_tokens=max(u.cached_tokens for u in usages))


class Bridge:
    """ZeroMQ on one side, asyncio queues on the other."""

    def __init__(self, cfg: ServerConfig, live: LiveStats | None = None) -> None:
        self.cfg = cfg
        self.live = live or LiveStats()
        self.tokenize_waiters: dict[str, asyncio.Future[TokenizeReply]] = {}
        self.sync_ctx = zmq.Context()
        self.async_ctx = zmq.asyncio.Context()
        # A plain socket for sending: a send never blocks (no high-water mark) and needs no await, so it
        # also works in a `finally` of a cancelled stream. Requests and aborts share it, so an abort
        # always reaches the tokenizer after its request, wherever that request is by then.
        self.to_tokenizer = ipc.connect_push(self.sync_ctx, cfg.endpoint("tokenizer"))
        self.pull = self.async_ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(cfg.endpoint("gateway"))
        self.decoder = ipc.FrameDecoder(GatewayInMsg, "gateway")
        self.streams: dict[str, Stream] = {}
        self.reader: asyncio.Task | None = None

    async def read_forever(self) -> None:
        while True:
            msg = self.decoder.decode(await self.pull.recv())
            if isinstance(msg, TextBatch):
                self.live.chunks(sum(1 for item in msg.items if item.text))
                for item in msg.items:
                    stream = self.streams.get(item.rid)
                    if stream is not None:
                        stream.queue.put_nowait(item)
            elif isinstance(msg, TokenizeReply):
                waiter = self.tokenize_waiters.pop(msg.rid, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
            elif isinstance(msg, Narration):
                self.live.narrate(msg.source, msg.lines)
            elif isinstance(msg, PeerRestarted) and msg.name == "tokenizer":
                n = self.fail_all("the tokenizer process restarted; this request was lost, retry it")
                log.error("tokenizer restarted: ended %d open request(s) with an error", n)

    def fail_all(self, error: str, status: int = 503) -> int:
        """End every open request with a final error item per unfinished choice (and abort it wherever
        it still runs)."""
        streams = {id(s): s for s in self.streams.values() if not s.done}.values()
        for stream in streams:
            for choice in stream.choices:
                if choice not in stream.finished:
                    stream.queue.put_nowait(TextOut(rid=choice, finish_reason=FINISH_ERROR, error=error, status=status))
                    ipc.send(self.to_tokenizer, AbortReq(choice))
        return len(streams)

    def submit(self, parsed: ParsedRequest) -> Stream:
        rid = uuid.uuid4().hex
        n = parsed.n
        stream = Stream(rid, asyncio.Queue(), time.time(), choices=[rid] if n == 1 else [f"{rid}-{i}" for i in range(n)])
        for i, choice in enumerate(stream.choices):
            ipc.send(self.to_tokenizer, GenerateReq(rid=choice, prompt=parsed.prompt, messages=parsed.messages,
                                                    params=choice_seed(parsed.params, i, n), arrival=stream.arrival,
                                                    chat_prompt=parsed.chat_prompt, group=rid if n > 1 else ""))
            self.streams[choice] = stream  # only once it was sent: a send that raised leaves nothing behind
        return stream

    def release(self, stream: Stream) -> None:
        """The client is gone or served: abort whatever is still running, forget the queue. Idempotent."""
        for choice in stream.choices:
            if self.streams.pop(choice, None) is not None and choice not in stream.finished:
                ipc.send(self.to_tokenizer, AbortReq(choice))

    async def tokenize(self, req: TokenizeReq, timeout: float = 10.0) -> TokenizeReply:
        waiter: asyncio.Future[TokenizeReply] = asyncio.get_running_loop().create_future()
        self.tokenize_waiters[req.rid] = waiter
        ipc.send(self.to_tokenizer, req)
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self.tokenize_waiters.pop(req.rid, None)

    async def control(self, command: str, timeout: float = 2.0) -> dict | None:
        if not self.cfg.zmq_control:
            return None
        sock = self.async_ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.cfg.control_endpoint)
        try:
            await sock.send_multipart([b"", msgspec.json.encode(ControlReq(command=command))])
            if not await sock.poll(int(timeout * 1000)):
                return None
            frames = await sock.recv_multipart()
            reply = msgspec.json.decode(frames[-1], type=ControlReply)
            return reply.data if reply.ok else None
        finally:
            sock.close()


Formatter = Callable[[TextOut], list[str]]


class ReleasingStream(StreamingResponse):
    """A StreamingResponse that releases its request however the response ends: finished, cut by a
    disconnect, or cancelled before its body generator ever ran (whose `finally` would then never run)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Gateway:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.live = LiveStats()
        self.bridge = Bridge(cfg, self.live)
        self.metrics = GatewayMetrics()
        self.context_len = context_window(cfg)
        name = cfg.served_model_name or "default"
        self.model_names = {name, name.split("/")[-1], "default"}
        self.draining = False  # SIGTERM: new requests get 503 while open ones finish

    # ------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        relay_local(self.cfg, self.live.narrate)
        self.bridge.reader = asyncio.create_task(self.bridge.read_forever())
        if ipc.is_restart():  # whatever the old gateway had in flight has no client any more
            ipc.send(self.bridge.to_tokenizer, PeerRestarted("gateway"))
        ipc.report_ready(self.bridge.sync_ctx, self.cfg, "gateway", url=f"http://{self.cfg.host}:{self.cfg.port}")

    async def drain(self, grace_s: float) -> None:
        """Stop taking requests, give open ones grace_s to finish, then end each with an error event."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.bridge.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        n = self.bridge.fail_all(f"the server is shutting down; this request did not finish within the "
                                 f"{grace_s:g}s grace period")
        if n:
            log.warning("drain: ended %d open request(s) with an error event", n)
        deadline = time.monotonic() + 2.0  # let those error events reach their clients
        while self.bridge.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------ the common request path

    async def _body(self, request: Request) -> Any:
        """The JSON body, read up to MAX_BODY_BYTES (413 beyond), every string valid Unicode."""
        limit = self.cfg.max_body_bytes
        too_big = RequestError(f"request body exceeds {limit} bytes (MAX_BODY_BYTES)", status=413, code="body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"malformed JSON body: {e}") from None
        except RecursionError:
            raise RequestError("malformed JSON body: nested too deeply") from None
        check_encodable(body)
        return body

    async def serve(self, request: Request, parse: Callable[..., ParsedRequest],
                    stream_fmt: Callable[[Stream, ParsedRequest], Formatter], stream_tail: list[str],
                    whole_fmt: Callable[[Stream, ParsedRequest, list[ChoiceResult]], dict], media_type: str) -> Response:
        if self.draining:
            return error_response("the server is shutting down", 503, code="shutting_down")
        try:
            parsed = parse(await self._body(request), self.cfg, self.model_names)
        except RequestError as e:
            self.metrics.rejected.labels(str(e.status)).inc()
            return error_response(e.message, e.status, e.code, e.param)
        stream = self.bridge.submit(parsed)
        handed_off = False  # once the streaming response owns the request, it releases it
        try:
            first = await stream.next_or_gone(request)
            if first is None:  # client left before the first token
                return Response(status_code=499)
            if first.error is not None and first.status != 200 and not first.text:
                self.metrics.rejected.labels(str(first.status)).inc()
                return error_response(first.error, first.status, code="overloaded" if first.status == 429 else "request_failed")
            if not parsed.stream:
                return await self._whole(request, stream, parsed, first, whole_fmt)
            response = ReleasingStream(self._stream_body(stream, first, stream_fmt(stream, parsed), stream_tail),
                                       lambda: self.bridge.release(stream), media_type=media_type,
                                       headers={"Cache-Control": "no-cache", "X-Request-Id": stream.rid})
            handed_off = True
            return response
        finally:
            if not handed_off:
                self.bridge.release(stream)

    async def _stream_body(self, stream: Stream, first: TextOut, fmt: Formatter, tail: list[str]) -> AsyncIterator[str]:
        item: TextOut | None = first
        while item is not None:
            chunks: list[str] = []
            for it in coalesce([item, *stream.drain()]):  # all that queued up: one write
                if self.cfg.narrate and it.text:
                    log.info("stream rid=%s chunk %r", stream.rid[:8], it.text)
                chunks += fmt(it)
            if chunks:
                yield "".join(chunks)
            item = None if stream.done else await stream.next()
        for chunk in tail:
            yield chunk

    async def _whole(self, request: Request, stream: Stream, parsed: ParsedRequest, first: TextOut,
                     whole_fmt: Callable[[Stream, ParsedRequest, list[ChoiceResult]], dict]) -> Response:
        """A non-streamed answer: collected here, and aborted like a stream when the client leaves."""
        results = [ChoiceResult() for _ in stream.choices]
        results[stream.index(first.rid)].add(first)
        while not stream.done:
            item = await stream.next_or_gone(request)
            if item is None:
                return Response(status_code=499)  # the caller's finally releases (aborts) it
            results[stream.index(item.rid)].add(item)
        for res in results:
            if res.last is not None and res.last.error is not None:
                return error_response(res.last.error, res.last.status if res.last.status >= 400 else 500,
                                      code="request_failed")
        return JSONResponse(whole_fmt(stream, parsed, results))

    def finish(self, stream: Stream, item: TextOut) -> None:
        """Book-keeping at a request's last item: metrics and the per-request log line."""
        u = item.usage
        e2e = time.time() - stream.arrival
        ttft = stream.first_token_at - stream.arrival if stream.first_token_at else None
        if u is not None:
            self.metrics.observe(item.finish_reason or "", u.prompt_tokens, u.completion_tokens, u.cached_tokens,
                                 ttft, stream.itls, e2e)
            self.live.finished(item.rid, item.finish_reason or "", u.prompt_tokens, u.cached_tokens,
                               u.completion_tokens, ttft, stream.itls, e2e, item.worker_id)
            hit = 100.0 * u.cached_tokens / u.prompt_tokens if u.prompt_tokens else 0.0
            log.info("rid=%s finish=%s prompt=%d cached=%d (hit %.0f%%, miss %d) completion=%d ttft=%s e2e=%.3fs%s",
                     stream.rid[:8], item.finish_reason, u.prompt_tokens, u.cached_tokens, hit,
                     u.prompt_tokens - u.cached_tokens, u.completion_tokens,
                     f"{ttft:.3f}s" if ttft is not None else "-", e2e,
                     f" error={item.error}" if item.error else "")

    def usage_dict(self, item: TextOut | Usage | None, openai: bool) -> dict:
        u = item.usage if isinstance(item, TextOut) else item
        if u is None:
            return {}
        d: dict[str, Any] = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens}
        if openai:
            d["total_tokens"] = u.prompt_tokens + u.completion_tokens
            d["prompt_tokens_details"] = {"cached_tokens": u.cached_tokens}
        else:
            d["cached_tokens"] = u.cached_tokens
        return d

    # ------------------------------------------------------------ /generate (JSON lines)

    async def generate(self, request: Request) -> Response:
        def fmt_factory(stream: Stream, parsed: ParsedRequest) -> Formatter:
            def fmt(item: TextOut) -> list[str]:
                lines = []
                if item.text:
                    lines.append(_JSON.encode({"text_delta": item.text}).decode() + "\n")
                if item.finish_reason is not None:
                    self.finish(stream, item)
                    lines.append(_JSON.encode(self._done_event(item)).decode() + "\n")
                return lines
            return fmt

        def whole(stream: Stream, parsed: ParsedRequest, results: list[ChoiceResult]) -> dict:
            res = results[0]
            assert res.last is not None
            self.finish(stream, res.last)
            return {"text": res.text, **self._done_event(res.last)}

        return await self.serve(request, parse_generate, fmt_factory, [], whole, "application/x-ndjson")

    def _done_event(self, item: TextOut) -> dict:
        if item.error is not None:
            return {"event": "error", "error": item.error, "status": item.status, "finish_reason": item.finish_reason,
                    "usage": self.usage_dict(item, openai=False)}
        event: dict[str, Any] = {"event": "done", "finish_reason": item.finish_reason, "usage": self.usage_dict(item, openai=False)}
        if item.max_new_tokens_scaled_from is not None:
            event["max_new_tokens_scaled_from"] = item.max_new_tokens_scaled_from
        if item.worker_id >= 0:
            event["worker_id"] = item.worker_id
        return event

    # ------------------------------------------------------------ OpenAI-compatible

    @staticmethod
    def _openai_finish(reason: str | None) -> str | None:
        return None if reason is None else ("length" if reason == "length" else "stop")

    def _sse(self, obj: dict) -> str:
        return f"data: {_JSON.encode(obj).decode()}\n\n"  # msgspec: ~4x json.dumps, on every token

    def _openai_stream(self, chat: bool) -> Callable[[Stream, ParsedRequest], Formatter]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        prefix = "chatcmpl-" if chat else "cmpl-"

        def factory(stream: Stream, parsed: ParsedRequest) -> Formatter:
            head = {"id": prefix + stream.rid, "object": obj, "created": int(stream.arrival), "model": parsed.model}
            started: set[int] = set()  # choices that sent their role (chat) / their echoed prompt
            offsets = [0] * len(stream.choices)  # completions: text_offset of each choice's next token
            lasts: list[TextOut] = []

            def choice(index: int, item: TextOut | None, finish: str | None) -> dict:
                text = item.text if item is not None else ""
                lps = item.logprobs if item is not None else []
                if chat:
                    delta: dict[str, str] = {"content": text} if text or finish is None else {}
                    if index not in started:
                        delta = {"role": "assistant", **delta}
                        started.add(index)
                    out = {"index": index, "delta": delta, "finish_reason": finish}
                    if parsed.logprobs:
                        out["logprobs"] = chat_logprobs(lps) if lps else None
                    return out
                entries = lps
                if parsed.echo and index not in started and item is not None:
                    started.add(index)
                    text = (parsed.prompt or "") + text
                    entries = item.prompt_logprobs + lps
                logprobs = None
                if parsed.logprobs and entries:
                    logprobs = completion_logprobs(entries, offsets[index])
                    offsets[index] += sum(len(e.token) for e in entries)
                return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}

            def fmt(item: TextOut) -> list[str]:
                out = []
                index = stream.index(item.rid)
                if item.text or item.logprobs or item.prompt_logprobs:
                    out.append(self._sse({**head, "choices": [choice(index, item, None)]}))
                if item.finish_reason is not None:
                    self.finish(stream, item)
                    if item.error is not None:
                        out.append(self._sse({"error": {"message": item.error, "type": "server_error", "code": item.status}}))
                        return out
                    lasts.append(item)
                    out.append(self._sse({**head, "choices": [choice(index, None, self._openai_finish(item.finish_reason))]}))
                    if parsed.include_usage and len(lasts) == len(stream.choices):
                        # worker_id is ours, not OpenAI's: the chat page shows which worker served it
                        out.append(self._sse({**head, "choices": [], "usage": self.usage_dict(merged_usage(lasts), openai=True),
                                              "worker_id": lasts[0].worker_id}))
                return out
            return fmt
        return factory

    def _openai_whole(self, chat: bool) -> Callable[[Stream, ParsedRequest, list[ChoiceResult]], dict]:
        def whole(stream: Stream, parsed: ParsedRequest, results: list[ChoiceResult]) -> dict:
            choices = []
            lasts = [r.last for r in results if r.last is not None]
            for index, res in enumerate(results):
                assert res.last is not None
                self.finish(stream, res.last)
                finish = self._openai_finish(res.last.finish_reason)
                if chat:
                    lp = chat_logprobs(res.logprobs) if parsed.logprobs else None
                    choices.append({"index": index, "message": {"role": "assistant", "content": res.text},
                                    "finish_reason": finish, "logprobs": lp})
                else:
                    text = ((parsed.prompt or "") + res.text) if parsed.echo else res.text
                    entries = (res.prompt_logprobs + res.logprobs) if parsed.echo else res.logprobs
                    lp = completion_logprobs(entries, 0) if parsed.logprobs else None
                    choices.append({"index": index, "text": text, "finish_reason": finish, "logprobs": lp})
            return {"id": ("chatcmpl-" if chat else "cmpl-") + stream.rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(stream.arrival), "model": parsed.model, "choices": choices,
                    "usage": self.usage_dict(merged_usage(lasts), openai=True),
                    "worker_id": lasts[0].worker_id if lasts else -1}
        return whole

    async def completions(self, request: Request) -> Response:
        return await self.serve(request, parse_completion, self._openai_stream(False), ["data: [DONE]\n\n"],
                                self._openai_whole(False), "text/event-stream")

    async def chat_completions(self, request: Request) -> Response:
        return await self.serve(request, parse_chat, self._openai_stream(True), ["data: [DONE]\n\n"],
                                self._openai_whole(True), "text/event-stream")

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.cfg.served_model_name, "object": "model", "created": 0, "owned_by": "mini-sglang",
             "max_model_len": self.context_len, "backend": self.cfg.backend}]})

    # ------------------------------------------------------------ health and metrics

    async def health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.cfg.served_model_name, "backend": self.cfg.backend})

    async def metrics_endpoint(self, request: Request) -> Response:
        sched = await self.bridge.control("metrics")
        self.metrics.update_from_scheduler(sched)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"totals": self.metrics.totals(), "rolling": self.metrics.rolling(),
                                 "scheduler": sched, "inflight_streams": len(self.bridge.streams)})
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def create_app(cfg: ServerConfig) -> Starlette:
    gw = Gateway(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.startup()
        yield

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(f"no route {request.method} {request.url.path}", 404, code="not_found")

    async def bad_method(request: Request, exc: Exception) -> Response:
        return error_response(f"method {request.method} not allowed on {request.url.path}", 405, code="method_not_allowed")

    async def internal_error(request: Request, exc: Exception) -> Response:
        # A bug, not bad input: still JSON, and the request's entry was released by serve()'s finally.
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(f"internal error: {type(exc).__name__}", 500, code="internal_error")

    routes = [
        Route("/generate", gw.generate, methods=["POST"]),
        Route("/v1/completions", gw.completions, methods=["POST"]),
        Route("/v1/chat/completions", gw.chat_completions, methods=["POST"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/health", gw.health, methods=["GET"]),
        Route("/metrics", gw.metrics_endpoint, methods=["GET"]),
        *pages.routes(gw),  # /, /dashboard, their data, /tokenize, /detokenize
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=guard_middleware(cfg),
                    exception_handlers={404: not_found, 405: bad_method, Exception: internal_error})
    app.state.gateway = gw
    return app
