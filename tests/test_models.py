"""Our model code against transformers on the same weights: tiny random models of each family, the real
default model, GGUF vs safetensors, dummy weights, and the registry's errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from minisgl.assets.checkpoint import eos_token_ids
from minisgl.models import DenseContext, get_model_class, load_config, load_model
from minisgl.models.decoder import CausalLM

QWEN3_0_6B = Path(__file__).resolve().parents[1] / "bench" / "configs" / "qwen3-0.6b"

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)

# (name, config class, extra config kwargs)
FAMILIES: list[tuple[str, type, dict[str, Any]]] = [
    ("llama-tied", transformers.LlamaConfig, dict(tie_word_embeddings=True, rope_theta=10000.0)),
    (
        "llama3-rope-untied",
        transformers.LlamaConfig,
        dict(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    ("qwen2-untied", transformers.Qwen2Config, dict(tie_word_embeddings=False, rope_theta=1000000.0)),
    ("qwen3-tied", transformers.Qwen3Config, dict(tie_word_embeddings=True, head_dim=32, rope_theta=1000000.0)),
    ("qwen3-untied-bias", transformers.Qwen3Config, dict(tie_word_embeddings=False, head_dim=16, attention_bias=True)),
]


def _randomize_norms_and_biases(model: torch.nn.Module) -> None:
    # transformers inits norms to 1 and biases to 0, which would hide a missing norm or bias.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + noise)
            elif name.endswith(".bias"):
                p.copy_(noise)


def _hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids[None]).logits[0].float()


def _our_logits(model: CausalLM, ids: torch.Tensor, all_logits: bool = True) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, torch.arange(len(ids)), DenseContext(len(ids), all_logits=all_logits))


@pytest.mark.parametrize("name,config_cls,extra", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_tiny_model_matches_transformers(tmp_path: Path, name: str, config_cls: type, extra: dict[str, Any]) -> None:
    torch.manual_seed(0)
    hf_config = config_cls(**TINY, **extra)
    hf_config.architectures = [config_cls.__name__.replace("Config", "ForCausalLM")]
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    _randomize_norms_and_biases(hf)
    sharded = name == "qwen2-untied"  # also covers model.safetensors.index.json
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded

    ours = load_model(tmp_path)
    assert type(ours).__name__ == hf_config.architectures[0]
    assert ours.config.tie_word_embeddings == extra["tie_word_embeddings"]
    ids = torch.randint(0, TINY["vocab_size"], (40,), generator=torch.Generator().manual_seed(2))
    expected = _hf_logits(hf, ids)
    got = _our_logits(ours, ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    # last-token-only logits are the same row
    last = _our_logits(ours, ids, all_logits=False)
    assert last.shape == (1, TINY["vocab_size"])
    assert torch.allclose(last[0], got[-1], atol=1e-5)


def test_flattened_batch_of_two_sequences(tmp_path: Path) -> None:
    """Two sequences packed in one [T] batch, with their own positions, give each sequence's logits."""
    torch.manual_seed(0)
    hf_config = transformers.Qwen3Config(**TINY, head_dim=16)
    hf_config.architectures = ["Qwen3ForCausalLM"]
    transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    a, b = torch.randint(0, 256, (7,)), torch.randint(0, 256, (5,))

    class TwoSeqContext:
        logits_indices = torch.tensor([6, 11])

        def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            first = DenseContext(7).attention(layer_idx, q[:7], k[:7], v[:7])
            second = DenseContext(5).attention(layer_idx, q[7:], k[7:], v[7:])
            return torch.cat([first, second])

    with torch.inference_mode():
        both = model(torch.cat([a, b]), torch.cat([torch.arange(7), torch.arange(5)]), TwoSeqContext())
    assert torch.allclose(both[0], _our_logits(model, a)[-1], atol=1e-5)
    assert torch.allclose(both[1], _our_logits(model, b)[-1], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu_fp32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf_config = transformers.Qwen3Config(**TINY, head_dim=16)
    hf_config.architectures = ["Qwen3ForCausalLM"]
    transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (20,))
    cpu = _our_logits(load_model(tmp_path), ids)
    gpu_model = load_model(tmp_path, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ctx = DenseContext(len(ids))
        ctx.logits_indices = ctx.logits_indices.cuda()
        gpu = gpu_model(ids.cuda(), torch.arange(len(ids), device="cuda"), ctx)
    assert gpu.dtype == torch.float32 and gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max().item() < 0.05 * cpu.abs().max().item()


def test_missing_tensor_is_an_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    hf_config = transformers.LlamaConfig(**TINY)
    hf_config.architectures = ["LlamaForCausalLM"]
    transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="qkv_proj"):
        load_model(tmp_path)


