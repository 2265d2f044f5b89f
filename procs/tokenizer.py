"""Tokenizer process: text (or chat messages) -> token ids, and worker token batches -> text deltas.

In:  GenerateReq / AbortReq from the gateway; TokenBatch from workers (and from the scheduler, for
     requests it failed before dispatch); PeerRestarted from a restarted scheduler or gateway.
Out: TokenizedReq / AbortReq to the scheduler; TextBatch to the gateway (one per TokenBatch).

Aborts from the gateway come here, not to the scheduler: they travel on the same pipe as the request,
so an abort can never arrive anywhere before its request. One that finds its request still waiting in
this process's input (behind a long prompt being tokenized) drops it before any work is done; one that
comes later is forwarded to the scheduler, which by then has the request (same pipe, same order).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from minisgl import ipc
from minisgl.config import ServerConfig
from minisgl.detokenize import RequestDetokenizer
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
    TokenizerInMsg,
    TokenOut,
    Usage,
)

log = logging.getLogger("minisgl.tokenizer")


class InputError(ValueError):
    """The request cannot be served as given (HTTP 400)."""


def context_window(cfg: ServerConfig) -> int:
    if cfg.max_model_len > 0:
        return cfg.max_model_len
    model_cfg = json.loads((Path(cfg.model_path) / "config.json").read_text())
    return int(model_cfg.get("max_position_embeddings", 4096))


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model_path: str) -> list[int]:
    """The model's eos ids: generation_config.json first (it may list several), then the tokenizer."""
    ids: list[int] = []
    gen_cfg = Path(model_path) / "generation_config.json"
    if gen_cfg.exists():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


@dataclass
class ReqState:
    detok: RequestDetokenizer
    prompt_tokens: int
    finished: bool = False  # already told the gateway "done"; waiting for the worker's last item
    generated: int = 0  # tokens seen so far (usage when a stop string ends the request early)
    cached: int = 0  # prompt tokens the worker found in its prefix cache, once it said so


class TokenizerService:
    def __init__(self, cfg: ServerConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.fast = tokenizer.backend_tokenizer  # the Rust tokenizer, for DecodeStream
        self.eos_ids = eos_token_ids(tokenizer, cfg.model_path)
        self.context = context_window(cfg)
        self.states: dict[str, ReqState] = {}

    # ------------------------------------------------------------ requests in

    def encode(self, req: GenerateReq) -> list[int]:
        if req.chat_prompt and req.prompt and self.tokenizer.chat_template is not None:
            req = msgspec.structs.replace(req, prompt=None, messages=[ChatMessage("user", req.prompt)])
        if req.messages is not None:
            if not req.messages:
                raise InputError("'messages' must not be empty")
            if self.tokenizer.chat_template is None:
                raise InputError("this model has no chat template; send 'prompt' instead of 'messages'")
            ids = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in req.messages],
                add_generation_prompt=True, tokenize=True, return_dict=False,
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        if not req.prompt:
            raise InputError("'prompt' must be a non-empty string")
        return self.tokenizer(req.prompt).input_ids

    def on_generate(self, req: GenerateReq) -> tuple[TokenizedReq | None, TextOut | None]:
        try:
            ids = self.encode(req)
            if not ids:
                raise InputError("the prompt tokenized to zero tokens")
            if len(ids) >= self.context:
                raise InputError(f"prompt is {len(ids)} tokens; the context window is {self.context} tokens")
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
        self.states[req.rid] = ReqState(RequestDetokenizer(self.fast, list(params.stop)), len(ids))
        return TokenizedReq(rid=req.rid, input_ids=ids, params=params, arrival=req.arrival,
                            eos_token_ids=self.eos_ids), None

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
        return out, aborts

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
            while True:
                try:
                    self._take(self.pull.recv(zmq.NOBLOCK), pending, aborted)
                except zmq.Again:
                    break
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


def main() -> None:
    cfg = ipc.become_child("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    TokenizerLoop(cfg, TokenizerService(cfg, tokenizer)).run()


if __name__ == "__main__":
    main()
