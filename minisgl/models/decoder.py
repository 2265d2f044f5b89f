"""One decoder for the Llama, Qwen2 and Qwen3 families, which differ only in a few switches.

Parameter names follow transformers' (model.layers.N.self_attn...), except that q/k/v are fused into
`qkv_proj` and gate/up into `gate_up_proj`; `CausalLM.load_weights` maps checkpoint names onto them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.models.context import ForwardContext
from minisgl.models.layers import MergedLinear, RMSNorm, RotaryEmbedding, SiluMLP, apply_rope

if TYPE_CHECKING:
    from minisgl.models.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=o_bias)
        # Qwen3: RMSNorm over each head of q and k, before RoPE.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.project_heads(self.qkv_proj(x), cos, sin)
        out = ctx.attention(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(q.shape[0], self.q_size))

    def project_heads(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [T, q|k|v] -> q [T, heads, D], k and v [T, kv heads, D], with Qwen3's q/k norms and RoPE
        applied (the CPU forward calls it too, on its prompt rows)."""
        num_tokens, head_dim = qkv.shape[0], self.head_dim
        qk_size = self.q_size + self.kv_size
        v = qkv[:, qk_size:].view(num_tokens, self.num_kv_heads, head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(qkv[:, : self.q_size].view(num_tokens, self.num_heads, head_dim))
            k = self.k_norm(qkv[:, self.q_size : qk_size].view(num_tokens, self.num_kv_heads, head_dim))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:
            # q and k sit side by side in qkv: rotate them in one go (half the small ops).
            qk = apply_rope(qkv[:, :qk_size].view(num_tokens, -1, head_dim), cos, sin)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, v


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, o_bias, qk_norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SiluMLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output delta, the residual stream before it); the next layer adds them,
        which lets the add and the norm be fused on devices that have such a kernel."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(h, cos, sin, ctx)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, o_bias, qk_norm) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the last layer's (delta, residual), not yet summed nor normed: the caller keeps only
        the rows it needs logits for first."""
        cos, sin = self.rotary_emb(positions)
        h = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, ctx)
        assert residual is not None, "a model needs at least one layer"
        return h, residual


class CausalLM(nn.Module):
    """The whole model. Family subclasses only set the class switches below."""

    qk_norm: ClassVar[bool] = False  # Qwen3: RMSNorm on q and k per head
    o_proj_bias: ClassVar[bool | None] = None  # None: o_proj has a bias iff config.attention_bias (Qwen2: never)

    # checkpoint module name -> (our fused module, shard index)
    packed_modules: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        o_bias = config.attention_bias if self.o_proj_bias is None else self.o_proj_bias
        self.model = DecoderModel(config, o_bias, self.qk_norm)
        tied = config.tie_word_embeddings
        self.lm_head = None if tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # A backend may set a faster projection of the same weight here (engine/cpu/linear.py packs it
        # for AMX); None means F.linear on lm_head_weight().
        self.logits_proj: nn.Module | None = None

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions: [T]. Returns float32 logits [len(ctx.logits_indices), vocab]."""
        h, residual = self.model(input_ids, positions, ctx)
        idx = ctx.logits_indices
        # The final norm and the lm_head run only on the rows that need logits.
        h = self.model.norm(h[idx] + residual[idx])
        if self.logits_proj is not None:
            return self.logits_proj(h).float()
        return F.linear(h, self.lm_head_weight()).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (transformers names) into our parameters, casting to their dtype and
        device; raises on an unknown name, a wrong shape, or a parameter left unfilled."""
        params = dict(self.named_parameters())
        need = {name: 1 for name in params}
        for module_name, module in self.named_modules():
            if isinstance(module, MergedLinear):
                for p in ("weight", "bias") if module.bias is not None else ("weight",):
                    need[f"{module_name}.{p}"] = len(module.shard_sizes)
        got = dict.fromkeys(need, 0)
        for name, tensor in weights:
            if "rotary_emb." in name:
                continue  # old checkpoints store inv_freq; we compute it
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            module_path, _, param_name = name.rpartition(".")
            prefix, _, module_name = module_path.rpartition(".")
            if module_name in self.packed_modules:
                fused, shard = self.packed_modules[module_name]
                target = f"{prefix}.{fused}"
                module = self.get_submodule(target)
                assert isinstance(module, MergedLinear)
                module.load_shard(param_name, shard, tensor)
                got[f"{target}.{param_name}"] += 1
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if params[name].shape != tensor.shape:
                raise ValueError(f"{name}: expected {tuple(params[name].shape)}, got {tuple(tensor.shape)}")
            params[name].copy_(tensor)
            got[name] += 1
        missing = [name for name, n in need.items() if got[name] != n]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")

    def init_buffers(self) -> None:
        """Recompute the non-persistent buffers (rotary cache) after materializing from the meta device."""
        self.model.rotary_emb.init_cache()
