"""Attention over the paged KV pool for the `sgl` backend: a Triton paged decode kernel; prefill through
the paged extend kernel of `triton_fused.py` (SDPA per chunk when that is switched off).

Decode reads K/V straight from the pool through the engine's req -> token-slot table (no gather copy,
no padded batch). It is flash-decoding in two launches:

  1. `_decode_partial`, grid (batch, kv_heads, splits): each program takes one sequence, one KV head and
     every query head of its group (GQA: K/V are read once per group, the G query heads are the rows of
     one tl.dot), and one of `splits` equal slices of the sequence. It loops over its slice in blocks of
     BLOCK_N tokens (the loop bound is the sequence length read from memory, so shapes never depend on
     lengths), and writes its slice's softmax-weighted output and log-sum-exp (base 2), in float32.
  2. `_decode_combine`, grid (batch, heads): merges the splits' partials by their log-sum-exp.

The grid depends only on the batch size and the split count, both fixed for a captured CUDA graph; a
sequence shorter than the split count leaves some programs with nothing to do (they write lse = -inf).

`SGLContext` is the ForwardContext of one engine step, the counterpart of
`minisgl.engine.attention.PagedAttention`: it writes the step's k/v into the pool (or is told they are
there already: `attention_stored`), runs the decode kernel for the decode tokens and the extend kernel for
every prefill chunk at once (without it, one SDPA per chunk: flash for a cold prompt, a masked SDPA over
the gathered prefix otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from minisgl.cache.kv_pool import KVPool
from minisgl.engine.cuda.triton_attend import attend_block

LOG2E = 1.4426950408889634

# Defaults for direct calls; the engine picks per batch size with decode_params().
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
MAX_SPLITS = 16


@triton.jit
def _decode_partial(Q, K, V, Table, Rows, SeqLens, MidO, MidLse,
                    stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tr,
                    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                    qk_scale, num_splits,
                    G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sid = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    row = tl.load(Rows + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = sid * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < G
    mask_d = offs_d < D
    heads = kvh * G + offs_h
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table_row = Table + row * stride_tr
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        m, l, acc = attend_block(q, K, V, table_row, offs_n, mask_n, mask_n[None, :], offs_d, mask_d, kvh,
                                 stride_ks, stride_kh, stride_vs, stride_vh, qk_scale, m, l, acc, IEEE)
    has = end > start
    safe_l = tl.where(has, l, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(has, m + tl.log2(safe_l), float("-inf"))
    tl.store(MidO + b * stride_mb + heads[:, None] * stride_mh + sid * stride_ms + offs_d[None, :], out,
             mask=mask_h[:, None] & mask_d[None, :])
    tl.store(MidLse + b * stride_lb + heads * stride_lh + sid, lse, mask=mask_h)


@triton.jit
def _decode_combine(MidO, MidLse, O, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                    stride_ob, stride_oh, num_splits,
                    BLOCK_S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < D
    lse = tl.load(MidLse + b * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # 0 for empty splits
    o = tl.load(MidO + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
                mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    total = tl.maximum(tl.sum(w, 0), 1e-30)
    out = tl.sum(w[:, None] * o, 0) / total
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=mask_d)


def decode_params(batch: int, num_kv_heads: int, num_sms: int) -> tuple[int, int]:
    """(splits, BLOCK_N) for a batch size, fixed per CUDA graph. Tuned on an H100 (132 SMs; bf16, 8 KV
    heads x 128, lengths 100-2048, bench/gpu_check.py): about 32 programs per multiprocessor in the
    partial launch, and longer key blocks once the batch alone fills the GPU. Best measured: batch 1
    (32, 16 splits), batch 32 (64, 16), batch 256 (128, 1-2)."""
    programs = max(1, batch * num_kv_heads)
    splits = max(1, min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(32 * num_sms, programs))))
    block_n = 32 if programs <= 64 else 64 if programs <= 512 else 128
    return splits, block_n


def num_splits_for(batch: int, num_kv_heads: int, num_sms: int) -> int:
    return decode_params(batch, num_kv_heads, num_sms)[0]


class DecodeScratch:
    """The float32 partial outputs of one batch shape; reused by every layer of a step."""

    def __init__(self, batch: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device) -> None:
        self.num_splits = num_splits
        self.mid_o = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
        self.mid_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device)


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                     rows: torch.Tensor, seq_lens: torch.Tensor, num_splits: int,
                     scratch: DecodeScratch | None = None, out: torch.Tensor | None = None,
                     sm_scale: float | None = None, block_n: int = BLOCK_N, num_warps: int = NUM_WARPS,
                     num_stages: int = NUM_STAGES) -> torch.Tensor:
    """q [B, H, D] (any strides with a unit last dim); k_pool/v_pool [S, Hkv, D]; table [R, L] int slot
    ids; rows [B], seq_lens [B] int. Sequence b attends over slots table[rows[b], :seq_lens[b]].
    Query head h uses KV head h // (H // Hkv). Returns [B, H, D] in q's dtype (written into `out`)."""
    bsz, n_heads, d = q.shape
    n_kv = k_pool.shape[1]
    assert n_heads % n_kv == 0 and q.stride(2) == 1 and k_pool.stride(2) == 1 and v_pool.stride(2) == 1
    assert table.stride(1) == 1
    g = n_heads // n_kv
    if scratch is None or scratch.num_splits != num_splits or scratch.mid_o.shape[0] < bsz:
        scratch = DecodeScratch(bsz, n_heads, d, num_splits, q.device)
    if out is None:
        out = torch.empty(bsz, n_heads, d, dtype=q.dtype, device=q.device)
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)) * LOG2E
    mid_o, mid_lse = scratch.mid_o, scratch.mid_lse
    block_d = triton.next_power_of_2(d)
    _decode_partial[(bsz, n_kv, num_splits)](
        q, k_pool, v_pool, table, rows, seq_lens, mid_o, mid_lse,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        table.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        scale, num_splits,
        G=g, BLOCK_H=max(16, triton.next_power_of_2(g)), D=d, BLOCK_D=block_d, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    _decode_combine[(bsz, n_heads)](
        mid_o, mid_lse, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0),
        mid_lse.stride(1), out.stride(0), out.stride(1), num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits), D=d, BLOCK_D=block_d, num_warps=4)
    return out


