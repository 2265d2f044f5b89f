"""Shared fixtures: the embedded default model and real server trees started through launch.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from minisgl.server_handle import ServerHandle


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from minisgl.assets.embedded import ensure_default_model

    return ensure_default_model(quiet=True)


def start_server(args: list[str], tmp_path_factory: pytest.TempPathFactory, name: str,
                 env: dict[str, str] | None = None) -> ServerHandle:
    log = tmp_path_factory.mktemp(name) / "server.log"
    handle = ServerHandle(args, env=env, log_path=str(log))
    try:
        return handle.start()
    except Exception:
        print(log.read_text()[-5000:])
        raise


def tree_pids(pid: int) -> list[int]:
    """The launcher and every process below it."""
    try:
        root = psutil.Process(pid)
        return [pid] + [p.pid for p in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def stream_generate(url: str, body: dict, timeout: float = 120.0) -> tuple[str, list[dict]]:
    """POST /generate and return (text, all JSON events)."""
    events: list[dict] = []
    with httpx.stream("POST", url + "/generate", json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.strip():
                events.append(json.loads(line))
    text = "".join(e.get("text_delta", "") for e in events)
    return text, events


def wait_for(predicate, timeout: float, interval: float = 0.2):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def scheduler_metrics(url: str) -> dict:
    return httpx.get(url + "/metrics", headers={"Accept": "application/json"}, timeout=10).json()["scheduler"]


@pytest.fixture(scope="session")
def default_server(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """One server on the default backend for the API tests that do not disturb it."""
    handle = start_server([], tmp_path_factory, "default-server")
    yield handle
    handle.stop()
