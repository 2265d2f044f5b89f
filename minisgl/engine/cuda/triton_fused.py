"""Fused Triton kernels for the `sgl` backend's forward: fewer, larger launches per layer.

A decode step of a small model is bound by its kernel count, not its bytes (issue: 23 kernels a layer,
2.3 ms a step at batch 1). Per layer these kernels replace:

  add_rmsnorm        residual add + RMSNorm (2-3 kernels -> 1), twice a layer
  silu_mul           silu(gate) * up over the fused gate|up output (2 -> 1)
  qk_norm_rope_store Qwen3's per-head q/k RMSNorm, neox RoPE on q and k, and the write of k and v into
                     the paged pool at this step's slots (q/k norms 2, RoPE 6, index_copy 2 -> 1)
  extend_attention   prefill attention of every prompt chunk of a step in one launch, reading the cached
                     prefix and the chunk's own K/V in place from the pool through the req -> slot table
                     (no gather, no mask tensor; one SDPA per chunk before)

so a layer is 4 GEMMs, the two decode-attention kernels and 4 of these (10 launches). Numerics follow
the torch ops they replace: float32 inside, one rounding to the tensor's dtype per output (the residual
sum is rounded before it is normed, as `x + residual` is). `install_fused(model)` swaps the model's
modules for subclasses that call these; the engine's other contexts still get the plain forward.
Every kernel has a torch reference in tests/test_sgl_backend.py, run under TRITON_INTERPRET=1 on CPUs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from minisgl.engine.cuda.triton_attend import attend_block
from minisgl.models.layers import RMSNorm, SiluMLP

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------- norms


@triton.jit
def _rmsnorm_kernel(X, R, W, Out, ResOut, stride_x, stride_r, stride_o, stride_ro, N, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(ResOut.dtype.element_ty)  # rounded like `x + residual` before the norm sees it
        tl.store(ResOut + row * stride_ro + offs, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, 0) / N
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(var + eps) * w
    tl.store(Out + row * stride_o + offs, y.to(Out.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of a 2-D x (rows may be strided)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](x2, x2, weight, out, out, x2.stride(0), x2.stride(0), out.stride(0),
                                        out.stride(0), n, eps, HAS_RES=False, BLOCK=triton.next_power_of_2(n),
                                        num_warps=_norm_warps(n))
    return out.view(x.shape)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual) in one pass; x and residual [T, N]."""
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res = torch.empty(x.shape, dtype=residual.dtype, device=x.device)
    if x.shape[0]:
        _rmsnorm_kernel[(x.shape[0],)](x, residual, weight, out, res, x.stride(0), residual.stride(0), out.stride(0),
                                       res.stride(0), n, eps, HAS_RES=True, BLOCK=triton.next_power_of_2(n),
                                       num_warps=_norm_warps(n))
    return out, res


def _norm_warps(n: int) -> int:
    return 1 if n <= 256 else 4 if n <= 2048 else 8


# ---------------------------------------------------------------------------------------- MLP


