"""Offline engine benchmark: token ids in, token ids out, no HTTP, no processes.

The workload of nano-vllm's and mini-sglang's bench: 256 sequences with input and output lengths
uniform in [100, 1024], random token ids, ignore_eos (so every sequence decodes exactly its output
length). All requests are queued at once and the engine runs until it has nothing left to do.

    python bench/offline.py                                      # Qwen3-0.6B, dummy weights, default backend
    python bench/offline.py --model-dir default --num-seqs 16 --max-input 256 --max-output 128   # CPU-sized
    python bench/offline.py --backend hf --model-dir default --num-seqs 8     # the HF baseline, same loop

It reports output tokens/s (nano-vllm's number), total tokens/s, and, where the device's memory
bandwidth is known, the fraction of the memory-bandwidth roofline that the run reached (see
`roofline_step_bytes`). Results are saved as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` and `minisgl` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO_ROOT, RESULTS_DIR, command_line, machine_info

DEFAULT_CONFIG_DIR = REPO_ROOT / "bench" / "configs" / "qwen3-0.6b"

# Peak HBM bandwidth in GB/s (vendor figures), matched in order against the device name.
BANDWIDTH_GBS: list[tuple[str, float | None]] = [
    ("GH200", None),  # several memory variants; pass --bandwidth-gbs
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIE", 2000.0),
    ("H100", 3350.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 2000.0),
]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    inputs: list[list[int]]
    output_lens: list[int]

    @property
    def input_tokens(self) -> int:
        return sum(len(x) for x in self.inputs)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(num_seqs: int, min_input: int, max_input: int, min_output: int, max_output: int,
                  seed: int, vocab_size: int) -> Workload:
    """Random ids below min(vocab, 10000) as nano-vllm does (no special tokens, any model)."""
    if not (1 <= min_input <= max_input and 1 <= min_output <= max_output and num_seqs >= 1):
        raise ValueError("need 1 <= min <= max for input and output lengths, and --num-seqs >= 1")
    rng = random.Random(seed)
    top = min(vocab_size, 10000) - 1
    inputs = [[rng.randint(0, top) for _ in range(rng.randint(min_input, max_input))] for _ in range(num_seqs)]
    outputs = [rng.randint(min_output, max_output) for _ in range(num_seqs)]
    return Workload(inputs, outputs)


# ---------------------------------------------------------------- roofline


def decode_weight_params(cfg: Any) -> int:
    """Parameters one decode step must read: all of them, counted on a meta-device model (no memory),
    except the input embedding, which is only gathered for the batch's rows. A tied lm_head *is* the
    embedding matrix and is read in full, so then the embedding counts (once)."""
    import torch

    from minisgl.models.registry import get_model_class

    with torch.device("meta"):
        model = get_model_class(cfg.architecture)(cfg)
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors are listed once
    embed = model.model.embed_tokens.weight.numel()
    return total if cfg.tie_word_embeddings else total - embed


def kv_bytes_per_token(cfg: Any, dtype_bytes: int) -> int:
    """K and V, every layer, every KV head."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def roofline_step_bytes(weight_bytes: int, kv_token_bytes: int, context_tokens: int) -> int:
    """Bytes a decode step must move from memory at the least.

    A decode step is memory-bound: however many sequences are batched, the weights are streamed from
    memory once (weight_bytes), and each sequence reads the K/V of every token in its context
    (context_tokens summed over the batch, times kv_token_bytes). A perfect engine would take
    bytes / bandwidth seconds for the step; the roofline fraction of a run is
    sum over steps of (bytes / bandwidth) divided by the measured time. It ignores prefill compute and
    activations, so the ideal time is a lower bound on the step's real time and the fraction stays below 1.
    """
    return weight_bytes + kv_token_bytes * context_tokens


def device_bandwidth_gbs(device_name: str) -> float | None:
    upper = device_name.upper()
    for key, gbs in BANDWIDTH_GBS:
        if key in upper:
            return gbs
    return None


# ---------------------------------------------------------------- running


@dataclass
class RunStats:
    """What the step loop saw: per-step times and the roofline bytes of each step."""

    elapsed_s: float = 0.0
    steps: int = 0
    output_tokens: int = 0
    step_bytes: list[int] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    decode_only: list[bool] = field(default_factory=list)
    finish_reasons: dict[str, int] = field(default_factory=dict)
    completion_tokens: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def run_workload(backend: Any, work: Workload, prefix: str, weight_bytes: int, kv_token_bytes: int) -> RunStats:
    """Queue every sequence, then step until the engine is idle; time it all."""
    from minisgl.messages import SamplingParams, TokenizedReq

    stats = RunStats()
    input_len: dict[str, int] = {}
    generated: dict[str, int] = {}
    t0 = time.perf_counter()
    for i, (ids, out_len) in enumerate(zip(work.inputs, work.output_lens)):
        rid = f"{prefix}-{i}"
        input_len[rid], generated[rid] = len(ids), 0
        params = SamplingParams(max_new_tokens=out_len, temperature=0.0, ignore_eos=True)
        backend.add_request(TokenizedReq(rid=rid, input_ids=ids, params=params, arrival=time.time()))
    while backend.has_work():
        s0 = time.perf_counter()
        out = backend.step()
        stats.step_times.append(time.perf_counter() - s0)
        record_step(stats, out.outputs, input_len, generated, weight_bytes, kv_token_bytes)
    stats.elapsed_s = time.perf_counter() - t0
    stats.steps = len(stats.step_times)
    return stats


