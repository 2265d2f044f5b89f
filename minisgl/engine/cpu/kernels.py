"""Build and load `cpu_kernels.c`, the fused CPU kernels of `cpu_forward.py`, through ctypes.

The C file has no dependency but libm: it is compiled once per source, machine and ISA with the
system C compiler (`cc -O3` plus the ISA's flags: -mavx512f... for `avx512`, -mavx2 -mfma for `avx2`;
about two seconds) into the kernels/ folder of mini-sglang's cache (~/.cache/mini-sglang, or
$MINISGL_CACHE_DIR) and loaded with ctypes, which passes raw pointers and releases the GIL. The same
source builds for either ISA (its vector code follows the width the flags allow); cpu_isa.py picks
which one a process uses. No torch headers, no pybind11, no build step at install time. Where no compiler is
found (or the build fails) `load_cpu_kernels()` returns None and the engine keeps its torch ops.

Threads: when torch runs on GNU OpenMP (the Linux wheels load their own libgomp.so.1) the library is
built with -fopenmp, and the dynamic loader hands it the libgomp torch already loaded: one thread pool,
sized by torch.set_num_threads, shared by the matmuls and our loops. With any other runtime (or none)
it is built without -fopenmp and runs single-threaded: two OpenMP pools spinning on the same cores
would cost far more than they save.

The wrappers check dtypes, contiguity and shapes before handing pointers to C: a wrong tensor here
would be a silent memory error, not an exception.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from minisgl.config import switched_off

log = logging.getLogger("minisgl.engine")

SOURCE = Path(__file__).with_name("kernels.c")
# -ffast-math's parts that the loops need (reassociation: ~1.4x on the attention), not -ffast-math
# itself: gcc < 13 then links crtfastmath.o, whose constructor turns on flush-to-zero for the whole
# process at load time.
CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
          "-freciprocal-math", "-fPIC", "-shared"]
# The instruction sets a build may use: each is a subset of what cpu_isa.py checked the CPU has.
# -mtune=native only schedules instructions for this CPU; it never adds any.
ISA_FLAGS = {
    # gcc picks 256-bit vectors by default even with AVX-512
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-mprefer-vector-width=512", "-mtune=native"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mtune=native"],
}
VECTOR_BITS = {"avx512": 512, "avx2": 256}
MAX_HEAD_DIM = 256  # the C kernel's stack buffers
MAX_GROUP = 8  # query heads per kv head

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float


def cache_dir() -> Path:
    from minisgl.assets.embedded import cache_root

    return cache_root() / "kernels"


def _cpu_signature() -> str:
    """-march=native code is only valid on a CPU with the same features."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_uses_libgomp() -> bool:
    """True when the OpenMP runtime loaded in this process (by torch) is GNU's libgomp.so.1."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libgomp.so.1" in maps and "libiomp" not in maps and "libomp.so" not in maps


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(compiler: str, version: str, flags: list[str]) -> Path:
    source = SOURCE.read_bytes()
    inputs = " ".join([compiler, version, *flags, _cpu_signature()])
    key = hashlib.sha256(source + inputs.encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # we load code from here: ours only
    # build next to the target, then rename: processes starting together never load a half-written file
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(built, target)
    log.info("built the CPU kernels: %s", target)
    return target


class CpuKernels:
    """The shared library's entry points. `raw` holds the ctypes functions (pointers and sizes, no
    checks: for a caller that validated its tensors once, like FusedCpuForward's per-layer loop); the
    methods below check every tensor first."""

    def __init__(self, lib: ctypes.CDLL, threaded: bool, isa: str) -> None:
        self.threaded = threaded  # built against torch's OpenMP pool
        self.isa = isa
        self.raw = lib
        for suffix in ("", "_f32"):
            getattr(lib, "add_rmsnorm" + suffix).argtypes = [_P, _P, _P, _P, _I, _I, _F]
            getattr(lib, "silu_mul" + suffix).argtypes = [_P, _P, _I, _I]
            getattr(lib, "decode_attention" + suffix).argtypes = [_P, _P, _P, _F, _P, _P, _P, _P, _P, _P, _I, _P, _P,
                                                                  _P, _I, _I, _I, _I, _F]
            for name in ("add_rmsnorm", "silu_mul", "decode_attention"):
                getattr(lib, name + suffix).restype = None
        for fmt in WEIGHT_FORMATS:
            fn = getattr(lib, "gemm_" + fmt)
            fn.argtypes = [_P, _P, _P, _P, _I, _I, _I]
            fn.restype = None
        lib.widen_rows.argtypes = [ctypes.c_int, _P, _P, _I, _I]
        lib.widen_rows.restype = None
        lib.kernels_vector_bits.restype = ctypes.c_int
        lib.decode_layers.argtypes = [_P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _F, _P, _P, _P,
                                      _P, _I, _P, _P, _F]
        lib.decode_layers.restype = None
        # the panel matmuls: float32 FMAs in both builds, the bfloat16 dot-product ones in the avx512
        # build, run only where the CPU has AVX512_BF16
        from minisgl.engine.cpu.isa import cpu_flags

        self.has_panels = bool(lib.kernels_have_panels())
        # vpdpwssd for the int16 kernels: the build carries a copy for CPUs with VNNI
        self.i16_vnni = self.has_panels and VNNI_FLAG[isa] in cpu_flags()
        self.can_dot = bool(lib.kernels_have_dot()) and "avx512_bf16" in cpu_flags()
        if self.has_panels:
            lib.panel_bytes.argtypes = [ctypes.c_int, _I, _I]
            lib.panel_bytes.restype = _I
            lib.pack_panels.argtypes = [ctypes.c_int, _P, _P, _I, _I]
            lib.pack_panels.restype = None
            kinds = ("fma",) + (("dot",) if lib.kernels_have_dot() else ())
            names = [f"gemm_{kind}_{fmt}" for fmt in PANEL_FORMATS.values() for kind in kinds]
            for name in names + [f"gemm_i16{v}_{fmt}" for v in ("", "v") for fmt in I16_FORMATS.values()]:
                getattr(lib, name).argtypes = [_P, _P, _P, _P, _I, _I, _I]
                getattr(lib, name).restype = None
        if lib.kernels_vector_bits() != VECTOR_BITS[isa]:
            raise OSError(f"the {isa} build of the CPU kernels uses {lib.kernels_vector_bits()}-bit vectors")

    @staticmethod
    def _act(t: torch.Tensor) -> tuple[torch.dtype, str]:
        """The activation dtype of a call (bfloat16: the amx path's kernels; float32: the _f32 ones)."""
        if t.dtype == torch.bfloat16:
            return torch.bfloat16, ""
        if t.dtype == torch.float32:
            return torch.float32, "_f32"
        raise ValueError(f"kernel activations are bfloat16 or float32, not {t.dtype}")

    def widen(self, fmt: str, weight: torch.Tensor, k: int) -> torch.Tensor:
        """The float32 weights [n, k] the matmuls compute with, of `weight` [n, row bytes] in `fmt`."""
        n = weight.shape[0]
        if fmt not in WEIGHT_FORMATS or k % 32:
            raise ValueError(f"cannot widen {fmt!r} weights of {k} columns")
        _check(weight, torch.uint8, (n, weight_row_bytes(fmt, k)))
        out = torch.empty(n, k, dtype=torch.float32)
        self.raw.widen_rows(WEIGHT_FORMATS.index(fmt), weight.data_ptr(), out.data_ptr(), n, k)
        return out

    def pack_panels(self, fmt: str, weight: torch.Tensor, k: int, int16: bool = False) -> torch.Tensor:
        """`weight` [n, row bytes] in `fmt` (q4_1, q8_0 or bf16) repacked for the panel kernels
        (PANEL_FORMATS[fmt]): the same weights, in panels of 16 rows (see cpu_kernels.c); `int16`: a
        Q8_0 panel's integers as int16 (for the int16 kernels) instead of bfloat16."""
        if fmt not in PANEL_FORMATS or k % 32 or not self.has_panels or (int16 and fmt != "q8_0"):
            raise ValueError(f"cannot pack {fmt!r} weights of {k} columns for the panel kernels")
        n = weight.shape[0]
        _check(weight, torch.uint8, (n, weight_row_bytes(fmt, k)))
        out = torch.empty(self.raw.panel_bytes(WEIGHT_FORMATS.index(fmt), n, k), dtype=torch.uint8)
        self.raw.pack_panels(WEIGHT_FORMATS.index(fmt) | (PANEL_INT16 if int16 else 0), weight.data_ptr(),
                             out.data_ptr(), n, k)
        return out

    def gemm_panels(self, fmt: str, packed: torch.Tensor, x: torch.Tensor, out: torch.Tensor, n: int,
                    bias: torch.Tensor | None = None, inputs: str = "f32") -> None:
        """out[B, n] = x[B, K] @ W^T (+ bias) for W of `fmt` (q4_1, q8_0, bf16) packed by pack_panels,
        the weights exact, float32 sums. `inputs` (PANEL_INPUTS) is how x enters: f32 as it is (the FMA
        kernels), bf16 rounded to bfloat16 (the dot-product kernels; needs can_dot), i16 as int16 rows
        with one scale each (q4_1, and q8_0 packed with int16=True)."""
        b, k = x.shape
        if inputs not in PANEL_INPUTS:
            raise ValueError(f"matmul inputs are one of {', '.join(PANEL_INPUTS)}, not {inputs!r}")
        if inputs == "bf16" and not self.can_dot:
            raise ValueError("the bfloat16 dot kernels need the avx512 build on a CPU with AVX512_BF16")
        if inputs == "i16" and fmt not in I16_FORMATS:
            raise ValueError(f"the int16 kernels read q4_1 and q8_0 panels, not {fmt!r}")
        if fmt not in PANEL_FORMATS or k % 32 or not self.has_panels:
            raise ValueError(f"no panel kernel for {fmt!r} weights of {k} columns")
        _check(x, torch.float32, (b, k))
        _check(packed, torch.uint8, (self.raw.panel_bytes(WEIGHT_FORMATS.index(fmt), n, k),))
        _check(out, torch.float32, (b, n))
        if bias is not None:
            _check(bias, torch.float32, (n,))
        self.panel_kernel(inputs, PANEL_FORMATS[fmt])(packed.data_ptr(), x.data_ptr(), out.data_ptr(), _ptr(bias),
                                                      b, k, n)

    def gemm_dot(self, fmt: str, packed: torch.Tensor, x: torch.Tensor, out: torch.Tensor, n: int,
                 bias: torch.Tensor | None = None) -> None:
        """gemm_panels with bfloat16-rounded inputs (the dot-product kernels)."""
        self.gemm_panels(fmt, packed, x, out, n, bias, inputs="bf16")

    def _panel_family(self, inputs: str) -> tuple[str, int]:
        """The kernel family for `inputs`: its entry prefix and decode_layers' id base. For i16, the VNNI
        copy (vpdpwssd, one instruction for vpmaddwd + vpaddd) where the CPU has VNNI."""
        return _PANEL_FAMILIES["i16v" if inputs == "i16" and self.i16_vnni else inputs]

    def panel_kernel(self, inputs: str, panel_fmt: str) -> Any:
        """The ctypes entry of the panel kernel for `inputs` and a panel format (q4_1p...)."""
        return getattr(self.raw, self._panel_family(inputs)[0] + panel_fmt)

    def panel_format_id(self, inputs: str, panel_fmt: str) -> int:
        """decode_layers' id of that kernel (cpu_kernels.c: DOT_FMT / FMA_FMT / I16_FMT / I16V_FMT + FMT_*)."""
        src = next(f for f, p in PANEL_FORMATS.items() if p == panel_fmt)
        return self._panel_family(inputs)[1] + WEIGHT_FORMATS.index(src)

    def gemm(self, fmt: str, weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor, n: int,
             bias: torch.Tensor | None = None) -> None:
        """out[B, n] = x[B, K] @ W^T (+ bias) for a weight of n rows stored as `fmt` (WEIGHT_FORMATS)
        in the uint8 tensor `weight` [n, row bytes]."""
        b, k = x.shape
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
        if k % 32:
            raise ValueError(f"the weight kernels need an input size divisible by 32, got {k}")
        _check(x, torch.float32, (b, k))
        _check(weight, torch.uint8, (n, weight_row_bytes(fmt, k)))
        _check(out, torch.float32, (b, n))
        if bias is not None:
            _check(bias, torch.float32, (n,))
        getattr(self.raw, "gemm_" + fmt)(weight.data_ptr(), x.data_ptr(), out.data_ptr(), _ptr(bias), b, k, n)

    def add_rmsnorm(self, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                    out: torch.Tensor, eps: float) -> None:
        """residual += delta (if given); out = rmsnorm(residual) * weight, in out's dtype (bfloat16 or
        float32; delta's must be the same)."""
        t, d = residual.shape
        act, suffix = self._act(out)
        _check(residual, torch.float32, (t, d))
        _check(weight, torch.float32, (d,))
        _check(out, act, (t, d))
        if delta is not None:
            _check(delta, act, (t, d))
        getattr(self.raw, "add_rmsnorm" + suffix)(residual.data_ptr(), _ptr(delta), weight.data_ptr(),
                                                  out.data_ptr(), t, d, eps)

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor) -> None:
        """out = silu(gate) * up for gate_up = [gate | up] along the last dim (bfloat16 or float32)."""
        t, i = out.shape
        act, suffix = self._act(out)
        _check(gate_up, act, (t, 2 * i))
        _check(out, act, (t, i))
        getattr(self.raw, "silu_mul" + suffix)(gate_up.data_ptr(), out.data_ptr(), t, i)

    def decode_attention(self, qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                         eps: float, cos_sin: torch.Tensor, positions: torch.Tensor, k_pool: torch.Tensor,
                         v_pool: torch.Tensor, write_slots: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
                         out: torch.Tensor, scratch: torch.Tensor, num_heads: int) -> None:
        """One new token per sequence: q/k norms (if given) and RoPE at `positions`, k/v written at
        `write_slots`, then attention over the first lens[b] slots of table row b. `scratch` holds at
        least attention_scratch_size(...) float32s."""
        b = qkv.shape[0]
        slots, n_kv, d = k_pool.shape
        act, suffix = self._act(qkv)
        check_attention_shape(num_heads, n_kv, d)
        _check(qkv, act, (b, (num_heads + 2 * n_kv) * d))
        _check(cos_sin, torch.float32, (cos_sin.shape[0], 2, d))
        _check(k_pool, torch.float32, (slots, n_kv, d))
        _check(v_pool, torch.float32, (slots, n_kv, d))
        check_decode_batch(positions, write_slots, table, lens, slots, cos_sin.shape[0])
        _check(out, act, (b, num_heads * d))
        for norm in (q_norm, k_norm):
            if norm is not None:
                _check(norm, torch.float32, (d,))
        if scratch.dtype != torch.float32 or scratch.numel() < attention_scratch_size(b, num_heads, d, table.shape[1]):
            raise ValueError("attention scratch too small")
        getattr(self.raw, "decode_attention" + suffix)(
            qkv.data_ptr(), _ptr(q_norm), _ptr(k_norm), eps, cos_sin.data_ptr(), positions.data_ptr(),
            k_pool.data_ptr(), v_pool.data_ptr(), write_slots.data_ptr(), table.data_ptr(), table.shape[1],
            lens.data_ptr(), out.data_ptr(), scratch.data_ptr(), b, num_heads, n_kv, d, d ** -0.5)


