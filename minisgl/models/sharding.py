"""Which part of the model a TP rank holds, and how it gets there.

Rank r of N keeps, of each decoder layer:
  - qkv_proj (column-parallel): query heads [r*H/N, (r+1)*H/N) and KV heads [r*Hkv/N, (r+1)*Hkv/N).
    With contiguous blocks the query heads of a rank are exactly those grouped with its KV heads
    (head h uses KV head h // (H/Hkv)), so attention needs no communication;
  - gate_up_proj (column-parallel): intermediate rows [r*I/N, (r+1)*I/N) of gate and of up;
  - o_proj, down_proj (row-parallel): the matching input columns; bias (if any) whole;
  - embed_tokens, lm_head (vocab-parallel): vocabulary rows [r*V/N, (r+1)*V/N);
  - norms: whole.
The per-rank model is the ordinary CausalLM built from `local_config` (H/N heads, Hkv/N KV heads, I/N
intermediate), with the communicating layers swapped in by `parallelize`. Its `config` therefore holds
the per-rank head counts, so a backend sizes its KV pool with num_kv_heads // N and needs no change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from minisgl.distributed.group import TPGroup
from minisgl.distributed.layers import RowParallelLinear, VocabParallelEmbedding, VocabParallelLogits
from minisgl.models.decoder import CausalLM
from minisgl.models.config import ModelConfig
from minisgl.models.weights import open_checkpoint
from minisgl.models.registry import get_model_class

_ROWS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # checkpoint names, split by output rows
_COLS = ("o_proj", "down_proj")  # split by input columns (weight only)
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def tp_shape_problems(config: ModelConfig, world: int) -> list[str]:
    """What keeps `config` from being split `world` ways (empty: it can be)."""
    sizes = {"attention heads": config.num_heads, "KV heads": config.num_kv_heads,
             "vocabulary size": config.vocab_size, "intermediate size": config.intermediate_size}
    return [f"{n} {what}" for what, n in sizes.items() if n % world]


def check_tp_shape(config: ModelConfig, world: int, model_name: str = "the model") -> None:
    if world < 1:
        raise ValueError(f"TP size must be at least 1, not {world}")
    problems = tp_shape_problems(config, world)
    if problems:
        works = [n for n in range(1, 17) if not tp_shape_problems(config, n)]
        raise ValueError(f"TP={world} cannot split {model_name}: its {', '.join(problems)} "
                         f"{'is' if len(problems) == 1 else 'are'} not divisible by {world} (TP must divide the "
                         f"attention heads, KV heads, vocabulary and intermediate size; TP sizes that work for "
                         f"it: {', '.join(map(str, works))})")


def local_config(config: ModelConfig, world: int) -> ModelConfig:
    """The config of one rank's share (head_dim and vocab_size stay whole: logits are gathered)."""
    return dataclasses.replace(config, num_heads=config.num_heads // world,
                               num_kv_heads=config.num_kv_heads // world,
                               intermediate_size=config.intermediate_size // world)


def shard_tensor(name: str, full: torch.Tensor, config: ModelConfig, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s part of the full tensor `name` (a checkpoint name like ...q_proj.weight, or one of
    our fused names ...qkv_proj.weight / ...gate_up_proj.weight). A view where possible."""
    def part(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim] // world
        return t.narrow(dim, rank * n, n)

    module_path, _, param = name.rpartition(".")
    module = module_path.rpartition(".")[2]
    if module == "qkv_proj":
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return torch.cat([part(t, 0) for t in full.split([q, kv, kv])])
    if module == "gate_up_proj":
        return torch.cat([part(t, 0) for t in full.split([config.intermediate_size] * 2)])
    if module in _ROWS or name in _VOCAB:
        return part(full, 0)
    if module in _COLS and param == "weight":
        return part(full, 1)
    return full


def parallelize(model: CausalLM, tp: TPGroup) -> CausalLM:
    """Swap in the communicating layers of a model built from local_config(config, tp.world). Call it
    on the meta device (then materialize) or on a real one (then fill the new parameters)."""
    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            old: nn.Linear = getattr(parent, name)
            new = RowParallelLinear(old.in_features, old.out_features, old.bias is not None, tp)
            setattr(parent, name, new.to(device=old.weight.device, dtype=old.weight.dtype))
    emb = model.model.embed_tokens
    vocab, dim = model.config.vocab_size, emb.embedding_dim
    n = vocab // tp.world
    model.model.embed_tokens = VocabParallelEmbedding(n, dim, tp.rank * n, tp).to(
        device=emb.weight.device, dtype=emb.weight.dtype)
    if model.lm_head is not None:
        head = model.lm_head
        model.lm_head = nn.Linear(dim, n, bias=False, device=head.weight.device, dtype=head.weight.dtype)
    model.logits_proj = VocabParallelLogits(model.lm_head_weight, tp)
    model.tp = tp  # type: ignore[assignment]  # a marker for backends: this model communicates
    return model


def build_local_model(config: ModelConfig, tp: TPGroup, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """Rank tp.rank's model with uninitialized parameters (built on meta: no full-size allocation)."""
    check_tp_shape(config, tp.world)
    with torch.device("meta"):
        model = get_model_class(config.architecture)(local_config(config, tp.world))
        parallelize(model, tp)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.init_buffers()
    model.full_config = config  # type: ignore[assignment]
    return model


@torch.no_grad()
def shard_model(full: CausalLM, tp: TPGroup) -> CausalLM:
    """Rank tp.rank's share of an already-built full model (a new model; `full` is left as it is)."""
    param = next(full.parameters())
    model = build_local_model(full.config, tp, param.device, param.dtype)
    ours = dict(model.named_parameters())
    for name, p in full.named_parameters():
        ours[name].copy_(shard_tensor(name, p, full.config, tp.rank, tp.world))
    return model.requires_grad_(False).eval()


@torch.no_grad()
def _init_dummy_shard(model: CausalLM, config: ModelConfig, tp: TPGroup, seed: int) -> None:
    """The same random weights as loader.init_dummy_weights gives the full model on this device (same
    order, shapes and generator), sliced: one full tensor in memory at a time."""
    with torch.device("meta"):
        full = get_model_class(config.architecture)(config)
    ours = dict(model.named_parameters())
    generator: torch.Generator | None = None
    for name, meta in full.named_parameters():
        target = ours[name]
        if name.endswith("norm.weight"):
            target.fill_(1.0)
        elif name.endswith(".bias"):
            target.zero_()
        else:
            if generator is None:
                generator = torch.Generator(device=target.device).manual_seed(seed)
            t = torch.empty(meta.shape, dtype=target.dtype, device=target.device).normal_(0.0, 0.02, generator=generator)
            target.copy_(shard_tensor(name, t, config, tp.rank, tp.world))


def load_sharded_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype | None, load_format: str,
                       seed: int, tp: TPGroup) -> CausalLM:
    """load_model for a TP rank: the same formats, each checkpoint tensor sliced as it streams by."""
    model_dir = Path(model_dir)
    _, config, tensors = open_checkpoint(model_dir, load_format)
    check_tp_shape(config, tp.world, model_dir.name)
    if dtype is None:
        dtype = config.torch_dtype if device.type == "cuda" else torch.float32
    model = build_local_model(config, tp, device, dtype)
    if tensors is None:
        _init_dummy_shard(model, config, tp, seed)
    else:
        model.load_weights((name, shard_tensor(name, t, config, tp.rank, tp.world)) for name, t in tensors)
    model.requires_grad_(False)
    return model.eval()
