"""The 121 matmuls of one CPU decode step (SmolLM2-135M shapes: 30 x qkv, o, gate_up, down + the tied
logits head), each weight format of cpu_kernels.c at batch 1 / 4 / 8 / 16, in-process.

Thirty distinct random copies of each layer shape, so nothing stays in cache between calls, as in a real
step. Prints the min over --reps of each shape's 30 calls and saves JSON under bench/results/.

    python bench/cpu_matmuls.py                      # q4_1 (+ q8_0 head): dot kernels, FMA kernels, row kernels
    python bench/cpu_matmuls.py --isa avx2 --formats q4_1f,q4_1

A format's suffix picks the kernel: p = the bfloat16 dot kernels over the panels (AVX512-BF16 only),
f = the float32 FMA kernels over the same panels, none = the row kernels (gemm_<fmt>).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` and `minisgl` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, command_line, machine_info

LAYER = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
HEAD = (49152, 576)


def random_weight(fmt: str, n: int, k: int, g):  # type: ignore[no-untyped-def]
    import torch

    from minisgl.engine.cpu.kernels import weight_row_bytes

    if fmt == "bf16":
        return torch.randn(n, k, generator=g).bfloat16().view(torch.uint8).reshape(n, -1).contiguous()
    block = weight_row_bytes(fmt, 32)
    w = torch.randint(0, 256, (n, k // 32, block), dtype=torch.uint8, generator=g)
    w[:, :, 0:2] = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).half().view(torch.uint8).reshape(n, -1, 2)
    if fmt == "q4_1":
        w[:, :, 2:4] = (-torch.rand(n, k // 32, generator=g) * 0.1).half().view(torch.uint8).reshape(n, -1, 2)
    return w.reshape(n, -1).contiguous()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default="q4_1p,q4_1f,q4_1", help="layer formats (the head is q8_0 alongside "
                   "q4_1, with the same suffix); suffix p = dot kernels, f = FMA kernels over the panels")
    p.add_argument("--isa", default=None, help="kernel build: avx512 or avx2 [what this CPU runs]")
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    import torch

    from minisgl.engine.cpu.kernels import PANEL_FORMATS, load_cpu_kernels

    kernels = load_cpu_kernels(args.isa)
    if kernels is None:
        raise SystemExit("[cpu_matmuls] no kernel build for this CPU")
    g = torch.Generator().manual_seed(0)
    result: dict = {"command": command_line(), "machine": machine_info(), "threads": torch.get_num_threads(),
                    "isa": kernels.isa, "ms": {}}
    for fmt in [f for f in args.formats.split(",") if f]:
        dot, fma = fmt.endswith("p"), fmt.endswith("f")
        base = fmt[:-1] if dot or fma else fmt
        if dot and not kernels.can_dot:
            print(f"[cpu_matmuls] skipping {fmt}: no AVX512-BF16 dot kernels here")
            continue
        head_fmt = "q8_0" if base == "q4_1" else base
        shapes = {**{name: (base, n, k, 30) for name, (n, k) in LAYER.items()}, "logits": (head_fmt, *HEAD, 1)}
        weights = {}
        for name, (f, n, k, copies) in shapes.items():
            ws = [random_weight(f, n, k, g) for _ in range(copies)]
            weights[name] = [kernels.pack_panels(f, w, k) for w in ws] if dot or fma else ws
        for b in [int(x) for x in args.batches.split(",") if x]:
            parts = {}
            for name, (f, n, k, _) in shapes.items():
                x, out = torch.randn(b, k), torch.empty(b, n)
                kind = "gemm_dot_" if dot else "gemm_fma_" if fma else "gemm_"
                fn = getattr(kernels.raw, kind + (PANEL_FORMATS[f] if dot or fma else f))
                times = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    for w in weights[name]:
                        fn(w.data_ptr(), x.data_ptr(), out.data_ptr(), None, b, k, n)
                    times.append((time.perf_counter() - t) * 1e3)
                parts[name] = min(times)
            result["ms"].setdefault(fmt, {})[str(b)] = parts
            print(f"{fmt:6s} batch {b:2d}: {sum(parts.values()):6.2f} ms  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in parts.items()), flush=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cpu_matmuls_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"[cpu_matmuls] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
