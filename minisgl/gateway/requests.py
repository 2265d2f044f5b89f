"""HTTP request bodies -> GenerateReq, with errors that name the problem (HTTP 4xx)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minisgl.gateway.errors import RequestError
from minisgl.config import ServerConfig
from minisgl.gateway.openai_extras import parse_extras
from minisgl.messages import ChatMessage, SamplingParams

MAX_STOP_STRINGS = 16
MAX_TOKEN_ID = 2**31 - 1  # no vocabulary comes near; beyond it an id cannot even cross the socket
# Below this a temperature is greedy in all but name: logits / t overflow float32 near 1e-38 and the
# softmax turns into NaN. Such a request is served greedily, the limit t -> 0 it asks for.
MIN_TEMPERATURE = 1e-5

# ------------------------------------------------------------ which fields each endpoint knows
# A field outside these sets is refused by name (400), never silently ignored.
CHAT_ROLES = ("system", "user", "assistant")
MESSAGE_FIELDS = {"role", "content"}
# The OpenAI extras (choices, logprobs, penalties, bias) are read by openai_extras.parse_extras.
OPENAI_EXTRA_FIELDS = {"n", "best_of", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias"}
SAMPLING_FIELDS = {"model", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "stream"}
GENERATE_FIELDS = SAMPLING_FIELDS | {"prompt", "messages", "raw", "max_new_tokens"}
# "user" is an end-user id for the provider's abuse monitoring: nothing to honour, nothing lost.
OPENAI_FIELDS = SAMPLING_FIELDS | OPENAI_EXTRA_FIELDS | {"stream_options", "user"}
COMPLETION_FIELDS = OPENAI_FIELDS | {"prompt", "max_tokens", "echo"}
CHAT_FIELDS = OPENAI_FIELDS | {"messages", "max_tokens", "max_completion_tokens", "top_logprobs"}


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

    def only(self, known: set[str], endpoint: str) -> None:
        """Refuse, by name, every field this endpoint does not honour (null counts as absent)."""
        unknown = sorted(k for k, v in self.body.items() if k not in known and v is not None)
        if unknown:
            raise RequestError(f"unsupported field(s) for {endpoint}: {', '.join(repr(k) for k in unknown)}",
                               param=unknown[0], code="unsupported_field")

    def check_prompt_size(self, prompt: str | None, messages: list[ChatMessage] | None) -> None:
        """The character cap, checked before any tokenizing: a huge prompt is refused in microseconds
        instead of holding the tokenizer (and every request behind it) for seconds."""
        chars = len(prompt) if prompt is not None else sum(len(m.content) for m in messages or [])
        if chars > self.cfg.max_prompt_chars:
            field = "prompt" if prompt is not None else "messages"
            raise RequestError(f"'{field}' is {chars} characters; the limit is {self.cfg.max_prompt_chars} "
                               f"(MAX_PROMPT_CHARS)", param=field, code="prompt_too_long")

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
        if not isinstance(v, list) or not all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in v):
            raise RequestError(f"'stop_token_ids' must be a list of integers between 0 and {MAX_TOKEN_ID}",
                               param="stop_token_ids")
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
            if m["role"] not in CHAT_ROLES:
                raise RequestError(f"messages[{i}].role {m['role']!r} is not supported; use one of "
                                   f"{', '.join(CHAT_ROLES)}", param="messages")
            extra = sorted(k for k, val in m.items() if k not in MESSAGE_FIELDS and val is not None)
            if extra:
                raise RequestError(f"messages[{i}]: unsupported field(s) {', '.join(repr(k) for k in extra)}",
                                   param="messages", code="unsupported_field")
            out.append(ChatMessage(role=m["role"], content=self._content(i, m.get("content"))))
        if not any(m.content.strip() for m in out):
            raise RequestError("'messages' must contain some non-empty content", param="messages")
        return out

    @staticmethod
    def _content(i: int, content: Any) -> str:
        if isinstance(content, list):  # OpenAI content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise RequestError(f"messages[{i}].content[{j}]: content part type {kind!r} is not supported; "
                                       "only 'text'", param="messages")
                if not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}].content[{j}].text must be a string", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
        return content

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
        temperature = self.number("temperature", default_temperature, 0.0, 100.0)
        return SamplingParams(
            max_new_tokens=max_new or cfg.default_max_new_tokens,
            temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
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
    v.only(GENERATE_FIELDS, "/generate")
    model = v.model(known_models)
    raw = v.boolean("raw", False)
    if "messages" in v.body and v.body["messages"] is not None:
        prompt, messages = None, v.messages()
    else:
        prompt, messages = v.prompt(allow_list=False), None
    v.check_prompt_size(prompt, messages)
    return ParsedRequest(prompt, messages, v.sampling("max_new_tokens", 0.0), v.boolean("stream", True), False, model,
                         chat_prompt=not raw)


def _include_usage(v: Validator) -> bool:
    opts = v.get("stream_options", {})
    if not isinstance(opts, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    return bool(opts.get("include_usage", False))


def parse_completion(body: Any, cfg: ServerConfig, known_models: set[str]) -> ParsedRequest:
    v = Validator(body, cfg)
    v.only(COMPLETION_FIELDS, "/v1/completions")
    model = v.model(known_models)
    params, extras = parse_extras(v, False, v.sampling("max_tokens", 1.0), cfg.backend)
    prompt = v.prompt(allow_list=True)
    v.check_prompt_size(prompt, None)
    return ParsedRequest(prompt, None, params, v.boolean("stream", False), _include_usage(v), model,
                         n=extras.n, logprobs=extras.logprobs, echo=extras.echo)


def parse_chat(body: Any, cfg: ServerConfig, known_models: set[str]) -> ParsedRequest:
    v = Validator(body, cfg)
    v.only(CHAT_FIELDS, "/v1/chat/completions")
    model = v.model(known_models)
    field = "max_completion_tokens" if v.body.get("max_completion_tokens") is not None else "max_tokens"
    params, extras = parse_extras(v, True, v.sampling(field, 1.0), cfg.backend)
    messages = v.messages()
    v.check_prompt_size(None, messages)
    return ParsedRequest(None, messages, params, v.boolean("stream", False), _include_usage(v), model,
                         n=extras.n, logprobs=extras.logprobs)


def check_encodable(body: Any) -> None:
    """Every string in a decoded JSON body must be valid Unicode: JSON lets a client write a lone
    surrogate ("\\ud800"), which no socket (UTF-8, msgpack) can carry."""
    todo: list[tuple[str, Any]] = [("body", body)]
    while todo:
        path, v = todo.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RequestError(f"{path} holds invalid Unicode (a lone surrogate at character {e.start})",
                                   param=path.split(".")[1].split("[")[0] if "." in path else None) from None
        elif isinstance(v, dict):
            for k, item in v.items():
                if isinstance(k, str):
                    todo.append((f"{path}.{k}", item))
                    todo.append((f"{path} key", k))
        elif isinstance(v, list):
            todo.extend((f"{path}[{i}]", item) for i, item in enumerate(v))
