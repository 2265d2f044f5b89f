"""The tokenizer process's logic (procs/tokenizer.py is its main): text (or chat messages) -> token ids,
and worker token batches -> text deltas (through detokenize.py).

In:  GenerateReq / AbortReq from the gateway; TokenBatch from workers (and from the scheduler, for
     requests it failed before dispatch); PeerRestarted from a restarted scheduler or gateway.
Out: TokenizedReq / AbortReq to the scheduler; TextBatch to the gateway (one per TokenBatch).

Aborts from the gateway come here, not to the scheduler: they travel on the same pipe as the request,
so an abort can never arrive anywhere before its request. One that finds its request still waiting in
this process's input (behind a long prompt being tokenized) drops it before any work is done; one that
comes later is forwarded to the scheduler, which by then has the request (same pipe, same order).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq
from transformers import PreTrainedTokenizerBase

from minisgl import ipc
from minisgl.assets.checkpoint import eos_token_ids, read_json
from minisgl.config import ServerConfig, context_window
from minisgl.tokenizer.detokenize import RequestDetokenizer
from minisgl.messages import (
    FINISH_ERROR,
    FINISH_STOP,
    AbortReq,
    ChatMessage,
    GenerateReq,
    PeerRestarted,
    TextBatch,
    TextOut,
    TokenBatch,
    TokenizedReq,
    TokenizeReply,
    TokenizeReq,
    TokenizerInMsg,
    TokenLogprob,
    TokenLogprobs,
    TokenOut,
    TopLogprob,
    Usage,
)

log = logging.getLogger("minisgl.tokenizer")


class InputError(ValueError):
    """The request cannot be served as given (HTTP 400)."""


def model_vocab_size(model_path: str, fallback: int) -> int:
    """The model's vocabulary (its logits' width), which may be larger than the tokenizer's."""
    try:
        return int(read_json(Path(model_path) / "config.json").get("vocab_size") or fallback)
    except (OSError, ValueError):
        return fallback


@dataclass
class ReqState:
    detok: RequestDetokenizer
    prompt_tokens: int
    finished: bool = False  # already told the gateway "done"; waiting for the worker's last item
    generated: int = 0  # tokens seen so far (usage when a stop string ends the request early)
    cached: int = 0  # prompt tokens the worker found in its prefix cache, once it said so
    prompt_ids: list[int] | None = None  # kept only for echo with logprobs


