"""Batch-1 decode: the layer's matmuls as Triton GEMVs with the elementwise work between them folded in.

At batch 1 a decode step reads ~1 GB of weights in ~0.25 ms at full bandwidth, yet the H200 profile of
the step (bench/gpu_profile.py) showed 1.27 ms of kernels: cuBLAS picks split-K kernels with a second
reduce launch for `down`, a 341 GB/s kernel for `o_proj` (11 us for 4 MB), and every norm and silu*up is
a launch of its own. Here one program computes BLOCK_N outputs of y = a @ W^T + b for a one-row input,
where `a` is built on the fly from what the previous kernel wrote (PRO):

  PRO_PLAIN   a = x                                  (o_proj)
  PRO_NORM    a = rmsnorm(x + residual) * w          (qkv and gate_up: the layer's two norms; every
                                                      program recomputes the 1-row norm, which costs a
                                                      few KB of L2 reads, and program 0 writes x + residual)
  PRO_SILU    a = silu(x[:K]) * x[K:]                (down over gate|up)

so a layer is 7 launches instead of 10, and each weight is streamed once at near full bandwidth. Numerics
follow the ops they replace: float32 inside, `a` rounded to the weight dtype as the unfused ops store it,
one rounding of y. Only the decode step of exactly one token takes this path (FusedDecoderLayer in
triton_fused.py); every other shape keeps cuBLAS. Torch references in tests/test_sgl_backend.py run under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PRO_PLAIN, PRO_NORM, PRO_SILU = 0, 1, 2


@triton.jit
def _gemv_kernel(X, R, NW, W, B, Y, ResOut, N, K, stride_w, eps,
                 PRO: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    if PRO == 1 and BLOCK_K >= K:
        # the whole row in one tile: the weight loads are issued with the input's, before the norm's
        # reduction (a second pass would start the HBM reads only after it)
        rk = tl.arange(0, BLOCK_K)
        mk = rk < K
        w = tl.load(W + rn[:, None] * stride_w + rk[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
        s = tl.load(X + rk, mask=mk, other=0.0).to(tl.float32)
        if HAS_RES:
            s = (s + tl.load(R + rk, mask=mk, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
            tl.store(ResOut + rk, s, mask=mk & (pid == 0))
            s = s.to(tl.float32)
        nw = tl.load(NW + rk, mask=mk, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(s * s, 0) / K + eps)
        a = (s * inv * nw).to(W.dtype.element_ty).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * a[None, :], 1)
    else:
        inv = 1.0
        if PRO == 1:  # the norm's scale first: a pass over the (tiny) input row
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mk = rk < K
                s = tl.load(X + rk, mask=mk, other=0.0).to(tl.float32)
                if HAS_RES:
                    s = (s + tl.load(R + rk, mask=mk, other=0.0).to(tl.float32)).to(X.dtype.element_ty).to(tl.float32)
                sq += s * s
            inv = tl.rsqrt(tl.sum(sq, 0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < K
            w = tl.load(W + rn[:, None] * stride_w + rk[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
            if PRO == 2:
                g = tl.load(X + rk, mask=mk, other=0.0).to(tl.float32)
                u = tl.load(X + K + rk, mask=mk, other=0.0).to(tl.float32)
                a = (g / (1.0 + tl.exp(-g)) * u).to(W.dtype.element_ty).to(tl.float32)
            else:
                a = tl.load(X + rk, mask=mk, other=0.0).to(tl.float32)
                if PRO == 1:
                    if HAS_RES:
                        a = (a + tl.load(R + rk, mask=mk, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
                        tl.store(ResOut + rk, a, mask=mk & (pid == 0))
                        a = a.to(tl.float32)
                    nw = tl.load(NW + rk, mask=mk, other=0.0).to(tl.float32)
                    a = (a * inv * nw).to(W.dtype.element_ty).to(tl.float32)
            acc += w.to(tl.float32) * a[None, :]
        y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(B + rn, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=mask_n)


def gemv_config(n: int, k: int, pro: int = PRO_PLAIN) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), measured on an H200 at the Qwen3-0.6B shapes with the weights coming
    from HBM (bench/gpu_profile.py, `gemv_rotating`): long K tiles (16-byte loads in flight, few loop
    trips) and few rows per program; a norm's row fits one tile up to K = 2048."""
    if pro == PRO_NORM and k <= 2048:
        return 4, triton.next_power_of_2(k), 4
    return 2, 1024, 8


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pro: int = PRO_PLAIN,
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         config: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [1, K] (PRO_SILU: [1, 2K] = gate | up); weight [N, K]. Returns (y [1, N], x + residual or None).
    PRO_NORM normalizes (x + residual if given) with norm_weight first; PRO_SILU takes silu(gate) * up."""
    assert x.shape[0] == 1 and x.stride(-1) == 1 and weight.stride(1) == 1
    n, k = weight.shape
    assert x.shape[1] == (2 * k if pro == PRO_SILU else k), (x.shape, weight.shape, pro)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    block_n, block_k, warps = config or gemv_config(n, k, pro)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else x, weight,
        bias if bias is not None else x, y, res_out if res_out is not None else y, n, k, weight.stride(0), eps,
        PRO=pro, HAS_RES=residual is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=min(block_k, triton.next_power_of_2(k)), num_warps=warps)
    return y, res_out


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pro: int = PRO_PLAIN,
                   residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same with torch ops, rounded where the unfused forward rounds (for tests)."""
    res_out = None
    a = x
    if pro == PRO_NORM:
        if residual is not None:
            a = res_out = x + residual
        a = torch.nn.functional.rms_norm(a.float(), (a.shape[-1],), norm_weight.float(), eps).to(x.dtype)
    elif pro == PRO_SILU:
        g, u = x.float().chunk(2, dim=-1)
        a = (torch.nn.functional.silu(g) * u).to(x.dtype)
    y = torch.nn.functional.linear(a.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype), res_out
