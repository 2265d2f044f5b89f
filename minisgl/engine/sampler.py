"""Batched sampling: one call per engine step for every request that needs a token.

Greedy rows take the argmax. Sampled rows divide by their temperature, optionally keep only the top-k /
top-p mass (vectorised over the batch, done only when some row asks for it), and draw with the
exponential-race trick: argmax(p / E) with E ~ Exp(1) picks index i with probability p_i. Each seeded
request draws its E from its own torch.Generator, so its tokens do not depend on what else is in the
batch; unseeded rows share the engine's generator. The only host sync is the final `.tolist()`.

Before any of that, rows whose request has OpenAI penalties or a logit_bias get them applied to a copy
of the logits, for all such rows at once (steps without such a request skip it):
    logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)   (generated tokens)
    logit[j] += logit_bias[j]
"""

from __future__ import annotations

import torch

from minisgl.engine.request import Req


def mix_seed(seed: int) -> int:
    """The CPU generator (mt19937) keeps only a seed's low 32 bits, so 5 and 5 + 2**32 drew the same
    tokens. Fold all 64 bits into the low word first (splitmix64's finalizer: every input bit moves
    about half the output bits), so seeds that differ anywhere give different streams."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return (z ^ (z >> 32)) & 0xFFFFFFFF


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def request_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(mix_seed(seed))
        return g

    def sample(self, logits: torch.Tensor, reqs: list[Req]) -> list[int]:
        """logits [N, V] float32, one row per request in `reqs` -> N token ids."""
        return self.sample_tensor(logits, reqs).tolist()

    def sample_tensor(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        """As sample(), but the ids stay on the device (no host sync): an overlapped engine reads them
        one step later."""
        if any(r.adjusts for r in reqs):
            logits = adjust_logits(logits, reqs)
        if all(r.greedy for r in reqs):
            return logits.argmax(dim=-1)
        return self._sample_mixed(logits, reqs)

    def _sample_mixed(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        dev = logits.device
        greedy = torch.tensor([r.greedy for r in reqs], device=dev)
        temps = torch.tensor([1.0 if r.greedy else r.params.temperature for r in reqs], device=dev)
        probs = torch.softmax(logits / temps[:, None], dim=-1)
        top_k = [0 if r.greedy else r.params.top_k for r in reqs]
        top_p = [1.0 if r.greedy else r.params.top_p for r in reqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            probs = _top_k_top_p(probs, torch.tensor(top_k, device=dev), torch.tensor(top_p, device=dev))
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, r in enumerate(reqs):
            if r.generator is not None and not r.greedy:
                race[i].exponential_(generator=r.generator)
        sampled = (probs / race).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)


def _top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token outside each row's top-k (k = 0: all) and top-p nucleus (p = 1: all)."""
    vocab = probs.shape[-1]
    sorted_p, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=probs.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # the most likely token is always kept
    drop = (ranks >= k) | (mass_before > top_p[:, None])
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def adjust_logits(logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
    """A copy of logits with every row's penalties and logit_bias applied (see the module doc)."""
    logits = logits.clone()
    dev = logits.device
    pen = [i for i, r in enumerate(reqs) if r.params.presence_penalty or r.params.frequency_penalty]
    if pen:
        outs = [reqs[i].output_ids for i in pen]
        if any(outs):
            rows = torch.repeat_interleave(torch.arange(len(pen), device=dev),
                                           torch.tensor([len(o) for o in outs], device=dev))
            toks = torch.tensor([t for o in outs for t in o], dtype=torch.int64, device=dev)
            counts = torch.zeros(len(pen), logits.shape[-1], device=dev, dtype=logits.dtype)
            counts.index_put_((rows, toks), torch.ones_like(toks, dtype=logits.dtype), accumulate=True)
            freq = torch.tensor([reqs[i].params.frequency_penalty for i in pen], device=dev, dtype=logits.dtype)
            pres = torch.tensor([reqs[i].params.presence_penalty for i in pen], device=dev, dtype=logits.dtype)
            idx = torch.tensor(pen, device=dev)
            logits[idx] -= freq[:, None] * counts + pres[:, None] * (counts > 0).to(logits.dtype)
    bias_rows: list[int] = []
    bias_toks: list[int] = []
    bias_vals: list[float] = []
    for i, r in enumerate(reqs):
        for tok, val in r.params.logit_bias.items():
            bias_rows.append(i)
            bias_toks.append(tok)
            bias_vals.append(val)
    if bias_rows:
        logits.index_put_((torch.tensor(bias_rows, device=dev), torch.tensor(bias_toks, device=dev)),
                          torch.tensor(bias_vals, device=dev, dtype=logits.dtype), accumulate=True)
    return logits
