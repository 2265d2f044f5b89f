"""Log-probabilities for the requests that ask (OpenAI `logprobs`, `top_logprobs`, `echo`).

Computed from the model's raw logits (before temperature, penalties or biases, as vLLM and SGLang
report them), once per engine step for every row that needs them: one log_softmax, one gather, one
topk and a single host copy of each. Steps in which no request asks do none of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minisgl.messages import TokenLogprobs


@dataclass
class PromptRows:
    """Rows of a step's logits that score prompt tokens of one request (echo): row j predicts token
    `first + j + 1` of the request's prompt."""

    req: object  # minisgl.engine.request.Req (not imported: request.py must not depend on this module)
    first: int  # prompt position of the first row
    count: int


def _score(logits: torch.Tensor, targets: list[int], k: int) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """log p(target) per row, and the k most likely ids and log-probs per row (empty when k is 0)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    tgt = torch.tensor(targets, dtype=torch.int64, device=lp.device)
    chosen = lp.gather(1, tgt[:, None]).squeeze(1).tolist()
    if k <= 0:
        return chosen, [], []
    vals, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return chosen, ids.tolist(), vals.tolist()


def sampled_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[TokenLogprobs]:
    """logits [N, V], the N tokens just sampled from them, and how many alternatives each row wants."""
    if not tokens:
        return []
    chosen, ids, vals = _score(logits, tokens, max(tops))
    return [TokenLogprobs(logprobs=[c], top_ids=[ids[i][:t]] if t else [], top_logprobs=[vals[i][:t]] if t else [])
            for i, (c, t) in enumerate(zip(chosen, tops))]


def prompt_logprobs(logits: torch.Tensor, rows: list[PromptRows], tops: list[int]) -> list[TokenLogprobs]:
    """Score every prompt row of the step at once (logits: one row per prompt row, in order); one
    TokenLogprobs of `count` entries per PromptRows."""
    targets: list[int] = []
    for pr in rows:
        targets.extend(pr.req.all_ids[pr.first + 1:pr.first + 1 + pr.count])  # type: ignore[attr-defined]
    chosen, ids, vals = _score(logits, targets, max(tops))
    out, at = [], 0
    for pr, t in zip(rows, tops):
        end = at + pr.count
        out.append(TokenLogprobs(logprobs=chosen[at:end], top_ids=[r[:t] for r in ids[at:end]] if t else [],
                                 top_logprobs=[r[:t] for r in vals[at:end]] if t else []))
        at = end
    return out


def extend(into: TokenLogprobs, part: TokenLogprobs) -> None:
    """Append a later chunk's prompt scores to a request's running total."""
    into.logprobs.extend(part.logprobs)
    into.top_ids.extend(part.top_ids)
    into.top_logprobs.extend(part.top_logprobs)
