"""The hardening pieces without a server: seed mixing, the restart rule, the access guard's settings,
config flags and env vars, stale run files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from minisgl.config import ServerConfig, config_from_args
from minisgl.gateway.security import guard_middleware
from minisgl.server_handle import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from minisgl import launcher as launch  # noqa: E402


def test_seed_mixing_uses_all_64_bits() -> None:
    import torch

    from minisgl.engine.sampler import Sampler, mix_seed

    s = Sampler(torch.device("cpu"))

    def draws(seed: int) -> list[float]:
        return torch.empty(8).exponential_(generator=s.request_generator(seed)).tolist()

    assert draws(5) == draws(5)
    for other in (5 + 2**32, 5 + 2**40, 5 - 2**32, 5 + 2**62):
        assert draws(5) != draws(other), other
    assert len({mix_seed(i << 32) for i in range(1000)}) == 1000
    assert all(0 <= mix_seed(v) < 2**32 for v in (-(2**63), -1, 0, 2**63 - 1))


def test_restart_policy_backs_off_then_gives_up() -> None:
    p = launch.RestartPolicy(max_restarts=4, window_s=60)
    assert [p.on_death(t) for t in (0, 1, 2, 3)] == [0.0, 0.5, 1.0, 2.0]
    assert p.on_death(4) is None  # fifth death within the window
    q = launch.RestartPolicy(max_restarts=2, window_s=10)
    assert [q.on_death(t) for t in (0, 20, 40, 60)] == [0.0] * 4  # far apart: always the first


def app(cfg: ServerConfig) -> TestClient:
    async def ok(request):  # noqa: ANN001, ANN202
        return JSONResponse({"ok": True})

    routes = [Route(p, ok, methods=["GET", "POST"]) for p in ("/generate", "/health", "/", "/static/app.js")]
    return TestClient(Starlette(routes=routes, middleware=guard_middleware(cfg)), base_url="http://127.0.0.1:8000")


def test_guard_open_routes_and_key() -> None:
    c = app(ServerConfig(api_key="k"))
    assert c.get("/health").status_code == 200
    assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
    assert c.post("/").status_code == 401  # only page fetches are open
    r = c.post("/generate", json={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert c.post("/generate", json={}, headers={"Authorization": "bearer k"}).status_code == 200
    assert app(ServerConfig()).post("/generate", json={}).status_code == 200  # no key configured


def test_guard_hosts_and_origins_settings() -> None:
    c = app(ServerConfig())
    assert c.get("/health", headers={"Host": "localhost:8000"}).status_code == 200
    assert c.get("/health", headers={"Host": "127.0.0.1:8001"}).status_code == 403
    assert c.post("/generate", headers={"Origin": "http://localhost:8000", "Host": "localhost:8000"}).status_code == 200
    wide = app(ServerConfig(host="0.0.0.0"))
    assert wide.get("/health", headers={"Host": "my-box.lan:8000"}).status_code == 200
    assert wide.post("/generate", headers={"Host": "my-box.lan:8000", "Origin": "http://evil.example"}).status_code == 403
    named = app(ServerConfig(host="0.0.0.0", allowed_hosts=["my-box.lan:8000"]))
    assert named.get("/health", headers={"Host": "other:8000"}).status_code == 403
    cors = app(ServerConfig(allowed_origins=["https://ui.example"]))
    assert cors.post("/generate", headers={"Origin": "https://ui.example"}).status_code == 200
    pre = cors.options("/generate", headers={"Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                                             "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://ui.example"
    assert app(ServerConfig(allowed_origins=["*"])).post("/generate", headers={"Origin": "http://x.y"}).status_code == 200


def test_new_settings_are_flags_and_env_vars(monkeypatch) -> None:  # noqa: ANN001
    parser = launch.build_parser()
    monkeypatch.setenv("API_KEY", "from-env")
    monkeypatch.setenv("ALLOWED_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("MAX_BODY_BYTES", "1000")
    cfg = config_from_args(parser.parse_args(["--max-prompt-chars", "99", "--drain-grace-s", "2.5"]))
    assert cfg.api_key == "from-env" and cfg.allowed_origins == ["https://a.example", "https://b.example"]
    assert (cfg.max_body_bytes, cfg.max_prompt_chars, cfg.drain_grace_s) == (1000, 99, 2.5)
    assert config_from_args(parser.parse_args(["--api-key", "flag"])).api_key == "flag"


def test_stale_run_files_are_cleaned(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from minisgl.control import find_control_endpoint, run_info_path

    monkeypatch.setenv("MINISGL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(launch.tempfile, "gettempdir", lambda: str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_dir = tmp_path / "minisgl-dead"
    stale_dir.mkdir()
    (stale_dir / launch.PID_FILE).write_text(str(dead.pid))
    orphan_dir = tmp_path / "minisgl-orphan"  # its launcher died before writing a run file
    orphan_dir.mkdir()
    (orphan_dir / launch.PID_FILE).write_text(str(dead.pid))
    live_dir = tmp_path / "minisgl-live"
    live_dir.mkdir()
    (live_dir / launch.PID_FILE).write_text(str(os.getpid()))  # alive, but not a launcher
    foreign = tmp_path / "minisgl-foreign"  # no pid file: not ours to touch
    foreign.mkdir()
    info = run_info_path(1234)
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"pid": dead.pid, "runtime_dir": str(stale_dir), "control_endpoint": "ipc:///x"}))
    with pytest.raises(FileNotFoundError, match="not running"):
        find_control_endpoint(1234)
    assert not info.exists()
    info.write_text(json.dumps({"pid": dead.pid, "runtime_dir": str(stale_dir), "control_endpoint": "ipc:///x"}))
    launch.clean_stale()
    assert not info.exists() and not stale_dir.exists() and not orphan_dir.exists()
    assert not live_dir.exists()  # a live pid that is no launcher: reused, the dir is stale
    assert foreign.exists()


def test_supervisor_restarts_any_process_then_gives_up(tmp_path) -> None:  # noqa: ANN001
    sup = launch.Supervisor(ServerConfig(runtime_dir=str(tmp_path)))
    try:
        for child in [*sup.children, sup.gateway]:
            assert sup.on_death(child, -9, 100.0) and child.restart_at == 100.0  # first one: at once
        tokenizer = next(c for c in sup.children if c.name == "tokenizer")
        for t in (101.0, 102.0, 103.0, 104.0):
            assert sup.on_death(tokenizer, -9, t)
        assert tokenizer.restart_at == 104.0 + 4.0
        assert not sup.on_death(tokenizer, -9, 105.0)  # sixth death within 60 s: stop the tree
    finally:
        sup.ctx.destroy(linger=0)


def test_stream_coalesces_what_queued_up() -> None:
    """A stream that wakes to several queued deltas of one choice writes them as one item (same text
    and logprobs; a final item keeps its finish fields), and never merges across choices or past a
    final item."""
    import asyncio

    from minisgl.gateway.app import Stream, coalesce
    from minisgl.messages import TextOut, TokenLogprob

    lp = [TokenLogprob(token=t, logprob=-1.0) for t in "abc"]
    items = [TextOut(rid="a", text="He", logprobs=lp[:1]), TextOut(rid="a", text="ll", logprobs=lp[1:2]),
             TextOut(rid="b", text="x"), TextOut(rid="a", text="o", logprobs=lp[2:], finish_reason="stop", worker_id=3),
             TextOut(rid="a", text="late")]
    out = coalesce(items)
    assert [(o.rid, o.text) for o in out] == [("a", "Hell"), ("b", "x"), ("a", "o"), ("a", "late")]
    assert [e.token for e in out[0].logprobs] == ["a", "b"]
    assert coalesce(items[:2] + items[3:4])[0].finish_reason == "stop"
    merged = coalesce([items[0], items[1], items[3]])
    assert len(merged) == 1 and merged[0].text == "Hello" and merged[0].worker_id == 3
    assert [e.token for e in merged[0].logprobs] == ["a", "b", "c"]

    async def drain() -> list[str]:
        stream = Stream("a", asyncio.Queue(), 0.0, choices=["a"])
        for item in items[:2]:
            stream.queue.put_nowait(item)
        return [i.text for i in stream.drain()] + [str(stream.queue.qsize())]

    assert asyncio.run(drain()) == ["He", "ll", "0"]
