"""What every worker backend implements (the registry that names them is registry.py).

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
import importlib
from typing import Any

from minisgl.backend_registry import BACKENDS, check_backend_name
from minisgl.config import BackendConfig
from minisgl.engine.output import StepOutput
from minisgl.messages import LoadStats, TokenizedReq

__all__ = ["Backend", "BackendConfig", "EngineBackend", "LoadStats", "StepOutput", "create_backend"]


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
    def stats(self) -> LoadStats: ...

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

    def stats(self) -> LoadStats:
        return self.engine.stats()

    def max_context_len(self) -> int:
        return self.engine.max_context_len


def create_backend(name: str, config: BackendConfig) -> Backend:
    """The backend named in the registry, its module imported only now."""
    spec = BACKENDS[check_backend_name(name)]
    cls = getattr(importlib.import_module(spec.module), spec.cls)
    cls.name = name
    return cls(config)
