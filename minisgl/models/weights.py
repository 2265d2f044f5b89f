"""Reading a checkpoint's tensors: safetensors (streamed one tensor at a time) or GGUF (dequantized by
transformers' reader), and `open_checkpoint`, the one place that decides which, for the plain and the
tensor-parallel loader alike."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from minisgl.assets.checkpoint import read_json
from minisgl.models.config import ModelConfig
from minisgl.models.registry import get_model_class

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
# GGUF files name a model_type, not an architecture.
_GGUF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """A checkpoint's ModelConfig; an architecture we do not run fails first, with the list of ours."""
    arch = (d.get("architectures") or [None])[0]
    if arch is not None:
        get_model_class(arch)
    return ModelConfig.from_dict(d)


def load_config(model_dir: str | Path) -> ModelConfig:
    return config_from_dict(read_json(Path(model_dir) / "config.json"))


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return [model_dir / f for f in sorted(set(read_json(index)["weight_map"].values()))]
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


def open_checkpoint(model_dir: Path, load_format: str
                    ) -> tuple[str, ModelConfig, Iterable[tuple[str, torch.Tensor]] | None]:
    """(format, config, tensors): tensors None for dummy weights. A config.json next to a GGUF file is
    authoritative (it has the dtype, ...); without one the GGUF's own metadata gives the config."""
    fmt = _resolve_format(model_dir, load_format)
    if fmt == "dummy":
        return fmt, load_config(model_dir), None
    if fmt == "gguf":
        has_config = (model_dir / "config.json").exists()
        gguf_config, tensors = read_gguf(_gguf_file(model_dir), model_dir if has_config else None)
        config = load_config(model_dir) if has_config else config_from_dict(gguf_config)
        return fmt, config, tensors.items()
    return fmt, load_config(model_dir), iter_safetensors(model_dir)
