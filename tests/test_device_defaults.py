"""Device-sized defaults: the sgl backend's sizes fill only what the user left unset; the CPU keeps its own."""

from __future__ import annotations

import argparse

from minisgl.config import (GPU_CHUNK_SIZE, GPU_MAX_RUNNING, ServerConfig, add_config_flags, config_from_args,
                            device_sized)


def parse(argv: list[str], monkeypatch, env: dict[str, str] | None = None) -> ServerConfig:
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    p = argparse.ArgumentParser()
    add_config_flags(p)
    return config_from_args(p.parse_args(argv))


def test_sgl_gets_gpu_sizes_where_nothing_was_set(monkeypatch) -> None:
    cfg = parse(["--backend", "sgl", "--workers", "2"], monkeypatch)
    sized, chosen = device_sized(cfg)
    assert sized.max_running == GPU_MAX_RUNNING and sized.chunk_size == GPU_CHUNK_SIZE
    assert sized.max_inflight_per_engine == 2 * GPU_MAX_RUNNING
    assert sized.max_inflight_total == 2 * 2 * GPU_MAX_RUNNING  # two workers
    assert set(chosen) == {"max_running", "max_inflight_per_engine", "max_inflight_total", "chunk_size"}
    # adaptive max_new_tokens starts past what the workers run at once
    assert sized.run_capacity() == 2 * GPU_MAX_RUNNING


def test_env_vars_and_flags_still_win(monkeypatch) -> None:
    cfg = parse(["--backend", "sgl", "--chunk-size", "1024"], monkeypatch, {"MAX_RUNNING": "96"})
    sized, chosen = device_sized(cfg)
    assert sized.max_running == 96 and sized.chunk_size == 1024
    assert sized.max_inflight_per_engine == 192  # derived from the user's MAX_RUNNING
    assert "max_running" not in chosen and "chunk_size" not in chosen


def test_cpu_backends_keep_their_defaults(monkeypatch) -> None:
    for backend in ("torch", "hf", "mlx"):
        cfg = parse(["--backend", backend], monkeypatch)
        sized, chosen = device_sized(cfg)
        assert sized == cfg and chosen == {}
        assert (sized.max_running, sized.chunk_size, sized.max_inflight_total) == (64, 512, 256)