def _write_qwen3_config(tmp_path: Path) -> Path:
    """The real Qwen3-0.6B config.json, shrunk."""
    cfg = json.loads((QWEN3_0_6B / "config.json").read_text())
    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg.update(num_hidden_layers=2, vocab_size=512, **small)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_dummy_load_is_deterministic_and_needs_no_weights(tmp_path: Path) -> None:
    model_dir = _write_qwen3_config(tmp_path)
    a, b = load_model(model_dir, load_format="dummy"), load_model(model_dir, load_format="dummy")
    c = load_model(model_dir, load_format="dummy", seed=1)
    ids = torch.randint(0, 512, (9,))
    la, lb, lc = _our_logits(a, ids), _our_logits(b, ids), _our_logits(c, ids)
    assert torch.equal(la, lb)
    assert not torch.equal(la, lc)
    assert torch.isfinite(la).all()
    assert torch.all(a.model.norm.weight == 1)
    assert 0.015 < a.model.embed_tokens.weight.std().item() < 0.025
    with pytest.raises(FileNotFoundError):
        load_model(model_dir)  # auto: no weight file


def test_dummy_bf16(tmp_path: Path) -> None:
    model = load_model(_write_qwen3_config(tmp_path), load_format="dummy", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    logits = _our_logits(model, torch.arange(6))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_qwen3_0_6b_config() -> None:
    cfg = load_config(QWEN3_0_6B)
    assert cfg.architecture == "Qwen3ForCausalLM"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (28, 1024, 16, 8, 128)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == (3072, 151936, 40960)
    assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-6 and cfg.tie_word_embeddings
    assert cfg.torch_dtype == torch.bfloat16 and not cfg.attention_bias
    assert 151645 in eos_token_ids(QWEN3_0_6B)


def test_rope_parameters_as_transformers5_writes_them(tmp_path: Path) -> None:
    cfg = json.loads((QWEN3_0_6B / "config.json").read_text())
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_config(tmp_path).rope_theta == 5e5
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="yarn"):
        load_config(tmp_path)


def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        get_model_class("GPT2LMHeadModel")


def test_unknown_architecture_in_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ValueError, match="MambaForCausalLM"):
        load_model(tmp_path, load_format="dummy")


# --- the real default model (SmolLM2-135M-Instruct), fetched by minisgl.assets.embedded ---


@pytest.fixture(scope="module")
def default_model_dir() -> Path:
    fetch = pytest.importorskip("minisgl.assets.embedded")
    try:
        return Path(fetch.ensure_default_model())
    except Exception as e:  # no network and no cache
        pytest.skip(f"default model unavailable: {e}")


PROMPT = "The capital of France is Paris. The capital of Germany is"


def test_default_model_matches_transformers(default_model_dir: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    ids = torch.tensor(tok(PROMPT)["input_ids"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    ours = load_model(default_model_dir, load_format="safetensors")
    expected, got = _hf_logits(hf, ids), _our_logits(ours, ids)
    assert (got - expected).abs().max().item() < 1e-3  # logits of magnitude ~20 over 30 layers
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_gguf_matches_safetensors(default_model_dir: Path) -> None:
    if not any(default_model_dir.glob("*.gguf")):
        pytest.skip("no .gguf file next to the default model")
    ids = torch.tensor([1, 504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4797, 314])
    from_st = _our_logits(load_model(default_model_dir, load_format="safetensors"), ids)
    from_gguf = _our_logits(load_model(default_model_dir, load_format="gguf"), ids)
    assert (from_st - from_gguf).abs().max().item() < 1e-3
