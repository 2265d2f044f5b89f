"""How the gateway refuses a request: RequestError (raised while parsing, carries the HTTP status and
the field at fault) and error_response (OpenAI's error body). Below every other gateway module, so the
parsers and the pages use them without importing the app."""

from __future__ import annotations

from starlette.responses import JSONResponse


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


def error_response(message: str, status: int, code: str = "invalid_request", param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse({"error": {"message": message, "type": kind, "code": code, "param": param}},
                        status_code=status, headers=headers)
