"""The forward of a CPU model, with the fused kernels of `cpu_kernels.c` around its matmuls.

Stands in for the model in `Engine._run` (`self.model(ids, positions, ctx)`), as the sgl backend's CUDA
graph runner does on a GPU. Its matmuls are either the packed bfloat16 oneDNN ones of cpu_linear.py
(the `amx` path: bfloat16 activations between them) or, given `weights` (cpu_weights.py: the
`avx512` / `avx2` paths), the weight-streaming kernels for decode-sized steps and torch's float32
GEMM for prompt chunks, with float32 activations throughout. Per layer it is 4 matmuls and 4 kernels:

    x = add_rmsnorm(residual, delta)        # the previous layer's output joins the residual stream
    qkv = qkv_proj(x)
    attn = decode_attention(qkv, pool)      # decode rows: norms, RoPE, KV write, attention in place
                                            # prefill rows: the same ops in torch, then SDPA per chunk
    x = add_rmsnorm(residual, o_proj(attn))
    delta = down_proj(silu_mul(gate_up_proj(x)))

instead of ~30 torch ops, each costing 5-15 us at decode sizes on caches the weight stream has just
flushed. With CpuWeights, a decode-only step of up to MAX_KERNEL_ROWS rows runs all of that in C, one
call for every layer (cpu_kernels.c's decode_layers, bit-identical to this loop). A prompt chunk's attention stays torch's SDPA (a blocked matmul; the kernel here does one
query at a time). The numbers are those of the model's forward: float32 residual, norms, RoPE, KV and
attention, bfloat16 matmul inputs on the amx path (up to float32 rounding order and one bfloat16
rounding fewer in silu * up), float32 everything on the others (up to rounding order, and the weights'
own rounding where they are stored as bfloat16); tests/test_cpu_kernels.py compares each against
float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minisgl.engine.attention import PagedAttention
from minisgl.engine.cpu.kernels import (DESC_FIELDS, CpuKernels, attention_scratch_size, check_attention_shape,
                                        check_decode_batch)
from minisgl.engine.cpu.linear import PackedLinear
from minisgl.engine.cpu.weights import MAX_KERNEL_ROWS, CpuWeight


def _linear(x: torch.Tensor, lin: PackedLinear) -> torch.Tensor:
    """The packed matmul with its bfloat16 output, whatever the module's bf16_out says."""
    return torch.ops.mkldnn._linear_pointwise(x, lin.packed, lin.bias, "none", [], "")


