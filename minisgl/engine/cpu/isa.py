"""Which CPU path the `torch` backend runs, chosen once per process from what the CPU has.

    amx     linears and logits as packed bfloat16 oneDNN matmuls (cpu_linear.py), bfloat16 activations
            between them, the fused kernels around them (cpu_kernels.c built for avx512, else avx2)
    avx512  float32 activations; the linears and logits through the weight-streaming kernels of
            cpu_kernels.c for decode-sized batches (GGUF Q4_1 / Q8_0 blocks or bfloat16 weights, exact,
            in 16-row panels: float32 FMAs, or dot products on rounded inputs, vdpbf16ps where the CPU
            has AVX512-BF16, else int16 vpmaddwd / VNNI vpdpwssd: MINISGL_CPU_DOT, weights.py), oneDNN's
            float32 GEMM for prompt chunks; the fused kernels between, a decode step's layers in one call
    avx2    the same, built for AVX2 + FMA (256-bit vectors)
    torch   the model's own float32 torch ops (any CPU, no compiler needed)

The default is the first of amx, avx512, avx2 that the CPU supports, else torch. MINISGL_CPU_ISA
forces one (to test or benchmark each path on one machine); a forced ISA the CPU lacks falls back to
the best one it has, with a warning: code built for missing instructions would crash, not slow down.
AMX itself is oneDNN's business, so `amx` can be forced on any x86 CPU with AVX2 (oneDNN then runs the
same bfloat16 matmuls without AMX tiles, slower; ONEDNN_MAX_CPU_ISA limits what oneDNN uses).
"""

from __future__ import annotations

import logging
import os
import platform
from functools import lru_cache
from pathlib import Path

import torch

from minisgl.engine.cpu.linear import cpu_has_amx as has_amx

log = logging.getLogger("minisgl.engine")

ISAS = ("amx", "avx512", "avx2", "torch")
# /proc/cpuinfo flags each kernel build needs (its compiler flags, cpu_kernels.ISA_FLAGS)
_NEEDS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them; empty elsewhere (no vector build is then used)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def kernel_isa() -> str | None:
    """The widest kernel build this CPU runs: avx512, avx2, or None (not x86, or too old)."""
    flags = cpu_flags()
    for isa in ("avx512", "avx2"):
        if _NEEDS[isa] <= flags:
            return isa
    return None


def supported() -> list[str]:
    """Every path this CPU can run, best first (amx only where the CPU has AMX tiles)."""
    out = ["amx"] if has_amx() and kernel_isa() else []
    kernel = kernel_isa()
    if kernel == "avx512":
        out += ["avx512", "avx2"]
    elif kernel == "avx2":
        out.append("avx2")
    return out + ["torch"]


def _can_force(isa: str) -> bool:
    if isa == "amx":  # oneDNN's bfloat16 matmuls run on any AVX2+ CPU, with AMX or not
        return kernel_isa() is not None and torch.backends.mkldnn.is_available()
    return isa in supported()


@lru_cache(maxsize=None)
def choose(requested: str | None = None) -> str:
    """The path to run: `requested` (else MINISGL_CPU_ISA) when this CPU can, else the best it has.
    Logged once per process and choice."""
    want = (requested or os.environ.get("MINISGL_CPU_ISA", "")).strip().lower()
    best = supported()[0]
    if not want or want == "auto":
        isa, why = best, "the best this CPU has"
    elif want not in ISAS:
        raise ValueError(f"MINISGL_CPU_ISA={want!r}: choose one of auto, {', '.join(ISAS)}")
    elif _can_force(want):
        isa, why = want, "forced by MINISGL_CPU_ISA" if not requested else "asked for"
    else:
        log.warning("CPU path %s asked for, but this CPU lacks it (it has: %s): using %s", want,
                    ", ".join(supported()), best)
        isa, why = best, f"{want} unavailable"
    log.info("CPU path: %s (%s; this CPU supports %s)", isa, why, ", ".join(supported()))
    return isa
