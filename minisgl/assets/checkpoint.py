"""What every process reads from a checkpoint folder's JSON files, in one place and without torch: the
EOS ids (the tokenizer adds them to each request) and the context window (the tokenizer refuses longer
prompts; the engine is sized to it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_CONTEXT = 4096  # a config.json without max_position_embeddings


def read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _optional_json(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}


def context_length(model_dir: str | Path, max_model_len: int = 0) -> int:
    """Prompt + completion tokens of one request at most: MAX_MODEL_LEN when set, else the model's own."""
    if max_model_len > 0:
        return max_model_len
    return int(read_json(Path(model_dir) / "config.json").get("max_position_embeddings", DEFAULT_CONTEXT))


def eos_token_ids(model_dir: str | Path, tokenizer_eos: int | None = None) -> list[int]:
    """The model's EOS ids: config.json's and generation_config.json's (either may list several), and the
    tokenizer's own."""
    model_dir = Path(model_dir)
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        value = _optional_json(model_dir / name).get("eos_token_id")
        ids.update(int(i) for i in (value if isinstance(value, list) else [value]) if i is not None)
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return sorted(ids)