WEIGHT_FORMATS = ("f32", "bf16", "q8_0", "q4_1")  # in the order of cpu_kernels.c's FMT_* ids
# the formats the panel kernels read, by the format they are packed from (pack_panels)
PANEL_FORMATS = {"q4_1": "q4_1p", "q8_0": "q8_0p", "bf16": "bf16p"}
# how a panel matmul's input enters: float32, bfloat16 or int16
PANEL_INPUTS = ("f32", "bf16", "i16")
# each kernel family (cpu_kernels.c): its entry prefix, and its id base in decode_layers (FMA_FMT ...)
_PANEL_FAMILIES = {"f32": ("gemm_fma_", 8), "bf16": ("gemm_dot_", 4), "i16": ("gemm_i16_", 12),
                   "i16v": ("gemm_i16v_", 16)}
I16_FORMATS = {"q4_1": "q4_1p", "q8_0": "q8_0p"}  # the panels the int16 kernels read (q8_0: packed int16)
PANEL_INT16 = 16  # pack_panels' flag for that
# the CPU flag each build's VNNI int16 kernel needs
VNNI_FLAG = {"avx512": "avx512_vnni", "avx2": "avx_vnni"}
_BLOCK_BYTES = {"f32": 128, "bf16": 64, "q8_0": 34, "q4_1": 20}  # per 32 weights