def _apply(x: torch.Tensor, weight: CpuWeight) -> torch.Tensor:
    return weight(x)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer as the kernels see it: its matmuls (packed, or CpuWeights), and data pointers
    of float32 weights checked once at load (the model is frozen while it serves)."""

    qkv: PackedLinear | CpuWeight
    o: PackedLinear | CpuWeight
    gate_up: PackedLinear | CpuWeight
    down: PackedLinear | CpuWeight
    post_norm: int  # post_attention_layernorm.weight
    next_norm: int  # the next layer's input_layernorm.weight, or the final norm's after the last layer
    q_norm: int | None
    k_norm: int | None
    attn: nn.Module  # the model's Attention: its project_heads for prompt rows


class FusedCpuForward(nn.Module):
    """Wraps a CPU model; called like it, with the engine's PagedAttention context. Without `weights`
    the model's linears must be packed (the amx path); with them (cpu_weights.weights_for) the model
    stays as it is and its linears run through them."""

    def __init__(self, model: nn.Module, kernels: CpuKernels, weights: dict[str, CpuWeight] | None = None) -> None:
        super().__init__()
        if not self.supports(model, vector=weights is not None):
            raise ValueError("FusedCpuForward needs a float32 model whose attention shape the kernels handle, "
                             "with its linears packed (PackedLinear) or CpuWeights for them")
        self.model = model
        self.kernels = kernels
        self.weights = weights
        self.act = torch.bfloat16 if weights is None else torch.float32  # activations between matmuls
        suffix = "" if weights is None else "_f32"
        self._add_rmsnorm = getattr(kernels.raw, "add_rmsnorm" + suffix)
        self._silu_mul = getattr(kernels.raw, "silu_mul" + suffix)
        self._attention = getattr(kernels.raw, "decode_attention" + suffix)
        self.config = cfg = model.config  # stands in for the model, config included
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        inner = model.model
        self.eps = float(cfg.rms_norm_eps)
        self.first_norm = self._weight(inner.layers[0].input_layernorm.weight, cfg.hidden_size)
        self.layers: list[_Layer] = []
        def lin(name: str, module: nn.Module) -> PackedLinear | CpuWeight:
            return module if weights is None else weights[name]

        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            nxt = inner.layers[i + 1].input_layernorm if i + 1 < len(inner.layers) else inner.norm
            pre = f"model.layers.{i}."
            self.layers.append(_Layer(
                lin(pre + "self_attn.qkv_proj", attn.qkv_proj), lin(pre + "self_attn.o_proj", attn.o_proj),
                lin(pre + "mlp.gate_up_proj", mlp.gate_up_proj), lin(pre + "mlp.down_proj", mlp.down_proj),
                self._weight(layer.post_attention_layernorm.weight, cfg.hidden_size),
                self._weight(nxt.weight, cfg.hidden_size),
                None if attn.q_norm is None else self._weight(attn.q_norm.weight, cfg.head_dim),
                None if attn.k_norm is None else self._weight(attn.k_norm.weight, cfg.head_dim), attn))
        self.intermediate = cfg.intermediate_size
        self.logits = model.logits_proj if weights is None else weights["logits"]
        self.steps = 0  # forwards run here (tests read it)
        self.layer_steps = 0  # of them, decode steps run whole by decode_layers
        self.whole_steps = weights is not None  # decode steps through decode_layers (tests turn it off)
        self._desc: torch.Tensor | None = None  # decode_layers' layer descriptions, for _desc_pool's pool
        self._desc_pool: tuple[int, ...] = ()

    def _layer_desc(self, pool) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """decode_layers' per-layer description (cpu_kernels.c): matmuls, norms and this pool's layers."""
        key = (pool.k.data_ptr(), pool.v.data_ptr(), pool.k.shape[0])
        if self._desc is None or self._desc_pool != key:
            rows = []
            for i, layer in enumerate(self.layers):
                row: list[int] = []
                for w in (layer.qkv, layer.o, layer.gate_up, layer.down):
                    assert isinstance(w, CpuWeight)
                    row += [w.format_id, w.data.data_ptr(), 0 if w.bias is None else w.bias.data_ptr()]
                row += [layer.post_norm, layer.next_norm, layer.q_norm or 0, layer.k_norm or 0,
                        pool.k[i].data_ptr(), pool.v[i].data_ptr()]
                rows.append(row)
            self._desc = torch.tensor(rows, dtype=torch.int64)
            assert self._desc.shape[1] == DESC_FIELDS
            self._desc_pool = key
        return self._desc

    @staticmethod
    def supports(model: nn.Module, vector: bool = False) -> bool:
        """A float32 model (residual stream, norms, RoPE cache) with an attention shape the C kernel
        handles, whose linears and logits projection are packed for oneDNN (cpu_linear.pack_linears),
        or, for `vector` (the weight kernels), whose matmul input sizes are multiples of 32."""
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(model, "logits_proj"):
            return False
        cfg = model.config
        try:
            check_attention_shape(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        except ValueError:
            return False
        if next(model.parameters()).dtype != torch.float32 or inner.rotary_emb.cos_sin.dtype != torch.float32:
            return False
        if vector:
            return all(size % 32 == 0 for size in (cfg.hidden_size, cfg.intermediate_size,
                                                    cfg.num_heads * cfg.head_dim))
        if model.logits_proj is None:
            return False
        return all(isinstance(m, PackedLinear) for layer in inner.layers for m in (
            layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj))

    @staticmethod
    def _weight(w: torch.Tensor, size: int) -> int:
        if w.dtype != torch.float32 or w.shape != (size,) or not w.is_contiguous():
            raise ValueError(f"norm weight: expected a contiguous float32 vector of {size}, "
                             f"got {w.dtype} {tuple(w.shape)}")
        return w.data_ptr()

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx: PagedAttention) -> torch.Tensor:
        if isinstance(ctx, PagedAttention) and ctx.pool.dtype == torch.float32:
            return self._forward(ids, positions, ctx)
        return self.model(ids, positions, ctx)  # e.g. a DenseContext in a test

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx: PagedAttention) -> torch.Tensor:
        inner = self.model.model
        t, b, h, hkv, d = ids.shape[0], ctx.num_decode, self.num_heads, self.num_kv_heads, self.head_dim
        cos_sin = inner.rotary_emb.cos_sin
        pool = ctx.pool
        # Buffers of the step, reused by every layer (each kernel reads its input before it writes)
        residual = inner.embed_tokens(ids)  # float32 [t, hidden], a fresh tensor: updated in place
        hidden = residual.shape[1]
        x = torch.empty(t, hidden, dtype=self.act)
        attn_out = torch.empty(t, h * d, dtype=self.act)
        act = torch.empty(t, self.intermediate, dtype=self.act)
        mm = _linear if self.weights is None else _apply
        add_rmsnorm, silu_mul, attention = self._add_rmsnorm, self._silu_mul, self._attention
        eps = self.eps
        decode_args: tuple = ()
        if b:
            table, lens = ctx.decode_table, ctx.decode_lens
            assert table is not None and lens is not None
            check_decode_batch(positions[:b], ctx.write_slots[:b], table, lens, pool.k.shape[1], cos_sin.shape[0])
            scratch = torch.empty(attention_scratch_size(b, h, d, table.shape[1]), dtype=torch.float32)
            decode_args = (ctx.write_slots.data_ptr(), table.data_ptr(), table.shape[1], lens.data_ptr(),
                           attn_out.data_ptr(), scratch.data_ptr(), b, h, hkv, d, d ** -0.5)
        if b < t:  # prompt-chunk rows: the model's own attention ops on them
            prefill_ctx = ctx.prefill_rows()
            prefill_cos, prefill_sin = inner.rotary_emb(positions[b:])
        add_rmsnorm(residual.data_ptr(), None, self.first_norm, x.data_ptr(), t, hidden, eps)
        if self.whole_steps and b == t and t <= MAX_KERNEL_ROWS:
            # a decode-only step: every layer in one C call (decode_layers)
            n_qkv, inter = (h + 2 * hkv) * d, self.intermediate
            bufs = [torch.empty(t, n) for n in (n_qkv, hidden, 2 * inter, inter, hidden)]
            qkv_buf, o_buf, gu_buf, act_buf, down_buf = bufs
            self.kernels.raw.decode_layers(
                self._layer_desc(pool).data_ptr(), len(self.layers), residual.data_ptr(), x.data_ptr(),
                qkv_buf.data_ptr(), attn_out.data_ptr(), o_buf.data_ptr(), gu_buf.data_ptr(), act_buf.data_ptr(),
                down_buf.data_ptr(), t, hidden, inter, h, hkv, d, eps, cos_sin.data_ptr(), positions.data_ptr(),
                ctx.write_slots.data_ptr(), table.data_ptr(), table.shape[1], lens.data_ptr(), scratch.data_ptr(),
                d ** -0.5)
            self.steps += 1
            self.layer_steps += 1
            return self.logits(x).float()
        for i, layer in enumerate(self.layers):
            qkv = mm(x, layer.qkv)
            if b:
                attention(qkv.data_ptr(), layer.q_norm, layer.k_norm, eps, cos_sin.data_ptr(),
                          positions.data_ptr(), pool.k[i].data_ptr(), pool.v[i].data_ptr(), *decode_args)
            if b < t:
                q, k, v = layer.attn.project_heads(qkv[b:].float(), prefill_cos, prefill_sin)
                attn_out[b:] = prefill_ctx.attention(i, q, k, v).reshape(t - b, h * d)
            o = mm(attn_out, layer.o)  # named: a temporary would be freed before the C call reads it
            add_rmsnorm(residual.data_ptr(), o.data_ptr(), layer.post_norm, x.data_ptr(), t, hidden, eps)
            gate_up = mm(x, layer.gate_up)
            silu_mul(gate_up.data_ptr(), act.data_ptr(), t, self.intermediate)
            down = mm(act, layer.down)
            add_rmsnorm(residual.data_ptr(), down.data_ptr(), layer.next_norm, x.data_ptr(), t, hidden, eps)
        self.steps += 1
        idx = ctx.logits_indices
        return self.logits(x if b == t else x[idx].contiguous()).float()
