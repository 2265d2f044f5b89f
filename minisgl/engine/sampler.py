"""Batched sampling: one call per engine step for every request that needs a token.

Greedy rows take the argmax. Sampled rows divide by their temperature, optionally keep only the top-k /
top-p mass (vectorised over the batch, done only when some row asks for it), and draw with the
exponential-race trick: argmax(p / E) with E ~ Exp(1) picks index i with probability p_i. Each seeded
request draws its E from its own torch.Generator, so its tokens do not depend on what else is in the
batch; unseeded rows share the engine's generator. The only host sync is the final `.tolist()`.
"""

from __future__ import annotations

import torch

from minisgl.engine.request import Req


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def request_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def sample(self, logits: torch.Tensor, reqs: list[Req]) -> list[int]:
        """logits [N, V] float32, one row per request in `reqs` -> N token ids."""
        return self.sample_tensor(logits, reqs).tolist()

    def sample_tensor(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        """As sample(), but the ids stay on the device (no host sync): an overlapped engine reads them
        one step later."""
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