@triton.jit
def _silu_mul_kernel(GU, Out, I, stride_gu, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(GU + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + I + offs, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Out + row * stride_o + offs, y.to(Out.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate | up) -> silu(gate) * up [T, I]."""
    t, two_i = gate_up.shape
    i = two_i // 2
    out = torch.empty(t, i, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(i))
    if t:
        _silu_mul_kernel[(t, triton.cdiv(i, block))](gate_up, out, i, gate_up.stride(0), out.stride(0), BLOCK=block,
                                                    num_warps=4)
    return out


# ---------------------------------------------------------------------------------------- q/k norm + RoPE + KV write


@triton.jit
def _qk_rope_store_kernel(QKV, Cos, Sin, QW, KW, QOut, KPool, VPool, Slots,
                          stride_qkv, stride_cos, stride_sin, stride_qt, stride_qh, stride_ks, stride_kh,
                          stride_vs, stride_vh, eps,
                          H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                          BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)  # 0..H-1: a query head; H..H+HKV-1: a key head (and its value head)
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < HALF
    base = QKV + t * stride_qkv + h * D
    x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        var = (tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / D
        inv = tl.rsqrt(var + eps)
        if h < H:
            w1 = tl.load(QW + offs, mask=mask, other=0.0).to(tl.float32)
            w2 = tl.load(QW + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            w1 = tl.load(KW + offs, mask=mask, other=0.0).to(tl.float32)
            w2 = tl.load(KW + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        x1 = x1 * inv * w1
        x2 = x2 * inv * w2
    c1 = tl.load(Cos + t * stride_cos + offs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + t * stride_cos + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + t * stride_sin + offs, mask=mask, other=0.0).to(tl.float32)  # -sin (sign folded in)
    s2 = tl.load(Sin + t * stride_sin + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1 + x2 * s1
    y2 = x2 * c2 + x1 * s2
    if h < H:
        dst = QOut + t * stride_qt + h * stride_qh
        tl.store(dst + offs, y1.to(QOut.dtype.element_ty), mask=mask)
        tl.store(dst + HALF + offs, y2.to(QOut.dtype.element_ty), mask=mask)
    else:
        kvh = h - H
        slot = tl.load(Slots + t).to(tl.int64)
        kdst = KPool + slot * stride_ks + kvh * stride_kh
        tl.store(kdst + offs, y1.to(KPool.dtype.element_ty), mask=mask)
        tl.store(kdst + HALF + offs, y2.to(KPool.dtype.element_ty), mask=mask)
        vsrc = QKV + t * stride_qkv + (H + HKV + kvh) * D
        vdst = VPool + slot * stride_vs + kvh * stride_vh
        tl.store(vdst + offs, tl.load(vsrc + offs, mask=mask, other=0.0), mask=mask)
        tl.store(vdst + HALF + offs, tl.load(vsrc + HALF + offs, mask=mask, other=0.0), mask=mask)


def qk_norm_rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor | None,
                       k_weight: torch.Tensor | None, eps: float, k_pool: torch.Tensor, v_pool: torch.Tensor,
                       slots: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) D]; cos/sin [T, 1, D] (RotaryEmbedding's, sin signed); pools [S, Hkv, D].
    Writes k (normed, rotated) and v into the pools at `slots` [T]; returns q [T, H, D] (normed, rotated)."""
    t = qkv.shape[0]
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if t:
        has_norm = q_weight is not None and k_weight is not None
        half = head_dim // 2
        _qk_rope_store_kernel[(t, num_heads + num_kv_heads)](
            qkv, cos, sin, q_weight if has_norm else qkv, k_weight if has_norm else qkv, q, k_pool, v_pool, slots,
            qkv.stride(0), cos.stride(0), sin.stride(0), q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
            v_pool.stride(0), v_pool.stride(1), eps,
            H=num_heads, HKV=num_kv_heads, D=head_dim, HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            HAS_NORM=has_norm, num_warps=1)
    return q


# ---------------------------------------------------------------------------------------- extend attention


EXTEND_BLOCK_M = 64
EXTEND_BLOCK_N = 64


# The block and segment counts change every step: specializing on them (Triton compiles a variant when an
# int is 1 or a multiple of 16) stalled a step for ~1 s the first time each case came up.
@triton.jit(do_not_specialize=["num_blocks", "num_segs"])
def _extend_kernel(Q, K, V, O, Table, Meta, num_blocks, num_segs,
                   stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh, stride_tr,
                   qk_scale,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    # Meta (int64): [block -> segment | block -> first query of the segment | per segment:
    #                first token in q | chunk length | table row | cached prefix length]
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seg = tl.load(Meta + pid)
    m0 = tl.load(Meta + num_blocks + pid)
    sbase = Meta + 2 * num_blocks
    q0 = tl.load(sbase + seg)
    n = tl.load(sbase + num_segs + seg)
    row = tl.load(sbase + 2 * num_segs + seg)
    prefix = tl.load(sbase + 3 * num_segs + seg)
    kvh = h // G
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n
    mask_d = offs_d < D
    q = tl.load(Q + (q0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_end = prefix + tl.minimum(m0 + BLOCK_M, n)  # the last query of this block sees keys < kv_end
    qpos = prefix + offs_m
    table_row = Table + row * stride_tr
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        keep = mask_n[None, :] & (offs_n[None, :] <= qpos[:, None])  # causal within the chunk
        m_i, l_i, acc = attend_block(q, K, V, table_row, offs_n, mask_n, keep, offs_d, mask_d, kvh,
                                     stride_ks, stride_kh, stride_vs, stride_vh, qk_scale, m_i, l_i, acc, IEEE)
    out = acc / l_i[:, None]
    tl.store(O + (q0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


def extend_meta(segments: list[tuple[int, int, int, int]], block_m: int = EXTEND_BLOCK_M) -> tuple[list[int], int, int]:
    """Host metadata for extend_attention: segments are (first token in q, chunk length, table row, cached
    prefix). Returns (the flat int list, number of query blocks, number of segments)."""
    block_seg: list[int] = []
    block_start: list[int] = []
    for i, (_, n, _, _) in enumerate(segments):
        for m0 in range(0, n, block_m):
            block_seg.append(i)
            block_start.append(m0)
    cols = list(zip(*segments)) if segments else [(), (), (), ()]
    flat = block_seg + block_start + [x for col in cols for x in col]
    return flat, len(block_seg), len(segments)


def extend_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                     meta: torch.Tensor, num_blocks: int, num_segs: int, out: torch.Tensor,
                     sm_scale: float | None = None, block_m: int = EXTEND_BLOCK_M, block_n: int = EXTEND_BLOCK_N
                     ) -> torch.Tensor:
    """Causal attention of every prompt chunk of a step: chunk s (tokens q[start_s : start_s + n_s] at
    positions prefix_s ...) attends over table[row_s, :prefix_s + i + 1], whose K/V (the cached prefix and
    the chunk itself) are already in the pools. q, out [T, H, D]; pools [S, Hkv, D]; meta from extend_meta
    on the device. Writes the chunks' rows of `out`."""
    _, n_heads, d = q.shape
    n_kv = k_pool.shape[1]
    if num_blocks == 0:
        return out
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)) * LOG2E
    _extend_kernel[(num_blocks, n_heads)](
        q, k_pool, v_pool, out, table, meta, num_blocks, num_segs,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        out.stride(0), out.stride(1), table.stride(0), scale,
        G=n_heads // n_kv, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2)
    return out


def extend_attention_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                               segments: list[tuple[int, int, int, int]]) -> dict[int, torch.Tensor]:
    """float64, one segment at a time: {first token: [n, H, D]} (for tests)."""
    g = q.shape[1] // k_pool.shape[1]
    d = q.shape[2]
    out = {}
    for start, n, row, prefix in segments:
        slots = table[row, :prefix + n].long()
        k = k_pool[slots].double().repeat_interleave(g, dim=1)
        v = v_pool[slots].double().repeat_interleave(g, dim=1)
        s = torch.einsum("thd,shd->hts", q[start:start + n].double(), k) / math.sqrt(d)
        keep = torch.ones(n, prefix + n, dtype=torch.bool, device=q.device).tril_(prefix)
        s = s.masked_fill(~keep, float("-inf"))
        out[start] = torch.einsum("hts,shd->thd", s.softmax(-1), v)
    return out


# ---------------------------------------------------------------------------------------- model modules


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rmsnorm(x, residual, self.weight, self.eps)


class FusedSiluMLP(SiluMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


def install_fused(model: torch.nn.Module, gemv: bool = True) -> int:
    """Swap the model's RMSNorm / SiluMLP / Attention modules (and with `gemv`, its decoder layers: the
    batch-1 GEMV path of triton_gemv.py) for the fused subclasses (same parameters, same state dict).
    Returns how many modules changed. The fused attention and layer paths run only under the sgl context
    (they write the pool themselves); any other context gets the plain forward."""
    from minisgl.models.decoder import Attention, DecoderLayer

    swaps = {RMSNorm: FusedRMSNorm, SiluMLP: FusedSiluMLP, Attention: FusedAttention}
    if gemv:
        swaps[DecoderLayer] = FusedDecoderLayer
    n = 0
    for module in model.modules():
        new = swaps.get(type(module))
        if new is not None:
            module.__class__ = new
            n += 1
    return n


def _fused_classes():
    from torch import nn

    from minisgl.engine.cuda import triton_gemv as tg
    from minisgl.engine.cuda.triton_gemv import PRO_NORM, PRO_SILU
    from minisgl.models.decoder import Attention, DecoderLayer

    class _FusedAttention(Attention):
        def forward(self, x, cos, sin, ctx):  # type: ignore[override]
            if getattr(ctx, "attention_stored", None) is None:
                return super().forward(x, cos, sin, ctx)
            out = self.attend(self.qkv_proj(x), cos, sin, ctx)
            return self.o_proj(out.reshape(x.shape[0], self.q_size))

        def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx) -> torch.Tensor:
            """q/k norms + RoPE + the K/V write in one kernel, then attention over the pool: [T, H, D]."""
            pool = ctx.pool
            q = qk_norm_rope_store(
                qkv, cos, sin, None if self.q_norm is None else self.q_norm.weight,
                None if self.k_norm is None else self.k_norm.weight,
                self.q_norm.eps if self.q_norm is not None else 0.0, pool.k[self.layer_idx], pool.v[self.layer_idx],
                ctx.write_slots, self.num_heads, self.num_kv_heads, self.head_dim)
            return ctx.attention_stored(self.layer_idx, q)

    def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # a communicating layer (TP's RowParallelLinear) keeps its own forward: it all-reduces
        return tg.gemv(x, module.weight, module.bias)[0] if type(module) is nn.Linear else module(x)

    class _FusedDecoderLayer(DecoderLayer):
        """A one-token step (batch-1 decode) as 7 launches: norm+qkv GEMV, q/k norm+RoPE+KV write, the
        two attention kernels, o GEMV, norm+gate_up GEMV, silu*up+down GEMV (triton_gemv.py)."""

        def forward(self, x, residual, cos, sin, ctx):  # type: ignore[override]
            if x.shape[0] != 1 or getattr(ctx, "attention_stored", None) is None:
                return super().forward(x, residual, cos, sin, ctx)
            attn, mlp = self.self_attn, self.mlp
            ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
            qkv, res = tg.gemv(x, attn.qkv_proj.weight, attn.qkv_proj.bias, pro=PRO_NORM, residual=residual,
                            norm_weight=ln1.weight, eps=ln1.eps)
            residual = x if res is None else res  # the first layer: the embedding is the residual
            h = linear(attn.o_proj, attn.attend(qkv, cos, sin, ctx).reshape(1, attn.q_size))
            gate_up, residual = tg.gemv(h, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, pro=PRO_NORM,
                                     residual=residual, norm_weight=ln2.weight, eps=ln2.eps)
            if type(mlp.down_proj) is nn.Linear:
                return tg.gemv(gate_up, mlp.down_proj.weight, mlp.down_proj.bias, pro=PRO_SILU)[0], residual
            return mlp.down_proj(silu_mul(gate_up)), residual

    for cls, name in ((_FusedAttention, "FusedAttention"), (_FusedDecoderLayer, "FusedDecoderLayer")):
        cls.__name__ = cls.__qualname__ = name
    return _FusedAttention, _FusedDecoderLayer


FusedAttention, FusedDecoderLayer = _fused_classes()
