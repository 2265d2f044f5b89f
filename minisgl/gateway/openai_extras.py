"""The rest of the OpenAI request surface: n, logprobs / top_logprobs, echo, penalties, logit_bias.

Each field is validated by name and either honoured or refused with a 400 that names it: the fields
computed in the engine (log-probabilities, penalties, biases) are refused on backends that do not have
them (minisgl/backends/features.py). Also here: the OpenAI `logprobs` objects of responses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgspec

from minisgl.backend_registry import backend_supports
from minisgl.gateway.errors import RequestError
from minisgl.messages import SamplingParams, TokenLogprob

MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat
MAX_COMPLETION_LOGPROBS = 20  # OpenAI says 5; vLLM allows more


@dataclass(frozen=True)
class Extras:
    n: int = 1
    logprobs: bool = False  # put logprobs into the response
    echo: bool = False  # completions: the prompt comes back before the completion


def _require(backend: str, feature: str, field: str) -> None:
    if not backend_supports(backend, feature):
        raise RequestError(f"'{field}' is not supported by the {backend} backend "
                           f"(it is computed in the engine of the torch and sgl backends)", param=field)


def parse_extras(v: Any, chat: bool, params: SamplingParams, backend: str) -> tuple[SamplingParams, Extras]:
    """v: a requests.Validator over the body. Returns the sampling params with the extras folded in."""
    n = v.integer("n", 1, 1, MAX_N)
    best_of = v.body.get("best_of")
    if best_of is not None and best_of != n:
        raise RequestError("'best_of' is not supported (only best_of == n, which is the same as leaving it out)",
                           param="best_of")
    updates: dict[str, Any] = {}
    echo = False
    want = False
    if chat:
        want = v.boolean("logprobs", False)
        top = v.integer("top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not want:
            raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if want:
            _require(backend, "logprobs", "logprobs")
            updates["logprobs"] = top or 0
    else:
        k = v.integer("logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
        echo = v.boolean("echo", False)
        if k is not None:
            want = True
            _require(backend, "logprobs", "logprobs")
            updates["logprobs"] = k
            if echo:
                _require(backend, "prompt_logprobs", "echo")
                updates["prompt_logprobs"] = k
    for name in ("presence_penalty", "frequency_penalty"):
        value = v.number(name, 0.0, -2.0, 2.0)
        if value:
            _require(backend, "penalties", name)
            updates[name] = value
    bias = _logit_bias(v.get("logit_bias", {}))
    if bias:
        _require(backend, "logit_bias", "logit_bias")
        updates["logit_bias"] = bias
    if updates:
        params = msgspec.structs.replace(params, **updates)
    return params, Extras(n=n, logprobs=want, echo=echo)


def _logit_bias(value: Any) -> dict[int, float]:
    if not isinstance(value, dict):
        raise RequestError("'logit_bias' must be an object mapping token ids to numbers", param="logit_bias")
    out: dict[int, float] = {}
    for key, bias in value.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise RequestError(f"'logit_bias' keys must be token ids, got {key!r}", param="logit_bias") from None
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise RequestError(f"'logit_bias' values must be numbers between -100 and 100, got {bias!r}",
                               param="logit_bias")
        if tok < 0:
            raise RequestError(f"'logit_bias' token ids must be non-negative, got {tok}", param="logit_bias")
        out[tok] = float(bias)
    return out


def choice_seed(params: SamplingParams, index: int, n: int) -> SamplingParams:
    """Choice i of n draws with seed + i, so seeded choices differ from each other yet repeat."""
    if n == 1 or params.seed is None:
        return params
    return msgspec.structs.replace(params, seed=(params.seed + index) % 2**63)


# ---------------------------------------------------------------- response objects


def _finite(x: float | None) -> float | None:
    """JSON has no -inf: a token the model rules out entirely gets OpenAI's floor of -9999."""
    if x is None:
        return None
    return x if math.isfinite(x) else -9999.0


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    return {"content": [
        {"token": e.token, "logprob": _finite(e.logprob), "bytes": list(e.token.encode()),
         "top_logprobs": [{"token": t.token, "logprob": _finite(t.logprob), "bytes": list(t.token.encode())}
                          for t in e.top]}
        for e in entries]}


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict:
    """OpenAI's legacy completions shape; offset: text position of the first entry's token."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [_finite(e.logprob) for e in entries],
            "top_logprobs": [None if e.logprob is None else {t.token: _finite(t.logprob) for t in e.top}
                             for e in entries],
            "text_offset": offsets}
