"""The `sgl` backend: our batching engine on CUDA with fast kernels (minisgl/engine/cuda/engine.py: the
CUDA engine, its Triton kernels and decode graphs). This module checks the device, loads the model, sizes
the KV pool from the GPU's free memory and reads the options.

sgl_kernel is looked for and the kernel path is logged with the reason; no sgl_kernel path exists (its
wheel pins another torch), so it is Triton either way. Options, through BackendConfig.extra:
cuda_graph=0 turns the graphs off, cuda_graph_max_bs=N caps the largest captured batch (default
min(max_running, 512)), fused=0 turns the fused Triton kernels off (torch ops between the matmuls),
gemv=0 keeps cuBLAS for the batch-1 decode step (else Triton GEMVs with the norms and silu*up folded in),
prefill_graph=0 runs prompt chunks eagerly (else a CUDA graph per token-count bucket up to 2048 tokens),
extend_kernel=0 runs prompt chunks through SDPA instead of the paged extend kernel, overlap=0 reads each
step's tokens before scheduling the next. A server's workers read the same options from the environment
as MINISGL_SGL_CUDA_GRAPH, MINISGL_SGL_PREFILL_GRAPH, MINISGL_SGL_FUSED, MINISGL_SGL_GEMV, MINISGL_SGL_EXTEND_KERNEL,
MINISGL_SGL_OVERLAP (A/B runs).
"""

from __future__ import annotations

import logging
import os

import torch

from minisgl.backends.base import EngineBackend
from minisgl.cache.kv_pool import free_memory_bytes
from minisgl.config import BackendConfig, switched_off
from minisgl.engine.config import load_for_engine
from minisgl.engine.cuda.engine import DEFAULT_GRAPH_MAX_BS, SGLEngine
from minisgl.models.config import dtype_named

log = logging.getLogger("minisgl.sgl_backend")



# The KV pool takes the device's free memory after the weights, less a reserve for CUDA graphs, the
# activations of an 8192-token prefill chunk and the allocator's slack.
KV_RESERVE_BYTES = 6 * 2**30
KV_RESERVE_FRACTION = 0.08


def kv_tokens_for_device(device: torch.device, bytes_per_token: int) -> int:
    free = free_memory_bytes(device)
    return max(0, int(free - max(KV_RESERVE_BYTES, KV_RESERVE_FRACTION * free))) // bytes_per_token


def option(config: BackendConfig, name: str, default: str) -> str:
    """A backend option: BackendConfig.extra (in-process callers), else env MINISGL_SGL_<NAME> (a server's
    workers, for A/B runs), else the default."""
    return config.extra.get(name, os.environ.get(f"MINISGL_SGL_{name.upper()}", default))


def kernel_path() -> tuple[str, str]:
    """(which kernels, why) for the log line."""
    try:
        import sgl_kernel  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA/ABI mismatch raised at import
        return "triton", f"sgl_kernel is not importable ({type(e).__name__}: {e})"
    return "triton", "sgl_kernel imports, but this backend has no sgl_kernel path yet"


def require_cuda(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type != "cuda":
        raise RuntimeError(f"the sgl backend runs on CUDA only, not on device {device!r}; "
                           "use BACKEND_IMPL=torch for CPU/MPS")
    if not torch.cuda.is_available():
        raise RuntimeError("the sgl backend needs a CUDA GPU, and torch sees none "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                           "use BACKEND_IMPL=torch on this machine")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"the sgl backend needs Triton ({e}); pip install triton") from e
    return dev


class SGLBackend(EngineBackend):
    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        device = require_cuda(config.device)
        if device.index is not None:
            torch.cuda.set_device(device)
        else:
            device = torch.device("cuda", torch.cuda.current_device())
        kernels, why = kernel_path()
        log.info("sgl backend kernels: %s, because %s", kernels, why)
        model, ecfg = load_for_engine(config, device, dtype_named(config.dtype),
                                      lambda per_token: kv_tokens_for_device(device, per_token))
        self.model = model
        mc = model.config
        dtype = next(model.parameters()).dtype
        self.dtype = dtype
        kv_tokens = ecfg.kv_tokens
        graphs_on = not switched_off(option(config, "cuda_graph", "1"))
        max_bs = int(option(config, "cuda_graph_max_bs", str(DEFAULT_GRAPH_MAX_BS))) if graphs_on else 0
        fused = not switched_off(option(config, "fused", "1"))
        extend = not switched_off(option(config, "extend_kernel", "1"))
        overlap = not switched_off(option(config, "overlap", "1"))
        gemv = not switched_off(option(config, "gemv", "1"))
        prefill_graphs = graphs_on and not switched_off(option(config, "prefill_graph", "1"))
        self.engine = SGLEngine(model, ecfg, device, dtype, max_bs, fused=fused, extend_kernel=extend, overlap=overlap,
                                gemv=gemv, prefill_graphs=prefill_graphs)
        g, pg = self.engine.graphs, self.engine.prefill_graphs
        log.info("sgl backend: %s on %s (%s, %s), KV pool %d tokens (%.2f GiB%s), context %d, max running %d, "
                 "chunk %d, fused kernels %s, extend kernel %s, overlap %s, decode graphs %s, prefill graphs %s",
                 mc.architecture, device, torch.cuda.get_device_name(device), dtype, kv_tokens,
                 self.engine.pool.nbytes() / 2**30, "" if config.kv_cache_tokens else ", from free memory",
                 self.engine.max_context_len, config.max_running, config.chunk_size,
                 f"on ({self.engine.fused_modules} modules{', batch-1 GEMVs' if gemv else ''})" if fused else "off",
                 "on" if extend else "off",
                 "on" if overlap else "off",
                 f"up to batch {g.max_bs} ({len(g.sizes)} sizes, {g.capture_s:.1f}s)" if g else "off",
                 f"up to {pg.max_tokens} tokens ({len(pg.buckets)} sizes, {pg.capture_s:.1f}s)" if pg else "off")

    def shutdown(self) -> None:
        self.engine.graphs = self.engine.prefill_graphs = None
        torch.cuda.synchronize()
