"""A tiny stand-in for the gateway's streaming protocol, for fast client-side unit tests.

It speaks exactly the /generate contract (JSON lines: text deltas, then a done or error event; HTTP
errors before the stream) and lets a test pick a behaviour through the prompt. The real server is
exercised by the end-to-end tests; this one only pins down how the client reads the protocol.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from minisgl.server_handle import free_port

DELTA_DELAY_S = 0.01


def _line(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()


async def _stream(prompt: str, n: int) -> AsyncIterator[bytes]:
    yield _line({"text_delta": ""})  # an empty chunk must not count as the first token
    for i in range(n):
        await asyncio.sleep(DELTA_DELAY_S)
        yield _line({"text_delta": f" t{i}"})
        if prompt == "error-mid" and i == 1:
            yield _line({"event": "error", "error": "worker died", "status": 500})
            return
    if prompt == "no-done":
        return
    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n, "cached_tokens": 1}
    yield _line({"event": "done", "finish_reason": "length", "usage": usage})


async def generate(request: Request) -> StreamingResponse | JSONResponse:
    body = await request.json()
    prompt = body.get("prompt") or body["messages"][-1]["content"]
    if prompt == "http-400":
        err = {"message": "max_new_tokens must be positive", "type": "invalid_request_error", "code": 400}
        return JSONResponse({"error": err}, status_code=400)
    n = int(body.get("max_new_tokens", 4))
    return StreamingResponse(_stream(prompt, n), media_type="application/x-ndjson")


async def models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> JSONResponse:
    return JSONResponse({"backend": "fake"})


APP = Starlette(routes=[Route("/generate", generate, methods=["POST"]), Route("/v1/models", models),
                        Route("/health", health), Route("/metrics", metrics)])


class FakeGateway:
    """`with FakeGateway() as url:` serves APP on a free port in a background thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(APP, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("fake gateway did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
