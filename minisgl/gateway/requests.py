"""HTTP request bodies -> GenerateReq, with errors that name the problem (HTTP 4xx)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minisgl.config import ServerConfig
from minisgl.gateway.openai_extras import parse_extras
from minisgl.messages import ChatMessage, SamplingParams

MAX_STOP_STRINGS = 16


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


@dataclass(frozen=True)
class ParsedRequest:
    prompt: str | None
    messages: list[ChatMessage] | None
    params: SamplingParams
    stream: bool
    include_usage: bool  # OpenAI stream_options.include_usage
    model: str
    chat_prompt: bool = False
    n: int = 1  # OpenAI choices, each its own engine request sharing the prompt (openai_extras.py)
    logprobs: bool = False  # the response carries logprobs
    echo: bool = False  # completions: the prompt text (and its logprobs) comes first


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Validator:
    """Reads one JSON body field by field; every error names its field."""

    def __init__(self, body: Any, cfg: ServerConfig) -> None:
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        self.body, self.cfg = body, cfg

    def get(self, name: str, default: Any = None) -> Any:
        value = self.body.get(name, default)
        return default if value is None else value

    def integer(self, name: str, default: int | None, lo: int, hi: int) -> int | None:
        v = self.get(name, default)
        if v is None:
            return None
        if not _is_int(v):
            raise RequestError(f"'{name}' must be an integer, got {type(v).__name__}", param=name)
        if not lo <= v <= hi:
            raise RequestError(f"'{name}' must be between {lo} and {hi}, got {v}", param=name)
        return v

    def number(self, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        v = self.get(name, default)
        if not _is_number(v):
            raise RequestError(f"'{name}' must be a number, got {type(v).__name__}", param=name)
        if not (lo < v if lo_open else lo <= v) or v > hi:
            bound = f"greater than {lo}" if lo_open else f"at least {lo}"
            raise RequestError(f"'{name}' must be {bound} and at most {hi}, got {v}", param=name)
        return float(v)

    def boolean(self, name: str, default: bool) -> bool:
        v = self.get(name, default)
        if not isinstance(v, bool):
            raise RequestError(f"'{name}' must be true or false, got {type(v).__name__}", param=name)
        return v

    def stop(self) -> list[str]:
        v = self.get("stop", [])
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise RequestError("'stop' must be a string or a list of strings", param="stop")
        if len(v) > MAX_STOP_STRINGS:
            raise RequestError(f"'stop' may hold at most {MAX_STOP_STRINGS} strings", param="stop")
        return [s for s in v if s]

    def stop_token_ids(self) -> list[int]:
        v = self.get("stop_token_ids", [])
        if not isinstance(v, list) or not all(_is_int(t) and t >= 0 for t in v):
            raise RequestError("'stop_token_ids' must be a list of non-negative integers", param="stop_token_ids")
        return v

    def prompt(self, allow_list: bool) -> str:
        v = self.body.get("prompt")
        if allow_list and isinstance(v, list) and len(v) == 1:
            v = v[0]  # the OpenAI client may send a one-element list
        if v is None:
            raise RequestError("'prompt' is required", param="prompt")
        if not isinstance(v, str):
            raise RequestError("'prompt' must be a string" + (" (or a list of one string)" if allow_list else ""), param="prompt")
        if not v.strip():
            raise RequestError("'prompt' must not be empty", param="prompt")
        return v

    def messages(self) -> list[ChatMessage]:
        v = self.body.get("messages")
        if not isinstance(v, list) or not v:
            raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
        out: list[ChatMessage] = []
        for i, m in enumerate(v):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise RequestError(f"messages[{i}].content must be a string", param="messages")
            out.append(ChatMessage(role=m["role"], content=content))
        if not any(m.content.strip() for m in out):
            raise RequestError("'messages' must contain some non-empty content", param="messages")
        return out

    def model(self, known: set[str]) -> str:
        v = self.body.get("model")
        if v is None:
            return self.cfg.served_model_name
        if not isinstance(v, str) or v not in known:
            raise RequestError(f"model {v!r} is not served here; available: {sorted(known)}", status=404,
                               param="model", code="model_not_found")
        return v

    def sampling(self, max_tokens_field: str, default_temperature: float) -> SamplingParams:
        cfg = self.cfg
        max_new = self.integer(max_tokens_field, cfg.default_max_new_tokens, 1, cfg.max_new_tokens_limit)
        top_k = self.integer("top_k", 0, -1, 1_000_000)
        return SamplingParams(
            max_new_tokens=max_new or cfg.default_max_new_tokens,
            temperature=self.number("temperature", default_temperature, 0.0, 100.0),
            top_p=self.number("top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=max(0, top_k or 0),
            seed=self.integer("seed", None, -(2**63), 2**63 - 1),
            stop=self.stop(),
            stop_token_ids=self.stop_token_ids(),
            ignore_eos=self.boolean("ignore_eos", False),
        )


def parse_generate(body: Any, cfg: ServerConfig, known_models: set[str]) -> ParsedRequest:
    """Native /generate: 'prompt' or chat 'messages', greedy by default.

    A 'prompt' is sent as one user turn through the model's chat template (what an instruct model
    expects), unless "raw": true asks for plain text completion."""
    v = Validator(body, cfg)
    model = v.model(known_models)
    raw = v.boolean("raw", False)
    if "messages" in v.body and v.body["messages"] is not None:
        prompt, messages = None, v.messages()
    else:
        prompt, messages = v.prompt(allow_list=False), None
    return ParsedRequest(prompt, messages, v.sampling("max_new_tokens", 0.0), v.boolean("stream", True), False, model,
                         chat_prompt=not raw)


def _include_usage(v: Validator) -> bool:
    opts = v.get("stream_options", {})
    if not isinstance(opts, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    return bool(opts.get("include_usage", False))


def parse_completion(body: Any, cfg: ServerConfig, known_models: set[str]) -> ParsedRequest:
    v = Validator(body, cfg)
    model = v.model(known_models)
    params, extras = parse_extras(v, False, v.sampling("max_tokens", 1.0), cfg.backend)
    return ParsedRequest(v.prompt(allow_list=True), None, params, v.boolean("stream", False), _include_usage(v), model,
                         n=extras.n, logprobs=extras.logprobs, echo=extras.echo)


def parse_chat(body: Any, cfg: ServerConfig, known_models: set[str]) -> ParsedRequest:
    v = Validator(body, cfg)
    model = v.model(known_models)
    field = "max_completion_tokens" if v.body.get("max_completion_tokens") is not None else "max_tokens"
    params, extras = parse_extras(v, True, v.sampling(field, 1.0), cfg.backend)
    return ParsedRequest(None, v.messages(), params, v.boolean("stream", False), _include_usage(v), model,
                         n=extras.n, logprobs=extras.logprobs)
