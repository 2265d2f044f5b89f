"""What every worker backend implements, and the registry that picks one by name.

The worker process (procs/worker.py) owns the sockets; a backend owns the model and the KV state and
knows nothing about ZeroMQ. The worker loop is:

    while True:
        for msg in incoming (blocking only when not backend.has_work()):
            add / abort / insert_prefix / flush_cache
        if backend.has_work():
            out = backend.step()          # one engine step: every running request advances
            send TokenBatch(out.outputs) to the tokenizer, WorkerStatus to the scheduler
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable

from minisgl.messages import TokenizedReq, TokenOut


@dataclass(frozen=True)
class BackendConfig:
    model_path: str  # local Hugging Face style checkpoint directory
    device: str = "cpu"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    max_running: int = 64  # requests decoded together at most
    kv_cache_tokens: int = 0  # KV pool size in tokens; 0 = derive from memory fraction
    kv_memory_fraction: float = 0.3  # of free device (or host) memory, when kv_cache_tokens is 0
    chunk_size: int = 512  # prefill token budget per engine step (chunked prefill)
    max_model_len: int = 0  # 0 = model's max_position_embeddings
    hf_concurrency: int = 16  # hf backend: generate() threads at once
    narrate: bool = False  # log each prefill / decode step in plain words
    seed: int = 0
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class BackendStats:
    running: int = 0
    waiting: int = 0
    kv_used_tokens: int = 0
    kv_total_tokens: int = 0
    cached_tokens_total: int = 0
    prompt_tokens_total: int = 0


@dataclass
class StepOutput:
    # one item per request that produced tokens or finished this step; the last item of a request
    # has finish_reason set ("stop", "length", "abort", "error") and its usage counts filled in.
    outputs: list[TokenOut] = field(default_factory=list)
    # rids that left the backend this step (including warm-up requests, which emit no outputs)
    finished: list[str] = field(default_factory=list)
    # prefix cache changes, as full token sequences from the root, for the scheduler's index
    cache_inserted: list[list[int]] = field(default_factory=list)
    cache_evicted: list[list[int]] = field(default_factory=list)


class Backend(abc.ABC):
    name: str = "base"

    def __init__(self, config: BackendConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def add_request(self, req: TokenizedReq) -> None:
        """Queue a request. Warm-up requests (req.warmup) are prefilled, cached, and emit nothing."""

    @abc.abstractmethod
    def abort(self, rid: str) -> None:
        """Stop a request and free its KV now; its final item (finish_reason "abort") comes in the next
        step. Unknown rids are ignored."""

    @abc.abstractmethod
    def has_work(self) -> bool: ...

    @abc.abstractmethod
    def step(self) -> StepOutput:
        """Advance every running request by one engine step (may block briefly for the hf backend)."""

    def insert_prefix(self, input_ids: list[int]) -> None:
        """Prefill input_ids and keep them in the prefix cache (no-op where there is no cache)."""

    def flush_cache(self) -> None:
        """Drop every unreferenced cached prefix."""

    @abc.abstractmethod
    def stats(self) -> BackendStats: ...

    def max_context_len(self) -> int:
        """Longest prompt + generation the backend can hold for one request."""
        return 0

    def shutdown(self) -> None:
        pass


class EngineBackend(Backend):
    """A backend whose work is done by our engine (minisgl.engine.Engine): `torch` and `sgl` differ only
    in how they build it, so every call here just forwards to `self.engine`."""

    engine: Any  # minisgl.engine.engine.Engine, imported lazily by the subclasses

    def add_request(self, req: TokenizedReq) -> None:
        self.engine.add_request(req)

    def abort(self, rid: str) -> None:
        self.engine.abort(rid)

    def has_work(self) -> bool:
        return self.engine.has_work()

    def step(self) -> StepOutput:
        return self.engine.step()

    def insert_prefix(self, input_ids: list[int]) -> None:
        self.engine.insert_prefix(input_ids)

    def flush_cache(self) -> None:
        self.engine.flush_cache()

    def stats(self) -> BackendStats:
        return self.engine.stats()

    def max_context_len(self) -> int:
        return self.engine.max_context_len


BACKENDS: dict[str, Callable[[BackendConfig], Backend]] = {}


def register_backend(name: str) -> Callable[[type[Backend]], type[Backend]]:
    def wrap(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return wrap


def create_backend(name: str, config: BackendConfig) -> Backend:
    # Import lazily so that a CPU-only machine never imports CUDA or MLX code it cannot run.
    import importlib

    modules = {"hf": "minisgl.backends.hf", "torch": "minisgl.backends.torch_backend",
               "sgl": "minisgl.backends.sgl", "mlx": "minisgl.backends.mlx_backend"}
    if name not in modules:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(modules)}")
    importlib.import_module(modules[name])
    return BACKENDS[name](config)


def default_backend_name() -> str:
    """sgl on CUDA, mlx on Apple silicon with MLX installed, else torch."""
    try:
        import torch

        if torch.cuda.is_available():
            return "sgl"
        if torch.backends.mps.is_available():
            import importlib.util

            if importlib.util.find_spec("mlx_lm") is not None:
                return "mlx"
    except ImportError:
        pass
    return "torch"
