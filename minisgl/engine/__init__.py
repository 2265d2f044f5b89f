"""The continuous-batching engine: request state, scheduling, paged attention, sampling."""

from minisgl.engine.engine import Engine, EngineConfig

__all__ = ["Engine", "EngineConfig"]
