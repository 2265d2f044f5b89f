"""Model config parsing and weight loading: safetensors (streamed), GGUF (dequantized), or dummy weights.

The model is first built on the meta device (no memory, no random init), materialized empty on the
target device in the target dtype, then filled. safetensors and dummy loading need no transformers
model class; GGUF goes through transformers' GGUF reader, which needs one for its name mapping.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from minisgl.models.decoder import CausalLM
from minisgl.models.layers import RopeScaling
from minisgl.models.registry import get_model_class

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
# GGUF files name a model_type, not an architecture.
_GGUF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias
    eos_token_ids: list[int]
    bos_token_id: int | None
    torch_dtype: torch.dtype
    rope_scaling: RopeScaling | None = None
    mlp_bias: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        """From a transformers config dict (config.json), plus generation_config.json for extra EOS ids."""
        arch = (d.get("architectures") or [None])[0]
        if arch is None:
            raise ValueError("config has no 'architectures' entry")
        get_model_class(arch)  # fail early, with the list of supported ones
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (only silu)")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        num_heads = d["num_attention_heads"]
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        dtype_name = d.get("torch_dtype") or d.get("dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False)),
            eos_token_ids=_eos_ids(d, generation or {}),
            bos_token_id=d.get("bos_token_id"),
            torch_dtype=_parse_dtype(dtype_name),
            rope_scaling=_parse_rope_scaling(rope),
            mlp_bias=bool(d.get("mlp_bias", False)),
        )


def _eos_ids(config: dict[str, Any], generation: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    for source in (config, generation):
        value = source.get("eos_token_id")
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def _parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def _parse_rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return RopeScaling("linear", factor=float(rope["factor"]))
    if rope_type == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, linear, llama3)")


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def load_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    generation_path = model_dir / "generation_config.json"
    generation = _read_json(generation_path) if generation_path.exists() else None
    return ModelConfig.from_dict(_read_json(model_dir / "config.json"), generation)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return [model_dir / f for f in sorted(set(_read_json(index)["weight_map"].values()))]
    return sorted(model_dir.glob("*.safetensors"))


def _gguf_file(model_dir: Path) -> Path:
    files = sorted(model_dir.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {model_dir}")
    if len(files) > 1:
        logger.warning("several .gguf files in %s; using %s", model_dir, files[0].name)
    return files[0]


def _resolve_format(model_dir: Path, load_format: str) -> str:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; choose one of {', '.join(LOAD_FORMATS)}")
    if load_format != "auto":
        return load_format
    if _safetensors_files(model_dir):
        return "safetensors"
    if any(model_dir.glob("*.gguf")):
        return "gguf"
    raise FileNotFoundError(f"no *.safetensors nor *.gguf weights in {model_dir}")


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Streams one tensor at a time, so peak host memory is one tensor, not the whole checkpoint."""
    from safetensors import safe_open

    files = _safetensors_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def read_gguf(path: Path, config_dir: Path | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Dequantizes a GGUF file with transformers' reader. Returns (transformers config dict, tensors by
    transformers name). The reader needs a model skeleton for its name mapping: it lives on the meta
    device (no memory). Its config comes from `config_dir`'s config.json when given, which saves parsing
    the file's metadata (seconds, for the tokenizer) twice."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if config_dir is not None:
        hf_config = AutoConfig.from_pretrained(config_dir)
    else:
        config_dict = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
        model_type = config_dict.pop("model_type")
        if model_type not in _GGUF_MODEL_TYPES:
            raise ValueError(f"unsupported GGUF model type {model_type!r}; supported: {', '.join(_GGUF_MODEL_TYPES)}")
        hf_config = AutoConfig.for_model(model_type, **config_dict)
        hf_config.architectures = [_GGUF_MODEL_TYPES[model_type]]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    return hf_config.to_dict(), tensors


@torch.no_grad()
def init_dummy_weights(model: CausalLM, seed: int = 0) -> None:
    """Random weights, reproducible for a seed and device: N(0, 0.02) like a fresh transformers model,
    norms 1 and biases 0 so activations keep a realistic scale."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            if param.device not in generators:
                generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.normal_(0.0, 0.02, generator=generators[param.device])


def build_empty_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """The model on `device` in `dtype` with uninitialized parameters (no wasted random init)."""
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.init_buffers()
    return model


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    load_format: str = "auto",
    seed: int = 0,
) -> CausalLM:
    """Loads a checkpoint directory. dtype None: the config's torch_dtype on CUDA, float32 elsewhere.
    load_format: auto (safetensors, else .gguf), safetensors, gguf, dummy (config.json only)."""
    model_dir = Path(model_dir)
    device = torch.device(device)
    from minisgl.distributed.group import get_tp

    tp = get_tp()
    if tp is not None and tp.world > 1:  # a tensor-parallel rank: load only its shard
        from minisgl.distributed.sharding import load_sharded_model

        return load_sharded_model(model_dir, device, dtype, load_format, seed, tp)
    fmt = _resolve_format(model_dir, load_format)
    gguf_tensors: dict[str, torch.Tensor] | None = None
    if fmt == "gguf":
        # A config.json next to the file is authoritative (it has generation EOS ids, the dtype, ...).
        has_config = (model_dir / "config.json").exists()
        gguf_config, gguf_tensors = read_gguf(_gguf_file(model_dir), model_dir if has_config else None)
        config = load_config(model_dir) if has_config else ModelConfig.from_dict(gguf_config)
    else:
        config = load_config(model_dir)
    if dtype is None:
        dtype = config.torch_dtype if device.type == "cuda" else torch.float32
    model = build_empty_model(config, device, dtype)
    if fmt == "dummy":
        init_dummy_weights(model, seed)
    elif fmt == "gguf":
        assert gguf_tensors is not None
        model.load_weights(gguf_tensors.items())
    else:
        model.load_weights(iter_safetensors(model_dir))
    model.requires_grad_(False)
    return model.eval()
