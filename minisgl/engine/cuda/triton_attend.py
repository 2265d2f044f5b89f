"""The online-softmax block both paged attention kernels share (decode: triton_attention.py; extend:
triton_fused.py). Its own module so that neither kernel file imports the other at load."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_block(q, K, V, table_row, offs_n, mask_n, keep, offs_d, mask_d, kvh,
                 stride_ks, stride_kh, stride_vs, stride_vh, qk_scale, m, l, acc, IEEE: tl.constexpr):
    """One block of keys of an online softmax (shared by the decode and extend kernels): K/V read in
    place through the page-table row at offs_n (mask_n), scores outside `keep` dropped; returns the
    updated running max m (log2 units), sum l and accumulator acc."""
    slots = tl.load(table_row + offs_n, mask=mask_n, other=0).to(tl.int64)
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + slots[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = tl.where(keep, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(qk, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    v = tl.load(V + slots[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc
