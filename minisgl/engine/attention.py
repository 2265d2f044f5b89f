"""Attention over the paged KV pool, with portable torch ops (the `torch` backend's kernels).

One `PagedAttention` is built per engine step and handed to the model as its ForwardContext. The step's
tokens are laid out as [decode tokens of B sequences | prefill chunk of sequence 1 | chunk 2 | ...].
Every index tensor is built here, once per step; `attention()` runs once per layer and only does:

  1. write the step's k/v into the pool at their slots;
  2. decode: gather each sequence's keys/values into a padded [B, Hkv, Lmax, D] batch and run ONE
     scaled_dot_product_attention for all of them. The query heads that share a KV head are folded into
     SDPA's "query length" axis ([B, Hkv, G, D]), so grouped-query attention needs no repeat of K/V;
  3. prefill chunks: one SDPA per sequence over its cached + new tokens, causal with an offset when
     part of the sequence was already in the pool (cached prefix or an earlier chunk).

A CUDA backend swaps this class for one that calls paged kernels with the same metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minisgl.cache.kv_pool import KVPool


@dataclass
class PrefillSegment:
    start: int  # first token of the chunk in the step's flattened token dimension
    end: int
    kv_slots: torch.Tensor  # [prefix + chunk] slot ids of the whole sequence so far (chunk included)
    mask: torch.Tensor | None  # [chunk, prefix + chunk] additive, None when there is no prefix (is_causal)


class PagedAttention:
    """The ForwardContext of one engine step."""

    def __init__(self, pool: KVPool, write_slots: torch.Tensor, logits_indices: torch.Tensor,
                 num_decode: int, decode_table: torch.Tensor | None, decode_lens: torch.Tensor | None,
                 segments: list[PrefillSegment]) -> None:
        self.pool = pool
        self.write_slots = write_slots
        self.logits_indices = logits_indices
        self.num_decode = num_decode
        self.segments = segments
        self.decode_table = decode_table  # [B, Lmax] slot ids of each decoding sequence (kernels read it)
        self.decode_lens = decode_lens  # [B] tokens of each, this step's included
        if num_decode:
            assert decode_table is not None and decode_lens is not None
            lmax = decode_table.shape[1]
            # [B, Lmax]: True where the key belongs to the sequence; padding reads the zeroed slot 0
            keep = torch.arange(lmax, device=decode_lens.device)[None, :] < decode_lens[:, None]
            self._decode_flat = decode_table.masked_fill(~keep, 0).reshape(-1)
            self._decode_shape = (num_decode, lmax)
            # additive (0 / -inf) in the pool's dtype, built once: a bool mask is converted in every layer
            bias = torch.zeros(keep.shape, dtype=pool.dtype, device=keep.device)
            self._decode_mask = bias.masked_fill_(~keep, float("-inf"))[:, None, None, :]

    def prefill_rows(self) -> PagedAttention:
        """The context of this step's prompt-chunk rows alone (the rows after the decode tokens), for a
        caller that handles the decode rows itself (engine/cpu/forward.py)."""
        b = self.num_decode
        segments = [PrefillSegment(s.start - b, s.end - b, s.kv_slots, s.mask) for s in self.segments]
        return PagedAttention(self.pool, self.write_slots[b:], self.logits_indices, 0, None, None, segments)

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pool, v_pool = self.pool.k[layer_idx], self.pool.v[layer_idx]
        k_pool.index_copy_(0, self.write_slots, k)
        v_pool.index_copy_(0, self.write_slots, v)
        if self.num_decode == q.shape[0]:
            return self._decode(k_pool, v_pool, q)
        if not self.num_decode and len(self.segments) == 1:  # one prompt chunk: no copy into `out`
            return self._prefill(self.segments[0], k_pool, v_pool, q, k, v)
        out = torch.empty_like(q)
        b = self.num_decode
        if b:
            out[:b] = self._decode(k_pool, v_pool, q[:b])
        for seg in self.segments:
            out[seg.start:seg.end] = self._prefill(seg, k_pool, v_pool, q, k, v)
        return out

    @staticmethod
    def _prefill(seg: PrefillSegment, k_pool: torch.Tensor, v_pool: torch.Tensor, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qs = q[seg.start:seg.end]
        if seg.mask is None:  # a cold prompt: attend over the fresh k/v directly
            return _sdpa(qs, k[seg.start:seg.end], v[seg.start:seg.end], None)
        return _sdpa(qs, k_pool.index_select(0, seg.kv_slots), v_pool.index_select(0, seg.kv_slots), seg.mask)

    def _decode(self, k_pool: torch.Tensor, v_pool: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        b, lmax = self._decode_shape
        n_heads, d = q.shape[1], q.shape[2]
        n_kv = k_pool.shape[1]
        ks = k_pool.index_select(0, self._decode_flat).view(b, lmax, n_kv, d).transpose(1, 2)
        vs = v_pool.index_select(0, self._decode_flat).view(b, lmax, n_kv, d).transpose(1, 2)
        qg = q.reshape(b, n_kv, n_heads // n_kv, d)  # heads h = kv * G + g share kv head `kv`
        out = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=self._decode_mask)
        return out.reshape(b, n_heads, d)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One sequence: q [T, H, D], k/v [S, Hkv, D] -> [T, H, D]. mask [T, S] additive, or None for plain
    causal (S == T). Inputs go in as 4-D [1, heads, len, D] with enable_gqa: on CPU that takes the
    fused kernel, 3-7x faster than 3-D inputs or repeated K/V."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def prefix_causal_mask(prefix: int, chunk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[chunk, prefix + chunk], additive (0 / -inf): query i (at position prefix + i) sees keys
    0..prefix + i. Built once per step; SDPA would convert a bool mask in every layer."""
    return torch.full((chunk, prefix + chunk), float("-inf"), dtype=dtype, device=device).triu_(prefix + 1)
