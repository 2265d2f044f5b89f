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

The q4_1 / q8_0 / bf16 weights are repacked once into panels of 16 rows (cpu_kernels.c: `q4_1p`,
`q8_0p`, `bf16p`; the Q8_0 integers as bfloat16, 2 bytes a weight) that two kernels read without
widening the weights into a buffer: float32 FMAs (every AVX2 / AVX-512 CPU: float32 inputs, the
products those of the float32 model), or, at twice the float32 FMA rate (which is what bounds a
decode step from batch 4 up), dot products on rounded inputs: bfloat16 ones (`vdpbf16ps`) on a CPU
with AVX512_BF16 (each input rounded as the amx path rounds it), int16 ones (`vpmaddwd`, or VNNI's
`vpdpwssd`; the GGUF blocks, the Q8_0 integers then packed as int16) elsewhere (each input row as int16 with one scale: off by at most 2^-16 of the row's largest).
MINISGL_CPU_DOT=auto|bf16|i16|f32 chooses: auto is bf16 where the CPU has it, else i16 where that is
faster than float32 FMAs (VNNI's vpdpwssd, or the avx2 build; AVX-512 without VNNI keeps f32), unless
the model is asked for in exact float32 (dtype float32), which keeps f32; f32 keeps every matmul
input float32. f32-format weights keep the row kernels (gemm_f32).
Prompt chunks (more than MAX_KERNEL_ROWS rows) go to a float32 GEMM on the model's own weight: oneDNN's,
with the weight packed once at load (on a 2-core Zen 5, 1.6-2.3x faster than torch's default float32
matmul from 32 to 512 rows, and ~1.25x faster than these kernels from 16 rows up when one core has the
memory to itself), else F.linear.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minisgl.engine.cpu.kernels import I16_FORMATS, PANEL_FORMATS, CpuKernels, matmul_format_id, weight_row_bytes

log = logging.getLogger("minisgl.engine")

# Above this many rows a GEMM beats streaming the compact weights: its compute outgrows the weight
# stream, and the kernels' register tile is sized for decode batches (bench/RESULTS.md).
MAX_KERNEL_ROWS = int(os.environ.get("MINISGL_CPU_KERNEL_ROWS", "32"))
WEIGHT_CHOICES = ("auto", "bf16", "f32")
INPUTS_LOG = {"f32": "; float32 FMA kernels",
              "bf16": "; matmul inputs rounded to bfloat16 for the AVX512_BF16 dot kernels",
              "i16": "; GGUF-block matmul inputs as int16 rows for the int16 dot kernels"}
DOT_CHOICES = ("auto", "bf16", "i16", "f32")


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
    inputs: str = "f32"  # panels: how the matmul input enters (kernels.PANEL_INPUTS: f32, bf16, i16)

    def __post_init__(self) -> None:
        self.fn: Any = None  # the kernel's ctypes entry point, set by bind()
        self.format_id = -1  # its id in decode_layers' layer descriptions, set by bind()
        self.packed: torch.Tensor | None = None  # `dense` packed for oneDNN (pack_for_gemm)

    def pack_for_gemm(self) -> None:
        """Pack `dense` once for oneDNN's float32 GEMM, for prompt chunks; F.linear where it cannot."""
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
            return
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.dense, 256)  # 256: a prompt chunk's rows
            x = torch.randn(MAX_KERNEL_ROWS + 1, self.k)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
            want = F.linear(x, self.dense, self.bias)
            if (got - want).abs().max() > 1e-4 * want.abs().max():
                raise RuntimeError("oneDNN's float32 linear disagrees with F.linear")
        except RuntimeError as exc:
            log.warning("no packed float32 GEMM for prompt chunks: %s", exc)
            return
        self.packed = packed

    def bind(self, kernels: CpuKernels) -> CpuWeight:
        panel = self.fmt in PANEL_FORMATS.values()
        if panel and self.inputs == "bf16" and not kernels.can_dot:
            raise ValueError(f"{self.fmt} weights need the bfloat16 dot kernels, which this CPU or build lacks")
        if panel:
            self.fn = kernels.panel_kernel(self.inputs, self.fmt)
            self.format_id = kernels.panel_format_id(self.inputs, self.fmt)
        else:
            self.fn = getattr(kernels.raw, "gemm_" + self.fmt)
            self.format_id = matmul_format_id(self.fmt)
        return self

    def to_panels(self, kernels: CpuKernels, inputs: str = "f32") -> CpuWeight:
        """The same weights packed into panels where their format has a panel one, for the kernels of
        `inputs` (f32: the float32 FMA ones; bf16: the dot-product ones; i16: the int16 ones, which
        read Q4_1 and Q8_0: bfloat16 weights keep float32 inputs)."""
        if self.fmt not in PANEL_FORMATS or not kernels.has_panels:
            return self
        inputs = "f32" if inputs == "i16" and self.fmt not in I16_FORMATS else inputs
        packed = kernels.pack_panels(self.fmt, self.data, self.k, int16=inputs == "i16" and self.fmt == "q8_0")
        out = CpuWeight(PANEL_FORMATS[self.fmt], packed, self.n, self.k, self.bias, self.dense, inputs)
        out.packed = self.packed
        return out.bind(kernels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, k] float32 contiguous -> [rows, n] float32."""
        rows = x.shape[0]
        if rows > MAX_KERNEL_ROWS:
            if self.packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            return F.linear(x, self.dense, self.bias)
        out = torch.empty(rows, self.n, dtype=torch.float32)
        self.fn(self.data.data_ptr(), x.data_ptr(), out.data_ptr(),
                None if self.bias is None else self.bias.data_ptr(), rows, self.k, self.n)
        return out

    def nbytes(self) -> int:
        return self.data.numel()


_MIX = np.random.default_rng(0x5EED).integers(1, 2**63, size=1 << 16, dtype=np.uint64) | np.uint64(1)


def _row_keys(dense: np.ndarray) -> list[int]:
    """A 64-bit key per row of float32 weights [n, k] (k even), from their bits: vectorized, so
    hashing 200k rows takes milliseconds. Equal rows get equal keys; a collision is caught by the
    exact comparison that follows every match."""
    words = np.ascontiguousarray(dense).view(np.uint64)  # [n, k / 2]
    if words.shape[1] > _MIX.size:
        raise ValueError("row too long to key")
    with np.errstate(over="ignore"):
        return (words * _MIX[: words.shape[1]]).sum(axis=1, dtype=np.uint64).tolist()


# GGUF metadata value types -> struct format (8: string, 9: array; see read_gguf_tensors)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_QTYPES = {3: "q4_1", 8: "q8_0"}  # ggml type ids of the block formats the kernels read


def read_gguf_tensors(path: Path) -> list[tuple[str, str, np.ndarray]]:
    """(name, fmt, raw blocks [rows, row bytes]) of the Q4_1 and Q8_0 tensors of a GGUF file (v2/v3),
    memory-mapped. Its own small parser: gguf-py's reader also decodes every metadata field (the
    tokenizer's 49k strings: 5 s here) that this needs only to skip."""
    buf = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable arrays, the file untouched
    mv = memoryview(buf)  # type: ignore[arg-type]
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, mv, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(mv[pos - n:pos]).decode("utf-8", "replace")

    def skip(vtype: int) -> Any:
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            etype, count = take("I"), take("Q")
            if etype in _GGUF_SCALARS:
                pos += count * struct.calcsize(_GGUF_SCALARS[etype])
            else:
                for _ in range(count):
                    skip(etype)
            return None
        return take(_GGUF_SCALARS[vtype])

    if bytes(mv[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} not supported")
    alignment = 32
    for _ in range(n_kv):
        key = string()
        value = skip(take("I"))
        if key == "general.alignment":
            alignment = int(value)
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, dims, take("I"), take("Q")))
    data_start = (pos + alignment - 1) // alignment * alignment
    out = []
    for name, dims, qtype, offset in infos:
        fmt = _GGUF_QTYPES.get(qtype)
        if fmt is None or len(dims) != 2 or dims[0] % 32:
            continue
        k, n = dims
        row_bytes = weight_row_bytes(fmt, k)
        start = data_start + offset
        out.append((name, fmt, np.asarray(buf[start:start + n * row_bytes]).reshape(n, row_bytes)))
    return out


