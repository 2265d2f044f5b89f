"""The `torch` backend: our batching engine (minisgl.engine) with portable torch ops, for CPU and MPS.

It loads the model with our own loader, sizes the paged KV pool, and forwards every call to the
engine. Everything interesting (scheduling, paged attention, sampling) lives in minisgl.engine. On a
CPU the forward takes one of the paths of engine/cpu/isa.py, chosen from what the CPU has (or
MINISGL_CPU_ISA): with AMX the linears are packed bfloat16 matmuls (engine/cpu/linear.py); with
AVX-512 or AVX2 they stream compact weights (the GGUF's own blocks, or bfloat16) through C kernels
(engine/cpu/weights.py); on both the ops between them run as fused C kernels (engine/cpu/forward.py,
engine/cpu/kernels.c). Elsewhere, the model's own torch ops.
"""

from __future__ import annotations

import logging

import torch

from minisgl.backends.base import EngineBackend
from minisgl.cache.kv_pool import tokens_for_memory
from minisgl.config import BackendConfig, switched_off
from minisgl.distributed.group import tp_world
from minisgl.engine.cpu import isa as cpu_isa
from minisgl.engine.cpu.forward import FusedCpuForward
from minisgl.engine.cpu.kernels import load_cpu_kernels
from minisgl.engine.cpu.linear import pack_linears
from minisgl.engine.cpu.weights import weights_for
from minisgl.engine.config import load_for_engine
from minisgl.engine.engine import Engine
from minisgl.models.config import dtype_named

log = logging.getLogger("minisgl.torch_backend")

# On a host-memory device the pool competes with everything else on the box; more than this many
# tokens buys nothing for the small models a CPU serves.
CPU_MAX_KV_TOKENS = 65536


class TorchBackend(EngineBackend):
    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        device = torch.device(config.device)
        # Threads: torch's default is every physical core; the worker process divides them among CPU
        # workers before it builds us, so we leave the count alone.
        # TP > 1 on CPU: the plain torch path (packing would swap out the vocab-parallel logits hook).
        self.cpu_path = self._cpu_path(device) if tp_world() == 1 else "torch"
        packed = 0

        def pack(model: torch.nn.Module) -> None:
            nonlocal packed
            if self.cpu_path == "amx" and self._amx_linears():
                packed = pack_linears(model)

        model, ecfg = load_for_engine(config, device, dtype_named(config.dtype),
                                      lambda per_token: self._kv_tokens_from_memory(device, per_token), pack)
        mc = model.config
        dtype = next(model.parameters()).dtype
        self.fused: FusedCpuForward | None = self._fused_forward(model) if self.cpu_path != "torch" else None
        self.engine = Engine(self.fused or model, ecfg, device, dtype)
        amx = f", {packed} matmuls as packed bfloat16 oneDNN" if packed else ""
        if self.fused is not None:
            kernels = self.fused.kernels
            amx += (f", fused CPU kernels ({self.cpu_path} path, {kernels.isa} build"
                    + (", on torch's OpenMP threads)" if kernels.threaded else ")"))
        elif device.type == "cpu":
            amx += ", torch ops"
        log.info("torch backend: %s on %s (%s%s), KV pool %d tokens (%.2f GiB), context %d, threads %d",
                 mc.architecture, device, dtype, amx, ecfg.kv_tokens, self.engine.pool.nbytes() / 2**30,
                 self.engine.max_context_len, torch.get_num_threads())

    def _cpu_path(self, device: torch.device) -> str:
        """amx, avx512, avx2 or torch (engine/cpu/isa.py); extra cpu_isa (else MINISGL_CPU_ISA) forces
        one, extra cpu_kernels=0 (or MINISGL_CPU_KERNELS=0) means torch ops."""
        if device.type != "cpu":
            return "torch"
        if switched_off(self.config.extra.get("cpu_kernels", "1")):
            return "torch"
        return cpu_isa.choose(self.config.extra.get("cpu_isa") or None)

    def _fused_forward(self, model: torch.nn.Module) -> FusedCpuForward | None:
        """Every step through the fused CPU kernels (engine/cpu/forward.py) where the model suits the
        path and the kernels build here; else the model's own ops."""
        vector = self.cpu_path in ("avx512", "avx2")
        if not FusedCpuForward.supports(model, vector=vector):
            return None
        kernels = load_cpu_kernels(self.cpu_path if vector else cpu_isa.kernel_isa())
        if kernels is None:
            return None
        if not vector:
            return FusedCpuForward(model, kernels)
        # dtype float32 keeps every weight exact; auto may round one to bfloat16 (as the amx path does)
        weights = weights_for(model, kernels, self.config.model_path, lossy_bf16=self.config.dtype == "auto",
                              dot=self.config.extra.get("cpu_dot") or None)
        return FusedCpuForward(model, kernels, weights)

    def _amx_linears(self) -> bool:
        """On the amx path, run the linears as packed bfloat16 matmuls (engine/cpu/linear.py): for a
        bfloat16 model, and by default (auto) for a float32 one, whose norms, attention, KV cache and
        logits stay float32. dtype=float32 keeps every weight float32."""
        return self.config.dtype in ("auto", "bfloat16")

    def _kv_tokens_from_memory(self, device: torch.device, per_token: int) -> int:
        tokens = tokens_for_memory(self.config.kv_memory_fraction, per_token, device)
        return tokens if device.type == "cuda" else min(tokens, CPU_MAX_KV_TOKENS)
