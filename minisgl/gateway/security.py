"""Who may talk to the gateway: the Host / Origin / Content-Type checks and the API key.

One ASGI middleware in front of every route, so a route added later is covered without doing anything.

- Host must name the bound host (DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends
  `Host: evil.example`). A server bound to 0.0.0.0 / :: answers to any name unless ALLOWED_HOSTS says.
- Origin, when a browser sends one, must be this server's own (the chat page posting to the API) or
  listed in ALLOWED_ORIGINS. Browsers send Origin on every cross-site POST, so a page the user visits
  cannot drive a local server.
- POSTs with `Content-Type: text/plain` or `multipart/form-data` are refused (415): the bodies of
  cross-site "simple" requests, never what a JSON client sends.
- API_KEY, when set: `Authorization: Bearer <key>` (what the OpenAI client sends) on every route but
  /health and the page assets (GET /, /dashboard, /static/...), which hold no data and are what a
  browser navigation fetches (it cannot add a header; the page sends the key itself).
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from minisgl.config import ServerConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
OPEN_PATHS = ("/health", "/", "/dashboard", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)
CSRF_CONTENT_TYPES = ("text/plain", "multipart/form-data")


def _denied(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code, "param": None}},
                        status_code=status, headers=headers)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AccessGuard:
    """Pure ASGI middleware: checks run on the request head only, before any body is read."""

    def __init__(self, app: Any, cfg: ServerConfig) -> None:
        self.app = app
        self.api_key = cfg.api_key.encode()
        self.any_origin = "*" in cfg.allowed_origins
        self.origins = {o.rstrip("/").lower() for o in cfg.allowed_origins}
        self.any_host = "*" in cfg.allowed_hosts or (cfg.host in WILDCARD_BINDS and not cfg.allowed_hosts)
        names = set(LOOPBACK) if cfg.host in LOOPBACK else {cfg.host}
        self.hosts = {_host_port(n, cfg.port) for n in names} | {h.lower() for h in cfg.allowed_hosts}
        if cfg.port == 80:
            self.hosts |= {f"[{n}]" if ":" in n else n for n in names}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refusal = self.check(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope: Any) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "").lower()
        if not self.any_host and host not in self.hosts:
            return _denied(403, f"Host {host!r} is not served here (ALLOWED_HOSTS adds names)", "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self.origin_ok(origin.rstrip("/").lower(), host):
            return _denied(403, f"Origin {origin!r} may not use this server (ALLOWED_ORIGINS adds origins)",
                           "origin_not_allowed")
        method, path = scope["method"], scope["path"]
        if method == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media in CSRF_CONTENT_TYPES:
                return _denied(415, f"Content-Type {media} is not accepted; send application/json",
                               "unsupported_media_type")
        if self.api_key and not self.is_open(method, path):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                return _denied(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return None

    def origin_ok(self, origin: str, host: str) -> bool:
        if self.any_origin or origin in self.origins:
            return True
        return origin in (f"http://{host}", f"https://{host}")  # same origin (the host is already checked)

    @staticmethod
    def is_open(method: str, path: str) -> bool:
        return method in ("GET", "HEAD") and (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES))


def guard_middleware(cfg: ServerConfig) -> list[Middleware]:
    """The middleware stack: CORS (only when other origins are allowed; it answers their preflights,
    which carry no API key) outside the guard."""
    stack = [Middleware(AccessGuard, cfg=cfg)]
    if cfg.allowed_origins:
        stack.insert(0, Middleware(CORSMiddleware, allow_origins=list(cfg.allowed_origins),
                                   allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    return stack