# decode_layers' description of a layer (cpu_kernels.c): DESC_FIELDS int64s, a matmul's format id
DESC_FIELDS = 18


def matmul_format_id(fmt: str) -> int:
    """The format id decode_layers reads for the row kernel gemm_<fmt> (FMT_*); panel kernels' ids
    come from CpuKernels.panel_format_id."""
    return WEIGHT_FORMATS.index(fmt)


def weight_row_bytes(fmt: str, k: int) -> int:
    return k // 32 * _BLOCK_BYTES[fmt]


def attention_scratch_size(batch: int, num_heads: int, head_dim: int, table_len: int) -> int:
    """float32s decode_attention needs: each sequence's rotated queries and its score rows."""
    return batch * num_heads * (head_dim + table_len)


def check_attention_shape(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    if head_dim > MAX_HEAD_DIM or head_dim % 2 or num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
        raise ValueError(f"unsupported attention shape for the CPU kernels: {num_heads} heads, {num_kv_heads} kv "
                         f"heads, head dim {head_dim}")


def check_decode_batch(positions: torch.Tensor, write_slots: torch.Tensor, table: torch.Tensor,
                       lens: torch.Tensor, pool_slots: int, max_positions: int) -> None:
    """The step's index tensors, and every index the kernel will follow, within bounds: the C code
    trusts them."""
    b = positions.shape[0]
    for t in (positions, write_slots, lens):
        _check(t, torch.int64, (b,))
    _check(table, torch.int64, (b, table.shape[1]))
    if b == 0:
        return
    if int(lens.min()) < 1 or int(lens.max()) > table.shape[1]:
        raise ValueError("sequence lengths must be within 1..table width")
    if int(positions.min()) < 0 or int(positions.max()) >= max_positions:
        raise ValueError("a position is past the RoPE cache")
    if int(write_slots.min()) < 0 or int(write_slots.max()) >= pool_slots:
        raise ValueError("a write slot is outside the KV pool")
    if int(table.min()) < 0 or int(table.max()) >= pool_slots:
        raise ValueError("a page-table slot is outside the KV pool")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != tuple(shape) or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"kernel argument: expected a contiguous CPU {dtype} tensor of shape {shape}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device} (contiguous: {t.is_contiguous()})")