class GgufBlocks:
    """Every row of a GGUF's Q4_1 and Q8_0 tensors, found by the content of its float32 weights as
    the kernels widen them (the same as gguf-py's dequantization, which transformers' loader uses:
    tests/test_cpu_paths.py checks it)."""

    def __init__(self, path: Path, kernels: CpuKernels) -> None:
        self.path = path
        self.kernels = kernels
        self.tensors: list[tuple[str, np.ndarray]] = []  # (fmt, raw [rows, row bytes])
        self.rows: dict[tuple[int, int], tuple[int, int]] = {}  # (k, row key) -> (tensor, row)
        for _, fmt, raw in read_gguf_tensors(path):
            k = raw.shape[1] // weight_row_bytes(fmt, 32)
            dense = kernels.widen(fmt, torch.from_numpy(np.ascontiguousarray(raw)), k * 32).numpy()
            ti = len(self.tensors)
            self.tensors.append((fmt, raw))
            k = dense.shape[1]
            for r, key in enumerate(_row_keys(dense)):
                self.rows.setdefault((k, key), (ti, r))

    def find(self, weight: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """(fmt, blocks [n, row bytes]) whose float32 weights are exactly `weight` [n, k], or None."""
        w = weight.detach().contiguous()
        wn = w.numpy()
        n, k = wn.shape
        hits = [self.rows.get((k, key)) for key in _row_keys(wn)]
        if any(h is None for h in hits) or len({self.tensors[h[0]][0] for h in hits}) != 1:  # type: ignore[index]
            return None
        fmt = self.tensors[hits[0][0]][0]  # type: ignore[index]
        blocks = torch.from_numpy(np.stack([self.tensors[ti][1][r] for ti, r in hits]))  # type: ignore[misc]
        if not torch.equal(self.kernels.widen(fmt, blocks, k), w):
            return None
        return fmt, blocks


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


def matmul_inputs(kernels: CpuKernels, lossy_bf16: bool, dot: str | None = None) -> str:
    """How the panel matmuls take their input (MINISGL_CPU_DOT, see the module doc): f32, bf16 or i16."""
    dot = (dot or os.environ.get("MINISGL_CPU_DOT", "auto")).strip().lower()
    if dot not in DOT_CHOICES:
        raise ValueError(f"MINISGL_CPU_DOT={dot!r}: choose one of {', '.join(DOT_CHOICES)}")
    if dot == "bf16" and not kernels.can_dot:
        log.warning("MINISGL_CPU_DOT=bf16 asked for, but this CPU or kernel build has no AVX512_BF16: int16 inputs")
        dot = "i16"
    if dot == "auto":  # int16 only where it beats float32 FMAs: with VNNI, or against 256-bit FMAs
        fast_i16 = kernels.i16_vnni or kernels.isa == "avx2"
        dot = "f32" if not lossy_bf16 else "bf16" if kernels.can_dot else "i16" if fast_i16 else "f32"
    return dot if kernels.has_panels else "f32"


def weights_for(model: nn.Module, kernels: CpuKernels, model_dir: str | Path | None, lossy_bf16: bool,
                force: str | None = None, dot: str | None = None) -> dict[str, CpuWeight]:
    """CpuWeights for every linear of the model's layers (by module name) and for the logits
    projection ("logits"), bound to `kernels`; in panels for the kernels matmul_inputs picks."""
    force = (force or os.environ.get("MINISGL_CPU_WEIGHTS", "auto")).strip().lower()
    if force not in WEIGHT_CHOICES:
        raise ValueError(f"MINISGL_CPU_WEIGHTS={force!r}: choose one of {', '.join(WEIGHT_CHOICES)}")
    inputs = matmul_inputs(kernels, lossy_bf16, dot)
    gguf_path = find_gguf(model_dir) if force == "auto" else None
    gguf = None
    if gguf_path is not None:
        try:
            gguf = GgufBlocks(gguf_path, kernels)
        except (ValueError, OSError, struct.error) as exc:
            log.warning("not reading %s for its blocks: %s", gguf_path, exc)
    out: dict[str, CpuWeight] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            w = make_weight(module.weight, module.bias, gguf, lossy_bf16, force).bind(kernels)
            w.pack_for_gemm()
            out[name] = w.to_panels(kernels, inputs)
    # logits are asked for a few rows per step (one per sequence): no packed copy of the big head
    w = make_weight(model.lm_head_weight(), None, gguf, lossy_bf16, force).bind(kernels)
    out["logits"] = w.to_panels(kernels, inputs)
    counts: dict[str, int] = {}
    for w in out.values():
        counts[w.fmt] = counts.get(w.fmt, 0) + 1
    log.info("CPU weights: %s, %.0f MB per decode step%s%s", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
             sum(w.nbytes() for w in out.values()) / 1e6, f" (blocks from {gguf_path.name})" if gguf else "",
             "" if not kernels.has_panels else INPUTS_LOG[inputs])
    return out
