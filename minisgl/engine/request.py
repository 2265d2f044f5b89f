"""Per-request state inside the engine.

A request's token sequence is `all_ids` = prompt + generated tokens. `kv_len` of them have K/V in the
pool; the next forward processes `all_ids[kv_len:]` (a prefill chunk, or the one newest token when
decoding) and, once `kv_len == len(all_ids)`, samples the next token. The first `cached_len` tokens
belong to the radix tree (locked through `node`); the rest of the row's slots belong to the request.
"""

from __future__ import annotations

import enum

import torch

from minisgl.cache.radix import RadixNode
from minisgl.messages import SamplingParams, TokenLogprobs


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Req:
    __slots__ = ("rid", "params", "all_ids", "prompt_len", "max_new_tokens", "stop_ids", "warmup",
                 "scaled_from", "seq", "status", "row", "kv_len", "cached_len", "node",
                 "cached_tokens", "started", "generator", "report", "prompt_scores", "adjusts", "group")

    def __init__(self, rid: str, input_ids: list[int], params: SamplingParams, *,
                 eos_token_ids: list[int] = (), warmup: bool = False, scaled_from: int | None = None,
                 report: bool = True, group: str = "") -> None:
        self.rid = rid
        self.params = params
        self.all_ids = list(input_ids)
        self.prompt_len = len(input_ids)
        self.max_new_tokens = params.max_new_tokens
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop.update(eos_token_ids)
        self.stop_ids = frozenset(stop)
        self.warmup = warmup
        self.scaled_from = scaled_from
        self.report = report  # False for internal warm-ups nobody outside knows about
        self.seq = 0  # admission order: the newest running request is preempted first
        self.status = Status.WAITING
        self.row = -1  # row in the engine's req -> token-slot table
        self.kv_len = 0
        self.cached_len = 0
        self.node: RadixNode | None = None
        self.cached_tokens = 0  # prompt tokens served from the prefix cache (first admission)
        self.started = False  # admitted once (usage counters are taken then)
        self.generator: torch.Generator | None = None  # per-request RNG when a seed is given
        # echo: log-probs of prompt tokens 1.. as their chunks run (engine/logprobs.py)
        self.prompt_scores: TokenLogprobs | None = None
        # the sampler must change this request's logits (penalties, logit_bias) before picking a token
        self.group = group  # the n choices of one OpenAI request share it
        self.adjusts = bool(params.presence_penalty or params.frequency_penalty or params.logit_bias)

    @property
    def output_ids(self) -> list[int]:
        return self.all_ids[self.prompt_len:]

    @property
    def cache_key(self) -> str:
        """What the KV cache reports this request's insertions under: its rid when the scheduler knows
        it (it drops the key when the rid finishes), else nothing (internal warm-ups: full sequences)."""
        return self.rid if self.report else ""

    @property
    def num_output(self) -> int:
        return len(self.all_ids) - self.prompt_len

    @property
    def pending(self) -> int:
        """Tokens still to run through the model before the next sample (1 when decoding)."""
        return len(self.all_ids) - self.kv_len

    @property
    def scores_prompt(self) -> bool:
        """Still has prompt tokens to score (echo with logprobs): its prompt must run through the
        model, not come from the prefix cache."""
        if self.params.prompt_logprobs is None or self.warmup:
            return False
        done = 0 if self.prompt_scores is None else len(self.prompt_scores.logprobs)
        return done < self.prompt_len - 1

    @property
    def reads_logits(self) -> bool:
        """Its steps read the logits on the host (logprobs, prompt scores) or adjust them from the tokens
        so far (penalties, logit_bias): an overlapped engine runs such steps without overlap."""
        return self.params.logprobs is not None or self.params.prompt_logprobs is not None or self.adjusts

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0.0 or self.params.top_k == 1

    def __repr__(self) -> str:
        return (f"Req({self.rid!r}, {self.status.value}, prompt={self.prompt_len}, "
                f"out={self.num_output}, kv={self.kv_len}, cached={self.cached_len})")