@lru_cache(maxsize=None)
def load_cpu_kernels(isa: str | None = None) -> CpuKernels | None:
    """The kernels built for `isa` (avx512 or avx2; None: what cpu_isa.kernel_isa() says this CPU runs),
    built on first use; None where they cannot be built here, or with MINISGL_CPU_KERNELS=0. The
    caller makes sure the CPU has the ISA (cpu_isa.py): a build for one it lacks would crash on its
    first vector instruction."""
    if switched_off(os.environ.get("MINISGL_CPU_KERNELS", "1")):
        return None
    if isa is None:
        from minisgl.engine.cpu.isa import kernel_isa

        isa = kernel_isa()
        if isa is None:
            return None
    if isa not in ISA_FLAGS:
        raise ValueError(f"no CPU kernel build for ISA {isa!r}; choose one of {', '.join(ISA_FLAGS)}")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        log.warning("no C compiler found: the CPU forward runs with plain torch ops")
        return None
    # threaded on torch's libgomp where that is the runtime (clang must be told to use it), else one thread
    version = _compiler_version(compiler)  # in the cache key: an upgraded compiler rebuilds
    openmp = "-fopenmp=libgomp" if "clang" in version else "-fopenmp"
    variants = [True, False] if torch_uses_libgomp() else [False]
    detail: object = ""
    for threaded in variants:
        flags = CFLAGS + ISA_FLAGS[isa] + [openmp if threaded else "-fopenmp-simd"]
        try:
            return CpuKernels(ctypes.CDLL(str(_build(compiler, version, flags))), threaded, isa)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
    log.warning("could not build the CPU kernels (%s): the CPU forward runs with plain torch ops", detail)
    return None