class TokenizerService:
    def __init__(self, cfg: ServerConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.fast = tokenizer.backend_tokenizer  # the Rust tokenizer, for DecodeStream
        self.eos_ids = eos_token_ids(cfg.model_path, tokenizer.eos_token_id)
        self.context = context_window(cfg)
        self.vocab_size = model_vocab_size(cfg.model_path, len(tokenizer))
        self.states: dict[str, ReqState] = {}
        self._token_text: dict[int, str] = {}  # id -> its text alone, for logprobs

    # ------------------------------------------------------------ requests in

    def encode(self, req: GenerateReq | TokenizeReq, add_special_tokens: bool = True,
               add_generation_prompt: bool = True) -> list[int]:
        if getattr(req, "chat_prompt", False) and req.prompt and req.prompt and self.tokenizer.chat_template is not None:
            req = msgspec.structs.replace(req, prompt=None, messages=[ChatMessage("user", req.prompt)])
        if req.messages is not None:
            if not req.messages:
                raise InputError("'messages' must not be empty")
            if self.tokenizer.chat_template is None:
                raise InputError("this model has no chat template; send 'prompt' instead of 'messages'")
            ids = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in req.messages],
                add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False,
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        if not req.prompt:
            raise InputError("'prompt' must be a non-empty string")
        return self.tokenizer(req.prompt, add_special_tokens=add_special_tokens).input_ids

    def on_tokenize(self, req: TokenizeReq) -> TokenizeReply:
        """/tokenize and /detokenize (vLLM's and SGLang's endpoints)."""
        try:
            if req.token_ids is not None:
                bad = [t for t in req.token_ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise InputError(f"'tokens' holds ids outside the vocabulary (size {self.vocab_size}): {bad[:5]}")
                return TokenizeReply(rid=req.rid, text=self.tokenizer.decode(req.token_ids))
            ids = self.encode(req, req.add_special_tokens, req.add_generation_prompt)
        except InputError as e:
            return TokenizeReply(rid=req.rid, error=str(e))
        return TokenizeReply(rid=req.rid, token_ids=ids, token_strs=self.tokenizer.convert_ids_to_tokens(ids))

    def token_text(self, ids: list[int]) -> list[str]:
        """Each id's text on its own (what OpenAI's logprobs show as `token`), memoised."""
        out = []
        for i in ids:
            text = self._token_text.get(i)
            if text is None:
                text = self._token_text[i] = self.tokenizer.decode([i])
            out.append(text)
        return out

    def logprob_entries(self, ids: list[int], scores: TokenLogprobs) -> list[TokenLogprob]:
        texts = self.token_text(ids)
        entries = []
        for j, (text, lp) in enumerate(zip(texts, scores.logprobs)):
            top = []
            if scores.top_ids:
                top = [TopLogprob(t, v) for t, v in zip(self.token_text(scores.top_ids[j]), scores.top_logprobs[j])]
            entries.append(TokenLogprob(token=text, logprob=lp, top=top))
        return entries

    def prompt_entries(self, prompt_ids: list[int], scores: TokenLogprobs | None) -> list[TokenLogprob]:
        """Echo: every prompt token; the first has no log-probability (nothing predicts it)."""
        first = TokenLogprob(token=self.token_text(prompt_ids[:1])[0], logprob=None)
        if scores is None:
            return [first]
        return [first] + self.logprob_entries(prompt_ids[1:], scores)

    def check_logit_bias(self, params) -> None:  # noqa: ANN001 - SamplingParams
        bad = [t for t in params.logit_bias if not 0 <= t < self.vocab_size]
        if bad:
            raise InputError(f"'logit_bias' names token ids outside the vocabulary (size {self.vocab_size}): {bad[:5]}")

    def on_generate(self, req: GenerateReq) -> tuple[TokenizedReq | None, TextOut | None]:
        try:
            ids = self.encode(req)
            if not ids:
                raise InputError("the prompt tokenized to zero tokens")
            if len(ids) >= self.context:
                raise InputError(f"prompt is {len(ids)} tokens; the context window is {self.context} tokens")
            self.check_logit_bias(req.params)
        except InputError as e:
            return None, TextOut(rid=req.rid, finish_reason=FINISH_ERROR, error=str(e), status=400)
        except Exception as e:  # noqa: BLE001 - e.g. a chat template that raises on these messages
            log.warning("cannot tokenize rid=%s: %s: %s", req.rid, type(e).__name__, e)
            return None, TextOut(rid=req.rid, finish_reason=FINISH_ERROR, status=400,
                                 error=f"cannot tokenize this request: {type(e).__name__}: {e}")
        params = req.params
        room = self.context - len(ids)
        if params.max_new_tokens > room:  # finish with "length" at the window's edge, as vLLM/SGLang do
            params = msgspec.structs.replace(params, max_new_tokens=room)
        self.states[req.rid] = ReqState(RequestDetokenizer(self.fast, list(params.stop)), len(ids),
                                        prompt_ids=ids if params.prompt_logprobs is not None else None)
        return TokenizedReq(rid=req.rid, input_ids=ids, params=params, arrival=req.arrival,
                            eos_token_ids=self.eos_ids, group=req.group), None

    # ------------------------------------------------------------ tokens out

    def on_tokens(self, batch: TokenBatch) -> tuple[list[TextOut], list[str]]:
        """Returns the text items for the gateway and the rids to abort (a stop string matched)."""
        out: list[TextOut] = []
        aborts: list[str] = []
        for item in batch.items:
            state = self.states.get(item.rid)
            if state is None:
                if item.error:  # failed before we saw it (e.g. scheduler queue full)
                    out.append(TextOut(rid=item.rid, finish_reason=item.finish_reason or FINISH_ERROR,
                                       error=item.error, status=item.status))
                continue
            if item.finish_reason is not None:
                self.states.pop(item.rid, None)
            if state.finished:
                continue
            state.generated += len(item.token_ids)
            state.cached = item.cached_tokens or state.cached
            emitted = len(out)
            res = state.detok.feed(item.token_ids)
            text = res.text
            if res.stopped:
                state.finished = True
                if item.finish_reason is None:
                    aborts.append(item.rid)
                out.append(TextOut(rid=item.rid, text=text, finish_reason=FINISH_STOP,
                                   usage=self._usage(state, item), worker_id=batch.worker_id,
                                   max_new_tokens_scaled_from=item.max_new_tokens_scaled_from))
            elif item.finish_reason is not None:
                text += state.detok.flush()
                out.append(TextOut(rid=item.rid, text=text, finish_reason=item.finish_reason,
                                   usage=self._usage(state, item), error=item.error, status=item.status,
                                   worker_id=batch.worker_id,
                                   max_new_tokens_scaled_from=item.max_new_tokens_scaled_from))
            elif text:
                out.append(TextOut(rid=item.rid, text=text))
            self._attach_logprobs(state, item, out, emitted)
        return out, aborts

    def _attach_logprobs(self, state: ReqState, item: TokenOut, out: list[TextOut], emitted: int) -> None:
        """Logprobs ride on the item's text (or on an empty item when the text is held back)."""
        lps = self.logprob_entries(item.token_ids, item.logprobs) if item.logprobs is not None else []
        prompt = []
        if state.prompt_ids is not None:
            prompt = self.prompt_entries(state.prompt_ids, item.prompt_logprobs)
            state.prompt_ids = None
        if not lps and not prompt:
            return
        if len(out) == emitted:
            out.append(TextOut(rid=item.rid))
        out[-1].logprobs, out[-1].prompt_logprobs = lps, prompt

    @staticmethod
    def _usage(state: ReqState, item: TokenOut) -> Usage:
        return Usage(prompt_tokens=item.prompt_tokens or state.prompt_tokens,
                     completion_tokens=item.completion_tokens or state.generated,
                     cached_tokens=item.cached_tokens or state.cached)

    def on_abort(self, rid: str) -> None:
        # The gateway gave up on this request; the worker's final item will clean the state.
        state = self.states.get(rid)
        if state is not None:
            state.finished = True

    def drop_all(self) -> list[str]:
        """A peer restarted and took its part of every request with it: forget them all."""
        rids = list(self.states)
        self.states.clear()
        return rids


class TokenizerLoop:
    def __init__(self, cfg: ServerConfig, service: TokenizerService) -> None:
        self.cfg, self.service = cfg, service
        self.ctx = zmq.Context()
        self.pull = ipc.bind_pull(self.ctx, cfg.endpoint("tokenizer"))
        self.to_scheduler = ipc.connect_push(self.ctx, cfg.endpoint("scheduler"))
        self.to_gateway = ipc.connect_push(self.ctx, cfg.endpoint("gateway"))
        self.decoder = ipc.FrameDecoder(TokenizerInMsg, "tokenizer")
        self.skipped = 0  # requests aborted before they were tokenized

    def run(self) -> None:
        if ipc.is_restart():  # the requests the old tokenizer held cannot be finished: the gateway ends them
            ipc.send(self.to_gateway, PeerRestarted("tokenizer"))
        ipc.report_ready(self.ctx, self.cfg, "tokenizer", context_window=str(self.service.context))
        log.info("tokenizer ready: context window %d, eos ids %s", self.service.context, self.service.eos_ids)
        pending: deque[object] = deque()
        aborted: set[str] = set()  # rids with an AbortReq among the pending messages
        while True:
            # Take in everything waiting before each message is handled: an abort queued behind its
            # own request (e.g. behind a long prompt being tokenized) cancels it before any work.
            if not pending:
                self._take(self.pull.recv(), pending, aborted)
            for data in ipc.drain(self.pull):
                self._take(data, pending, aborted)
            if not pending:
                continue  # only malformed frames came in
            msg = pending.popleft()
            if isinstance(msg, AbortReq):
                aborted.discard(msg.rid)
            try:
                self.handle(msg, aborted)
            except Exception:  # noqa: BLE001 - one bad message must never stop the tree
                log.exception("dropped a %s that failed", type(msg).__name__)

    def _take(self, data: bytes, pending: deque[object], aborted: set[str]) -> None:
        msg = self.decoder.decode(data)
        if msg is not None:
            pending.append(msg)
            if isinstance(msg, AbortReq):
                aborted.add(msg.rid)

    def handle(self, msg: object, aborted: set[str]) -> None:
        service = self.service
        if isinstance(msg, TokenBatch):
            items, aborts = service.on_tokens(msg)
            if items:
                ipc.send(self.to_gateway, TextBatch(items))
            for rid in aborts:
                ipc.send(self.to_scheduler, AbortReq(rid))
        elif isinstance(msg, GenerateReq):
            if msg.rid in aborted:
                self.skipped += 1
                log.info("rid=%s aborted before it was tokenized (%d so far)", msg.rid[:8], self.skipped)
                return
            t0 = time.perf_counter()
            tokenized, error = service.on_generate(msg)
            if error is not None:
                ipc.send(self.to_gateway, TextBatch([error]))
            else:
                ipc.send(self.to_scheduler, tokenized)
                if self.cfg.narrate:
                    log.info("tokenized rid=%s: %d prompt tokens in %.1f ms", msg.rid,
                             len(tokenized.input_ids), (time.perf_counter() - t0) * 1e3)
        elif isinstance(msg, AbortReq):
            service.on_abort(msg.rid)
            ipc.send(self.to_scheduler, msg)  # harmless when the request never got that far
        elif isinstance(msg, TokenizeReq):
            ipc.send(self.to_gateway, service.on_tokenize(msg))
        elif isinstance(msg, PeerRestarted):
            rids = service.drop_all()
            for rid in rids:  # whatever still runs for them runs for nobody
                ipc.send(self.to_scheduler, AbortReq(rid))
            if msg.name == "scheduler" and rids:
                ipc.send(self.to_gateway, TextBatch([
                    TextOut(rid=rid, finish_reason=FINISH_ERROR, status=503,
                            error="the scheduler process restarted; this request was lost, retry it")
                    for rid in rids]))
            log.error("%s restarted: dropped %d request(s) in flight", msg.name, len(rids))
