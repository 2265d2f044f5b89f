"""Every message that crosses a socket, as msgspec Structs.

Each socket carries one tagged union (see the `*Msg` aliases at the bottom), so a receiver decodes
straight into the right class with `msgspec.msgpack.Decoder(Union)`. Nothing here is ever pickled.

Flow (the README's process table has the whole picture):
  gateway --GenerateReq--> tokenizer --TokenizedReq--> scheduler --Dispatch--> worker
  worker --TokenBatch--> tokenizer --TextBatch--> gateway
  worker --WorkerStatus--> scheduler;   every process --ProcReady--> launcher
"""

from __future__ import annotations

from msgspec import Struct, field

# Finish reasons, as OpenAI spells them, plus "abort" (client went away / stop string) and "error".
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"


class SamplingParams(Struct, frozen=True, kw_only=True):
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means disabled
    seed: int | None = None
    stop: list[str] = []  # stop strings, handled by the tokenizer process
    stop_token_ids: list[int] = []  # extra stop ids; the model's eos ids are added by the tokenizer
    ignore_eos: bool = False
    # log-probabilities (OpenAI logprobs / top_logprobs; echo on completions). None: not computed, so
    # a step without such a request pays nothing. N: the chosen token's plus the N most likely.
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    # OpenAI penalties over the generated tokens, and additive biases by token id (sampler.py)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = {}


class ChatMessage(Struct, frozen=True):
    role: str
    content: str