def record_step(stats: RunStats, outputs: list[Any], input_len: dict[str, int], generated: dict[str, int],
                weight_bytes: int, kv_token_bytes: int) -> None:
    """Count tokens and the step's roofline bytes; a step whose every output continues a sequence that
    already had tokens counts as decode-only (a prefill chunk that emits nothing can still hide in it)."""
    context = 0
    continuing = True
    for o in outputs:
        if o.token_ids:
            context += input_len.get(o.rid, 0) + generated.get(o.rid, 0)
            continuing = continuing and generated.get(o.rid, 0) > 0
            generated[o.rid] = generated.get(o.rid, 0) + len(o.token_ids)
            stats.output_tokens += len(o.token_ids)
        if o.finish_reason:
            stats.finish_reasons[o.finish_reason] = stats.finish_reasons.get(o.finish_reason, 0) + 1
            stats.completion_tokens[o.rid] = o.completion_tokens
            if o.error:
                stats.errors.append(f"{o.rid}: {o.error}")
    stats.step_bytes.append(roofline_step_bytes(weight_bytes, kv_token_bytes, context))
    stats.decode_only.append(bool(outputs) and continuing)


def roofline_fraction(stats: RunStats, bandwidth_gbs: float | None) -> dict[str, float | None]:
    if not bandwidth_gbs:
        return {"all_steps": None, "decode_steps": None}
    bw = bandwidth_gbs * 1e9
    ideal = sum(stats.step_bytes) / bw
    dec_ideal = sum(b for b, d in zip(stats.step_bytes, stats.decode_only) if d) / bw
    dec_time = sum(t for t, d in zip(stats.step_times, stats.decode_only) if d)
    return {"all_steps": ideal / stats.elapsed_s if stats.elapsed_s else None,
            "decode_steps": dec_ideal / dec_time if dec_time else None}


# ---------------------------------------------------------------- setup


def resolve_model(args: argparse.Namespace) -> tuple[Path, str]:
    """(checkpoint dir, load format): --model-dir (or 'default') wins; else --config with dummy weights."""
    if args.model_dir:
        if args.model_dir == "default":
            from minisgl.assets.embedded import ensure_default_model

            return ensure_default_model(), args.load_format or "auto"
        return Path(args.model_dir), args.load_format or "auto"
    return Path(args.config), args.load_format or "dummy"


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    from bench.common import cpu_model

    return cpu_model()


def weight_dtype_bytes(backend: Any, requested: str, model_dtype: Any, device: str) -> int:
    """Bytes per weight element: what the loaded model actually holds, where we can see it."""
    import torch

    for holder in (backend, getattr(backend, "engine", None), getattr(backend, "runner", None)):
        model = getattr(holder, "model", None)
        if isinstance(model, torch.nn.Module):
            param = next(model.parameters(), None)
            if param is not None:
                return param.element_size()
        dtype = getattr(holder, "dtype", None)
        if isinstance(dtype, torch.dtype):
            return torch.empty((), dtype=dtype).element_size()
    if requested in DTYPE_BYTES:
        return DTYPE_BYTES[requested]
    # "auto" as the backends read it: float32 on CPU, the checkpoint's dtype elsewhere
    return 4 if device == "cpu" else torch.empty((), dtype=model_dtype).element_size()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--min-input", type=int, default=100)
    p.add_argument("--max-input", type=int, default=1024)
    p.add_argument("--min-output", type=int, default=100)
    p.add_argument("--max-output", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", help="torch | sgl | mlx | hf (auto: sgl on CUDA, else torch)")
    p.add_argument("--model-dir", default=None, help="checkpoint directory, or 'default' for the embedded model")
    p.add_argument("--config", default=str(DEFAULT_CONFIG_DIR),
                   help="directory with a config.json, used with dummy weights when --model-dir is not given")
    p.add_argument("--load-format", default=None, help="auto | safetensors | gguf | dummy")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--max-running", type=int, default=256, help="sequences decoded together at most")
    p.add_argument("--kv-cache-tokens", type=int, default=0, help="KV pool size in tokens (0: from memory)")
    p.add_argument("--chunk-size", type=int, default=0,
                   help="prefill tokens per step (0: the server's default, 8192 for sgl on CUDA, else 512)")
    p.add_argument("--warmup-seqs", type=int, default=2, help="short untimed sequences run first")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="device memory bandwidth in GB/s for the roofline (default: from a table of GPUs)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--tag", default="", help="added to the result file name")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from minisgl.backend_registry import default_backend_name
    from minisgl.backends.base import BackendConfig, create_backend
    from minisgl.models.weights import load_config

    model_dir, load_format = resolve_model(args)
    cfg = load_config(model_dir)
    device = resolve_device(args.device)
    backend_name = default_backend_name() if args.backend == "auto" else args.backend
    work = make_workload(args.num_seqs, args.min_input, args.max_input, args.min_output, args.max_output,
                         args.seed, cfg.vocab_size)
    print(f"[offline] {backend_name} on {device}: {model_dir} ({load_format}); {args.num_seqs} seqs, "
          f"{work.input_tokens} input and {work.output_tokens} output tokens", file=sys.stderr)
    if not args.chunk_size:
        from minisgl.config import GPU_CHUNK_SIZE, ServerConfig

        args.chunk_size = GPU_CHUNK_SIZE if backend_name == "sgl" else ServerConfig().chunk_size
    t0 = time.perf_counter()
    backend = create_backend(backend_name, BackendConfig(
        model_path=str(model_dir), device=device, dtype=args.dtype, load_format=load_format,
        max_running=args.max_running, kv_cache_tokens=args.kv_cache_tokens, chunk_size=args.chunk_size,
        seed=args.seed))
    load_s = time.perf_counter() - t0
    try:
        result = benchmark(backend, work, args, cfg, device, backend_name, model_dir, load_format, load_s)
    finally:
        backend.shutdown()
    path = save(result, Path(args.out_dir), args.tag)
    print_summary(result, path)
    return 0 if result["ok"] else 1


