"""A servable model directory for dummy (random) weights: a config.json of any shape plus the embedded
model's tokenizer, so a whole server tree (tokenizer process included) can run a shape we have no
checkpoint of (`--load-format dummy`). Used by tests/test_tp.py and bench/multi_gpu.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# Qwen3 with every count divisible by 2 (and by 4 for heads): the smallest shape that TP=2 can split.
TINY_QWEN3: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49152, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False, "attention_bias": False,
    "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
}


def make_dummy_model_dir(out: Path, config: dict[str, Any] | Path, tokenizer_dir: Path) -> Path:
    """out/config.json from `config` (a dict, or a directory holding config.json and maybe
    generation_config.json) and the tokenizer files of `tokenizer_dir`. The config's vocabulary must
    cover the tokenizer's ids."""
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(config, Path):
        shutil.copy(config / "config.json", out / "config.json")
        if (config / "generation_config.json").exists():
            shutil.copy(config / "generation_config.json", out / "generation_config.json")
    else:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out