class Usage(Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


# ---------------------------------------------------------------- gateway -> tokenizer


class GenerateReq(Struct, tag="generate", kw_only=True):
    rid: str
    group: str = ""  # the n choices of one OpenAI request share it (and a worker, and the prompt's KV)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    params: SamplingParams
    arrival: float  # time.time() at the gateway, for end-to-end latency
    # /generate: wrap `prompt` as one user turn in the model's chat template (when it has one)
    chat_prompt: bool = False


# ---------------------------------------------------------------- tokenizer -> scheduler -> worker


class TokenizedReq(Struct, tag="tokenized", kw_only=True):
    rid: str
    input_ids: list[int]
    params: SamplingParams
    arrival: float
    eos_token_ids: list[int] = []
    # set by the scheduler when adaptive max_new_tokens scaled the request down
    max_new_tokens_scaled_from: int | None = None
    # low-priority warm-up request: prefill only, keep the prefix cached, emit nothing
    warmup: bool = False
    group: str = ""  # see GenerateReq.group


class AbortReq(Struct, tag="abort"):
    """Stop a request wherever it is (tokenizer, queue or worker). The gateway sends it on disconnect
    to the tokenizer, on the same pipe as the request itself, so it can never overtake the request:
    the tokenizer skips a request still waiting to be tokenized and forwards the abort to the
    scheduler otherwise. The tokenizer also sends it when a stop string matched."""

    rid: str


class Dispatch(Struct, tag="dispatch"):
    """scheduler -> worker: new requests (one message per scheduler pass, all requests in it)."""

    reqs: list[TokenizedReq]


class InsertPrefix(Struct, tag="insert_prefix"):
    """scheduler -> worker: prefill these token ids and keep them in the prefix cache."""

    input_ids: list[int]


class FlushCache(Struct, tag="flush_cache"):
    pass


class Shutdown(Struct, tag="shutdown"):
    """launcher -> worker, when the server stops: end the loop and free the device (rank 0 passes it on
    to its TP ranks, so the group leaves together) before the launcher's SIGTERM would."""


# ---------------------------------------------------------------- worker -> tokenizer


class TokenLogprobs(Struct, kw_only=True, omit_defaults=True):
    """Log-probabilities of consecutive tokens, one entry each; top_* only when alternatives were asked."""

    logprobs: list[float]
    top_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []


class TokenOut(Struct, kw_only=True, omit_defaults=True):
    """New token ids of one request in one engine step; finish_reason set on its last item."""

    rid: str
    token_ids: list[int] = []
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    status: int = 200  # HTTP status the gateway answers with when this is the first item
    max_new_tokens_scaled_from: int | None = None
    logprobs: TokenLogprobs | None = None  # of token_ids, when the request asked
    prompt_logprobs: TokenLogprobs | None = None  # of prompt tokens 1.., on the first item (echo)


class TokenBatch(Struct, tag="tokens"):
    worker_id: int
    items: list[TokenOut]


# ---------------------------------------------------------------- tokenizer -> gateway


class TopLogprob(Struct, array_like=True):
    token: str
    logprob: float


class TokenLogprob(Struct, kw_only=True, omit_defaults=True):
    """One token as OpenAI's logprobs show it (text of the token alone, its log-probability)."""

    token: str
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    top: list[TopLogprob] = []


class TextOut(Struct, kw_only=True, omit_defaults=True):
    rid: str
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None
    status: int = 200
    max_new_tokens_scaled_from: int | None = None
    worker_id: int = -1  # on the last item: which worker served the request (-1: none)
    logprobs: list[TokenLogprob] = []  # of the tokens behind this item's text
    prompt_logprobs: list[TokenLogprob] = []  # echo: every prompt token, on the first item


class TextBatch(Struct, tag="text"):
    items: list[TextOut]


# ---------------------------------------------------------------- worker -> scheduler


class LoadStats(Struct, kw_only=True):
    """A worker's load and prefix-cache counters: what a backend reports (Backend.stats), what a
    WorkerStatus carries and what the scheduler keeps per worker."""

    running: int = 0
    waiting: int = 0
    kv_used_tokens: int = 0
    kv_total_tokens: int = 0
    cached_tokens_total: int = 0  # prompt tokens served from the prefix cache since start
    prompt_tokens_total: int = 0


class CacheExtension(Struct, array_like=True):
    """A running request's prompt cached further, chunk by chunk: `tokens` follow the first `start`
    tokens this worker already reported for `rid`, so a long prompt costs its length in messages, not
    the square of it."""

    rid: str
    start: int
    tokens: list[int]


class WorkerStatus(Struct, tag="worker_status", kw_only=True, omit_defaults=True):
    """Sent after every engine step in which something the scheduler cares about changed."""

    worker_id: int
    finished: list[str] = []  # rids that left the worker (done, aborted, failed)
    load: LoadStats = field(default_factory=LoadStats)
    cache_inserted: list[list[int]] = []  # token sequences now cached (full prefixes from the root)
    cache_evicted: list[list[int]] = []  # token sequences evicted (full prefixes from the root)
    cache_extended: list[CacheExtension] = []  # applied after the two above
    cache_flushed: bool = False
    # rids of a Dispatch the worker has taken in (sent at once, before any step): a request the
    # scheduler dispatched but never saw accepted cannot have run when the worker dies, so it is re-queued
    accepted: list[str] = []


# ---------------------------------------------------------------- any process -> launcher / scheduler


class TokenizeReq(Struct, tag="tokenize", kw_only=True):
    """gateway -> tokenizer: /tokenize (text or chat messages -> ids) and /detokenize (ids -> text)."""

    rid: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    token_ids: list[int] | None = None  # set: detokenize these


class TokenizeReply(Struct, tag="tokenize_reply", kw_only=True, omit_defaults=True):
    rid: str
    token_ids: list[int] = []
    token_strs: list[str] = []
    text: str = ""
    error: str | None = None


class Narration(Struct, tag="narration"):
    """any process -> gateway, with --narrate: its plain-words log lines, for the dashboard's live feed."""

    source: str  # "worker-0", "scheduler", "tokenizer"
    lines: list[str]


class ProcReady(Struct, tag="ready"):
    name: str  # "gateway", "tokenizer", "scheduler", "worker-0", ...
    pid: int
    info: dict[str, str] = {}


class WorkerDied(Struct, tag="worker_died"):
    """launcher -> scheduler: worker N exited; fail its in-flight requests."""

    worker_id: int
    exitcode: int
    pid: int = 0  # the dead process: a late notice must not mark its restarted successor down


class WorkerUp(Struct, tag="worker_up"):
    """worker -> scheduler: ready to take requests (sent at start and after a restart)."""

    worker_id: int
    kv_total_tokens: int = 0
    pid: int = 0


class PeerRestarted(Struct, tag="peer_restarted"):
    """A process the launcher restarted tells the processes next to it that its state is gone:
    scheduler -> tokenizer and workers (fail / drop everything in flight), tokenizer -> gateway (end
    every open stream with an error), gateway -> tokenizer (abort everything: its clients are gone)."""

    name: str  # "scheduler" | "tokenizer" | "gateway"


# ---------------------------------------------------------------- control channel (ROUTER on scheduler)


class ControlReq(Struct, kw_only=True):
    command: str  # metrics | warm | insert_prefix | flush_cache | health
    prefixes: list[str] = []  # for warm / insert_prefix: text, tokenized by the scheduler's tokenizer
    token_ids: list[list[int]] = []  # or token ids directly


class ControlReply(Struct, kw_only=True, omit_defaults=True):
    ok: bool
    error: str | None = None
    data: dict = {}


# ---------------------------------------------------------------- one union per receiving socket

TokenizerInMsg = GenerateReq | TokenBatch | AbortReq | PeerRestarted | TokenizeReq
SchedulerInMsg = TokenizedReq | AbortReq | WorkerStatus | WorkerDied | WorkerUp
WorkerInMsg = Dispatch | AbortReq | InsertPrefix | FlushCache | Shutdown | PeerRestarted
GatewayInMsg = TextBatch | PeerRestarted | TokenizeReply | Narration
LauncherInMsg = ProcReady
