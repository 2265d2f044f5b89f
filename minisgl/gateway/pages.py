"""The gateway's pages and their small endpoints:

    GET  /                     the chat page (static/chat.html in page.html: plain HTML/JS/CSS, no build,
                               no CDN)
    GET  /dashboard            the live dashboard (static/dashboard.html in page.html)
    GET  /static/...           their assets
    GET  /dashboard/data       one JSON snapshot: /metrics' JSON plus per-second series, recent requests
    GET  /dashboard/narration  server-sent events: the --narrate lines of every process, live
    POST /tokenize, /detokenize  as vLLM and SGLang offer them (through the tokenizer process)
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from minisgl.gateway.errors import RequestError, error_response
from minisgl.gateway.requests import Validator
from minisgl.messages import TokenizeReq

if TYPE_CHECKING:
    from minisgl.gateway.app import Gateway

STATIC = Path(__file__).resolve().parent / "static"
NO_CACHE = {"Cache-Control": "no-cache"}


def rejected_by_status(gw: Gateway) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in gw.metrics.rejected.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[sample.labels["status"]] = out.get(sample.labels["status"], 0) + sample.value
    return out


def page(name: str) -> str:
    """A page: its body (static/<name>.html, after its first line, a comment) in the shell every page
    shares (static/page.html: head, stylesheet, common.js and the page's own <name>.js). Read per
    request, as static files are."""
    body = (STATIC / f"{name}.html").read_text().split("\n", 1)[1]
    return (STATIC / "page.html").read_text().replace("{name}", name).replace("{body}", body)


def routes(gw: Gateway) -> list[BaseRoute]:
    async def chat_page(request: Request) -> Response:
        return HTMLResponse(page("chat"), headers=NO_CACHE)

    async def dashboard_page(request: Request) -> Response:
        return HTMLResponse(page("dashboard"), headers=NO_CACHE)

    async def dashboard_data(request: Request) -> Response:
        sched = await gw.bridge.control("metrics")
        gw.metrics.update_from_scheduler(sched)
        cfg = gw.cfg
        return JSONResponse({
            "server": {"model": cfg.served_model_name, "backend": cfg.backend, "workers": cfg.workers,
                       "scheduler_mode": cfg.scheduler_mode, "max_model_len": gw.context_len,
                       "max_queue": cfg.max_queue, "max_inflight_total": cfg.max_inflight_total,
                       "narrate": cfg.narrate},
            "totals": gw.metrics.totals(), "rolling": gw.metrics.rolling(), "scheduler": sched,
            "inflight_streams": len({id(s) for s in gw.bridge.streams.values()}),
            "rejected_by_status": rejected_by_status(gw),
            "series": gw.live.series(), "recent": gw.live.recent_requests()})

    async def narration(request: Request) -> Response:
        q = gw.live.subscribe()

        async def events() -> AsyncIterator[str]:
            try:
                yield ": narration feed\n\n"
                while True:
                    try:
                        entry = await asyncio.wait_for(q.get(), timeout=15.0)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"  # also how a gone client is noticed
                        continue
                    yield f"id: {entry['seq']}\ndata: {json.dumps(entry)}\n\n"
            finally:
                gw.live.unsubscribe(q)

        return StreamingResponse(events(), media_type="text/event-stream", headers=NO_CACHE)

    async def tokenize(request: Request) -> Response:
        try:
            v = Validator(await gw._body(request), gw.cfg)
            v.model(gw.model_names)
            if v.body.get("messages") is not None:
                req = TokenizeReq(rid=uuid.uuid4().hex, messages=v.messages(),
                                  add_generation_prompt=v.boolean("add_generation_prompt", True))
            else:
                req = TokenizeReq(rid=uuid.uuid4().hex, prompt=v.prompt(allow_list=False),
                                  add_special_tokens=v.boolean("add_special_tokens", True))
            want_strs = v.boolean("return_token_strs", False)
        except RequestError as e:
            return _error(e)
        reply = await gw.bridge.tokenize(req)
        if reply.error is not None:
            return _error(RequestError(reply.error))
        body: dict[str, Any] = {"count": len(reply.token_ids), "max_model_len": gw.context_len, "tokens": reply.token_ids}
        if want_strs:
            body["token_strs"] = reply.token_strs
        return JSONResponse(body)

    async def detokenize(request: Request) -> Response:
        try:
            v = Validator(await gw._body(request), gw.cfg)
            v.model(gw.model_names)
            tokens = v.body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise RequestError("'tokens' must be a list of token ids", param="tokens")
        except RequestError as e:
            return _error(e)
        reply = await gw.bridge.tokenize(TokenizeReq(rid=uuid.uuid4().hex, token_ids=tokens))
        if reply.error is not None:
            return _error(RequestError(reply.error, param="tokens"))
        return JSONResponse({"prompt": reply.text})

    return [
        Route("/", chat_page, methods=["GET"]),
        Route("/dashboard", dashboard_page, methods=["GET"]),
        Route("/dashboard/data", dashboard_data, methods=["GET"]),
        Route("/dashboard/narration", narration, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]


def _error(e: RequestError) -> Response:
    return error_response(e.message, e.status, e.code, e.param)