def benchmark(backend: Any, work: Workload, args: argparse.Namespace, cfg: Any, device: str, backend_name: str,
              model_dir: Path, load_format: str, load_s: float) -> dict[str, Any]:
    dtype_bytes = weight_dtype_bytes(backend, args.dtype, cfg.torch_dtype, device)
    weight_bytes = decode_weight_params(cfg) * dtype_bytes
    kv_tok = kv_bytes_per_token(cfg, dtype_bytes)
    if args.warmup_seqs > 0:
        warm = make_workload(args.warmup_seqs, 16, 32, 4, 8, args.seed + 1, cfg.vocab_size)
        run_workload(backend, warm, "warmup", weight_bytes, kv_tok)
    stats = run_workload(backend, work, "seq", weight_bytes, kv_tok)
    name = device_name(device)
    bandwidth = args.bandwidth_gbs or (device_bandwidth_gbs(name) if device.startswith("cuda") else None)
    counted = sum(stats.completion_tokens.values())
    ok = counted == work.output_tokens and stats.output_tokens == work.output_tokens and not stats.errors
    return {
        "schema": 1, "kind": "offline", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command_line(), "machine": machine_info(), "device": device, "device_name": name,
        "backend": backend_name, "model_dir": str(model_dir), "architecture": cfg.architecture,
        "load_format": load_format, "dtype_bytes": dtype_bytes, "load_s": load_s,
        "workload": {"num_seqs": args.num_seqs, "input": [args.min_input, args.max_input],
                     "output": [args.min_output, args.max_output], "seed": args.seed,
                     "input_tokens": work.input_tokens, "output_tokens": work.output_tokens},
        "ok": ok, "errors": stats.errors[:10], "finish_reasons": stats.finish_reasons,
        "elapsed_s": stats.elapsed_s, "steps": stats.steps,
        "output_tokens": stats.output_tokens, "completion_tokens_reported": counted,
        "output_tok_s": stats.output_tokens / stats.elapsed_s,
        "total_tok_s": (work.input_tokens + stats.output_tokens) / stats.elapsed_s,
        "roofline": {"bandwidth_gbs": bandwidth, "decode_weight_bytes": weight_bytes,
                     "kv_bytes_per_token": kv_tok, "decode_steps": sum(stats.decode_only),
                     "fraction": roofline_fraction(stats, bandwidth)},
    }


def save(result: dict[str, Any], out_dir: Path, tag: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"offline_{time.strftime('%Y%m%d-%H%M%S')}" + (f"_{tag}" if tag else "")
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def print_summary(r: dict[str, Any], path: Path) -> None:
    w = r["workload"]
    print(f"backend {r['backend']} on {r['device_name']} ({r['device']}), {r['architecture']} from {r['model_dir']}")
    print(f"Total: {w['output_tokens']}tok, Time: {r['elapsed_s']:.2f}s, Throughput: {r['output_tok_s']:.2f}tok/s "
          f"(input+output: {r['total_tok_s']:.2f}tok/s, {r['steps']} steps)")
    frac = r["roofline"]["fraction"]
    if r["roofline"]["bandwidth_gbs"]:
        print(f"memory-bandwidth roofline at {r['roofline']['bandwidth_gbs']:.0f} GB/s: "
              f"{100 * frac['all_steps']:.1f}% over all steps"
              + (f", {100 * frac['decode_steps']:.1f}% over decode-only steps" if frac["decode_steps"] else ""))
    else:
        print("roofline: device bandwidth unknown (pass --bandwidth-gbs)")
    if not r["ok"]:
        print(f"WARNING: token counts or finish reasons are off: {r['errors'] or r['finish_reasons']}")
    print(f"saved {path}")


if __name__ == "__main__":
    sys.exit(main())