def decode_attention_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                               table: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """The same function in float64, one sequence at a time (for tests)."""
    bsz, n_heads, d = q.shape
    g = n_heads // k_pool.shape[1]
    out = torch.zeros(bsz, n_heads, d, dtype=torch.float64, device=q.device)
    for i in range(bsz):
        n = int(seq_lens[i])
        if n == 0:
            continue
        slots = table[int(rows[i]), :n].long()
        k = k_pool[slots].double().repeat_interleave(g, dim=1)  # [n, H, D]
        v = v_pool[slots].double().repeat_interleave(g, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i].double(), k) / math.sqrt(d)
        out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out


# ---------------------------------------------------------------------------------------- context


@dataclass
class Segment:
    """One prefill chunk in the step's flattened tokens."""

    start: int
    end: int
    kv_slots: torch.Tensor | None  # [prefix + chunk] slots of the whole sequence so far; None: no prefix
    mask: torch.Tensor | None = None  # [G * chunk, prefix + chunk] bool, built once per step


class SGLContext:
    """The ForwardContext of one engine step of the sgl backend.

    Tokens are laid out [decode tokens of B sequences | prefill chunk 1 | chunk 2 | ...] as in the torch
    backend. Every tensor it holds is made once per step (or once per CUDA graph, where they are the
    graph's static inputs); `attention()` runs once per layer."""

    def __init__(self, pool: KVPool, write_slots: torch.Tensor, logits_indices: torch.Tensor, num_decode: int,
                 table: torch.Tensor, rows: torch.Tensor | None, seq_lens: torch.Tensor | None,
                 segments: list[Segment], num_splits: int = 1, num_heads: int = 0, block_n: int = BLOCK_N,
                 extend: tuple[torch.Tensor, int, int] | None = None, zero_pad: bool = False) -> None:
        self.pool, self.write_slots, self.logits_indices = pool, write_slots, logits_indices
        self.num_decode, self.table, self.rows, self.seq_lens = num_decode, table, rows, seq_lens
        self.segments, self.num_splits, self.block_n = segments, num_splits, block_n
        # (meta, query blocks, segments) of triton_fused.extend_attention: every prompt chunk in one launch
        self.extend = extend
        # a padded CUDA graph: rows no query block covers get a zero attention output (finite values for
        # the padded tokens, whose K/V go to the scratch slot 0, which padded reads see)
        self.zero_pad = zero_pad
        self.scratch: DecodeScratch | None = None
        if num_decode and num_heads:
            self.scratch = DecodeScratch(num_decode, num_heads, pool.k.shape[-1], num_splits, pool.device)

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pool, v_pool = self.pool.k[layer_idx], self.pool.v[layer_idx]
        k_pool.index_copy_(0, self.write_slots, k)
        v_pool.index_copy_(0, self.write_slots, v)
        if self.extend is not None and self.num_decode < q.shape[0]:
            return self._attend_in_pool(k_pool, v_pool, q)
        return self._attend(k_pool, v_pool, q, k, v)

    def attention_stored(self, layer_idx: int, q: torch.Tensor) -> torch.Tensor:
        """As attention(), for a caller that has written this step's k/v into the pool itself
        (triton_fused.qk_norm_rope_store)."""
        k_pool, v_pool = self.pool.k[layer_idx], self.pool.v[layer_idx]
        if self.num_decode == q.shape[0]:
            return self._decode(k_pool, v_pool, q, None)
        if self.extend is not None:
            return self._attend_in_pool(k_pool, v_pool, q)
        # no extend kernel: the SDPA path, over the step's k/v read back from the pool
        return self._attend(k_pool, v_pool, q, k_pool.index_select(0, self.write_slots),
                            v_pool.index_select(0, self.write_slots))

    def _attend_in_pool(self, k_pool: torch.Tensor, v_pool: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        from minisgl.engine.cuda.triton_fused import extend_attention

        assert self.extend is not None
        out = torch.zeros_like(q) if self.zero_pad else torch.empty_like(q)
        if self.num_decode:
            self._decode(k_pool, v_pool, q[:self.num_decode], out[:self.num_decode])
        meta, blocks, segs = self.extend
        return extend_attention(q, k_pool, v_pool, self.table, meta, blocks, segs, out)

    def _attend(self, k_pool: torch.Tensor, v_pool: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        b = self.num_decode
        if b == q.shape[0]:
            return self._decode(k_pool, v_pool, q, None)
        if not b and len(self.segments) == 1 and self.segments[0].kv_slots is None:
            return causal_attention(q, k, v)  # one cold prompt: attend over the fresh k/v directly
        out = torch.empty_like(q)
        if b:
            self._decode(k_pool, v_pool, q[:b], out[:b])
        for seg in self.segments:
            qs = q[seg.start:seg.end]
            if seg.kv_slots is None:
                out[seg.start:seg.end] = causal_attention(qs, k[seg.start:seg.end], v[seg.start:seg.end])
            else:
                assert seg.mask is not None
                out[seg.start:seg.end] = masked_gqa_attention(
                    qs, k_pool.index_select(0, seg.kv_slots), v_pool.index_select(0, seg.kv_slots), seg.mask)
        return out

    def _decode(self, k_pool: torch.Tensor, v_pool: torch.Tensor, q: torch.Tensor,
                out: torch.Tensor | None) -> torch.Tensor:
        assert self.rows is not None and self.seq_lens is not None
        if self.scratch is None:
            self.scratch = DecodeScratch(q.shape[0], q.shape[1], q.shape[2], self.num_splits, q.device)
        return decode_attention(q, k_pool, v_pool, self.table, self.rows, self.seq_lens, self.num_splits,
                                self.scratch, out, block_n=self.block_n)


def prefix_mask(prefix: int, chunk: int, group: int, device: torch.device) -> torch.Tensor:
    """[group * chunk, prefix + chunk] bool: query i (at position prefix + i) sees keys 0..prefix + i,
    repeated for the `group` query heads that share a KV head (see masked_gqa_attention)."""
    m = torch.ones(chunk, prefix + chunk, dtype=torch.bool, device=device).tril_(prefix)
    return m.repeat(group, 1) if group > 1 else m


def masked_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [T, H, D], k/v [S, Hkv, D], mask [G*T, S] -> [T, H, D]. The G query heads of a KV head are folded
    into SDPA's query axis, so K/V are never repeated."""
    t, n_heads, d = q.shape
    n_kv = k.shape[1]
    g = n_heads // n_kv
    qg = q.reshape(t, n_kv, g, d).permute(1, 2, 0, 3).reshape(n_kv, g * t, d)
    out = F.scaled_dot_product_attention(qg, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.view(n_kv, g, t, d).permute(2, 0, 1, 3).reshape(t, n_heads, d)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention of one fresh sequence (flash SDPA on CUDA)."""
    n_heads, n_kv = q.shape[1], k.shape[1]
    if n_heads != n_kv:
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    return out.transpose(0, 1)
