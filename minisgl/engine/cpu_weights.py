"""Weights for the weight-streaming kernels of cpu_kernels.c (the `avx512` / `avx2` CPU paths).

A decode step reads every weight once for a few rows, so it runs at the speed of the weight stream.
Each linear (and the logits projection) gets the most compact format that gives the model's own
float32 weights:

    q4_1 / q8_0   the GGUF's own blocks, where the checkpoint folder holds the GGUF the float32
                  weights were dequantized from (the embedded SmolLM2: Q4_1 layers, a Q8_0 embedding
                  that is also the tied logits head; ~96 MB per step instead of 540 MB). Each weight
                  row is matched to a GGUF row by content and the whole matrix is checked to
                  dequantize to exactly the model's float32 weight, so a permutation the GGUF reader
                  applied (Llama's q/k) or a GGUF from another model can never slip through.
    bf16          where the weight is exactly bfloat16-representable (a bfloat16 checkpoint loaded in
                  float32), or, with dtype auto, for any weight (rounded, as the amx path rounds);
    f32           otherwise (dtype float32 keeps every weight exact).

MINISGL_CPU_WEIGHTS=auto|bf16|f32 overrides the choice (bf16: round every weight, GGUF or not).
Prompt chunks (more than MAX_KERNEL_ROWS rows) go to torch's float32 GEMM on the model's own weight.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minisgl.engine.cpu_kernels import CpuKernels, weight_row_bytes

log = logging.getLogger("minisgl.engine")

# Above this many rows a GEMM (MKL/oneDNN through torch) beats streaming the compact weights: the
# kernel's register tile is sized for decode batches. Measured on a 2-core Zen 5 (bench/RESULTS.md).
MAX_KERNEL_ROWS = 64
WEIGHT_CHOICES = ("auto", "bf16", "f32")


@dataclass(eq=False)
class CpuWeight:
    """One linear for the kernels: `data` holds its n rows in `fmt` ([n, row bytes] uint8); `dense`
    is the model's float32 weight, for prompt chunks."""

    fmt: str
    data: torch.Tensor
    n: int
    k: int
    bias: torch.Tensor | None
    dense: torch.Tensor

    def __post_init__(self) -> None:
        self.fn: Any = None  # the kernel's ctypes entry point, set by bind()

    def bind(self, kernels: CpuKernels) -> CpuWeight:
        self.fn = getattr(kernels.raw, "gemm_" + self.fmt)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, k] float32 contiguous -> [rows, n] float32."""
        rows = x.shape[0]
        if rows > MAX_KERNEL_ROWS:
            return F.linear(x, self.dense, self.bias)
        out = torch.empty(rows, self.n, dtype=torch.float32)
        self.fn(self.data.data_ptr(), x.data_ptr(), out.data_ptr(),
                None if self.bias is None else self.bias.data_ptr(), rows, self.k, self.n)
        return out

    def nbytes(self) -> int:
        return self.data.numel()


def _digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(row.tobytes(), digest_size=16).digest()


class GgufBlocks:
    """Every row of a GGUF's Q4_1 and Q8_0 tensors, found by the content of its dequantized float32
    values (gguf-py's dequantization, the one transformers' loader uses)."""

    FORMATS = {"Q4_1": "q4_1", "Q8_0": "q8_0"}

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader
        from gguf.quants import dequantize

        self._dequantize = dequantize
        self.path = path
        self.tensors: list[tuple[str, Any, np.ndarray]] = []  # (fmt, quant type, raw [rows, row bytes])
        self.rows: dict[tuple[int, bytes], tuple[int, int]] = {}  # (k, digest) -> (tensor, row)
        for t in GGUFReader(str(path)).tensors:
            fmt = self.FORMATS.get(t.tensor_type.name)
            if fmt is None:
                continue
            raw = np.asarray(t.data)
            dense = dequantize(raw, t.tensor_type)
            ti = len(self.tensors)
            self.tensors.append((fmt, t.tensor_type, raw))
            k = dense.shape[1]
            for r in range(dense.shape[0]):
                self.rows.setdefault((k, _digest(dense[r])), (ti, r))

    def find(self, weight: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """(fmt, blocks [n, row bytes]) whose dequantization is exactly `weight` [n, k], or None."""
        w = weight.detach().numpy()
        n, k = w.shape
        hits = [self.rows.get((k, _digest(w[r]))) for r in range(n)]
        if any(h is None for h in hits) or len({self.tensors[h[0]][0] for h in hits}) != 1:  # type: ignore[index]
            return None
        fmt, qtype, _ = self.tensors[hits[0][0]]  # type: ignore[index]
        blocks = np.stack([self.tensors[ti][2][r] for ti, r in hits])  # type: ignore[misc]
        if not np.array_equal(self._dequantize(blocks, qtype), w):
            return None
        return fmt, torch.from_numpy(blocks)


def _exact_bf16(w: torch.Tensor) -> bool:
    return bool(torch.equal(w.to(torch.bfloat16).float(), w))


def make_weight(weight: torch.Tensor, bias: torch.Tensor | None, gguf: GgufBlocks | None, lossy_bf16: bool,
                force: str = "auto") -> CpuWeight:
    """The CpuWeight of a float32 [n, k] weight (see the module doc for the choice)."""
    weight = weight.detach().float().contiguous()
    n, k = weight.shape
    found = gguf.find(weight) if gguf is not None and force == "auto" else None
    if found is not None:
        fmt, data = found
    elif force == "f32" or (force == "auto" and not lossy_bf16 and not _exact_bf16(weight)):
        fmt, data = "f32", weight.view(torch.uint8).reshape(n, -1).clone()
    else:
        fmt, data = "bf16", weight.to(torch.bfloat16).view(torch.uint8).reshape(n, -1).contiguous()
    assert data.shape == (n, weight_row_bytes(fmt, k)), (fmt, data.shape)
    b = None if bias is None else bias.detach().float().contiguous()
    return CpuWeight(fmt, data.contiguous(), n, k, b, weight)


def find_gguf(model_dir: str | Path | None) -> Path | None:
    if not model_dir:
        return None
    files = sorted(Path(model_dir).glob("*.gguf"))
    return files[0] if len(files) == 1 else None


def weights_for(model: nn.Module, kernels: CpuKernels, model_dir: str | Path | None, lossy_bf16: bool,
                force: str | None = None) -> dict[str, CpuWeight]:
    """CpuWeights for every linear of the model's layers (by module name) and for the logits
    projection ("logits"), bound to `kernels`."""
    force = (force or os.environ.get("MINISGL_CPU_WEIGHTS", "auto")).strip().lower()
    if force not in WEIGHT_CHOICES:
        raise ValueError(f"MINISGL_CPU_WEIGHTS={force!r}: choose one of {', '.join(WEIGHT_CHOICES)}")
    gguf_path = find_gguf(model_dir) if force == "auto" else None
    gguf = None
    if gguf_path is not None:
        try:
            gguf = GgufBlocks(gguf_path)
        except (ImportError, ValueError, OSError) as exc:
            log.warning("not reading %s for its blocks: %s", gguf_path, exc)
    out: dict[str, CpuWeight] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            out[name] = make_weight(module.weight, module.bias, gguf, lossy_bf16, force).bind(kernels)
    out["logits"] = make_weight(model.lm_head_weight(), None, gguf, lossy_bf16, force).bind(kernels)
    counts: dict[str, int] = {}
    for w in out.values():
        counts[w.fmt] = counts.get(w.fmt, 0) + 1
    log.info("CPU weights: %s, %.0f MB per decode step%s", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
             sum(w.nbytes() for w in out.values()) / 1e6, f" (blocks from {gguf_path.name})" if gguf else "")
    return out
