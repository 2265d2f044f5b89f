"""Per-step cost of our model vs transformers' at batch 1: one prefill, then single-token decode steps,
both with a dense KV cache, on the same weights. Also times transformers' own `generate` per token.

    python -m bench.model_forward [--model-dir DIR] [--dtype float32] [--steps 64] [--prompt-len 32]

The model directory defaults to the fetched default model (SmolLM2-135M-Instruct).
`--random-from bench/configs/qwen3-0.6b` compares on a randomly initialized transformers model of that
config.json instead (saved to a temporary directory first): no weight download needed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from minisgl.models import CausalLM, load_model


class DenseKVContext:
    """One sequence with a contiguous KV buffer per layer: the simplest real decode context."""

    def __init__(self, model: CausalLM, max_len: int) -> None:
        cfg = model.config
        param = model.model.embed_tokens.weight
        shape = (cfg.num_layers, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.empty(shape, dtype=param.dtype, device=param.device)
        self.v = torch.empty(shape, dtype=param.dtype, device=param.device)
        self.start = 0  # tokens already cached before this step
        self.num_new = 0
        self.logits_indices = torch.tensor([0], device=param.device)

    def begin(self, num_new: int) -> None:
        self.num_new = num_new
        self.logits_indices = torch.tensor([num_new - 1], device=self.k.device)

    def begin_all(self, num_new: int) -> DenseKVContext:
        self.begin(num_new)
        return self

    def end(self) -> None:
        self.start += self.num_new

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        end = self.start + self.num_new
        self.k[layer_idx, self.start : end] = k
        self.v[layer_idx, self.start : end] = v
        keys = self.k[layer_idx, :end].transpose(0, 1).unsqueeze(0)
        values = self.v[layer_idx, :end].transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys,
            values,
            is_causal=self.start == 0 and self.num_new > 1,  # decode: one query sees every cached key
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.squeeze(0).transpose(0, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def bench_ours(model: CausalLM, prompt: torch.Tensor, steps: int) -> tuple[float, list[float]]:
    device = prompt.device
    ctx = DenseKVContext(model, len(prompt) + steps + 1)
    ctx.begin(len(prompt))
    t = time.perf_counter()
    logits = model(prompt, torch.arange(len(prompt), device=device), ctx)
    _sync(device)
    prefill_ms = (time.perf_counter() - t) * 1e3
    ctx.end()
    state = {"tok": logits.argmax(-1)}

    def step() -> None:
        ctx.begin(1)
        pos = torch.tensor([ctx.start], device=device)
        state["tok"] = model(state["tok"], pos, ctx).argmax(-1)
        ctx.end()

    return prefill_ms, time_steps(step, steps, device)


def bench_hf(hf: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[float, list[float]]:
    from transformers import DynamicCache

    device = prompt.device
    cache = DynamicCache(config=hf.config)
    t = time.perf_counter()
    out = hf(input_ids=prompt[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill_ms = (time.perf_counter() - t) * 1e3
    state = {"tok": out.logits[:, -1].argmax(-1, keepdim=True)}

    def step() -> None:
        out = hf(input_ids=state["tok"], past_key_values=cache, use_cache=True, logits_to_keep=1)
        state["tok"] = out.logits[:, -1].argmax(-1, keepdim=True)

    return prefill_ms, time_steps(step, steps, device)


def bench_hf_generate(hf: torch.nn.Module, prompt: torch.Tensor, steps: int) -> float:
    """ms per new token of a plain greedy `generate` (prefill included, amortized)."""
    device = prompt.device
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    t = time.perf_counter()
    hf.generate(prompt[None], **kwargs)
    _sync(device)
    return (time.perf_counter() - t) * 1e3 / steps


def summary(name: str, prefill_ms: float, times: list[float]) -> None:
    print(
        f"{name:<14} prefill {prefill_ms:7.1f} ms | decode median {statistics.median(times):6.2f} ms"
        f"  mean {statistics.mean(times):6.2f} ms  min {min(times):6.2f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--random-from", type=Path, default=None, help="dir with a config.json: random weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="alternate ours/transformers this many times")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values renamed in transformers 5.x
    model_dir = args.model_dir
    if args.random_from is not None:
        torch.manual_seed(0)
        config = transformers.AutoConfig.from_pretrained(args.random_from)
        model_dir = Path(tempfile.mkdtemp(prefix="minisgl-bench-"))
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    elif model_dir is None:
        from minisgl.assets.embedded import ensure_default_model

        model_dir = Path(ensure_default_model())
    ours = load_model(model_dir, device=device, dtype=dtype)
    dtype = ours.model.embed_tokens.weight.dtype
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    print(f"model {model_dir.name}, dtype {dtype}, attn {hf.config._attn_implementation}")
    prompt = torch.randint(0, ours.config.vocab_size, (args.prompt_len,), device=device)
    with torch.inference_mode():
        positions = torch.arange(len(prompt), device=device)
        got = ours(prompt, positions, DenseKVContext(ours, len(prompt)).begin_all(len(prompt)))
        want = hf(input_ids=prompt[None], logits_to_keep=1).logits[0].float()
        print(f"last-token logits max |ours - transformers| = {(got - want).abs().max().item():.3g}"
              f" (max |logit| {want.abs().max().item():.3g}), same argmax: {bool(got.argmax() == want.argmax())}")
        bench_ours(ours, prompt, 4)  # warm-up
        bench_hf(hf, prompt, 4)
        for _ in range(args.rounds):
            summary("ours", *bench_ours(ours, prompt, args.steps))
            summary("transformers", *bench_hf(hf, prompt, args.steps))
        print(f"{'hf generate':<14} {bench_hf_generate(hf, prompt, args.steps):6.2f} ms / token")


if __name__ == "__main__":
    main()
