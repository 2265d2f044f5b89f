"""The process tree as a whole: worker crashes, shutdown, no orphans, servers side by side."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import psutil

from tests.conftest import alive, start_server, stream_generate, tree_pids, wait_for

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def worker_pids(launcher_pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(launcher_pid).children(recursive=True)
            if "procs.worker" in " ".join(p.cmdline())]


def test_killed_worker_fails_inflight_then_recovers(default_model_dir, tmp_path_factory) -> None:
    server = start_server([], tmp_path_factory, "kill-worker")
    try:
        body = {"prompt": "Tell me a very long story.", "max_new_tokens": 2000, "ignore_eos": True}
        events = []
        with httpx.stream("POST", server.url + "/generate", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.strip():
                    continue
                events.append(json.loads(line))
                if len(events) == 3:
                    (pid,) = worker_pids(server.pid)
                    os.kill(pid, signal.SIGKILL)
        assert events[-1]["event"] == "error", events[-3:]
        assert "died" in events[-1]["error"]
        # The supervisor restarts the worker; the next request waits in the queue and succeeds.
        text, done = stream_generate(server.url, {"messages": CAPITAL, "max_new_tokens": 16}, timeout=180)
        assert "Paris" in text and done[-1]["event"] == "done"
        assert len(worker_pids(server.pid)) == 1
    finally:
        server.stop()


def test_two_servers_side_by_side_and_clean_shutdown(default_model_dir, tmp_path_factory) -> None:
    a = start_server(["--backend", "hf"], tmp_path_factory, "side-a")
    b = start_server(["--backend", "hf"], tmp_path_factory, "side-b")
    try:
        pids = tree_pids(a.pid) + tree_pids(b.pid)
        assert len(pids) >= 10, pids  # launcher + scheduler + tokenizer + worker + gateway, twice
        for s in (a, b):
            text, _ = stream_generate(s.url, {"messages": CAPITAL, "max_new_tokens": 16})
            assert "Paris" in text
    finally:
        t0 = time.monotonic()
        assert a.stop() == 0
        assert b.stop() == 0
    assert time.monotonic() - t0 < 15, "shutdown took too long"
    for s in (a, b):  # the workers ended on the launcher's Shutdown, not on its SIGTERM
        assert "stopping: the launcher sent Shutdown" in Path(s.log_path).read_text()
    assert wait_for(lambda: not alive(pids), timeout=5), f"left behind: {alive(pids)}"


def test_sigkilled_launcher_leaves_no_orphans(default_model_dir, tmp_path_factory) -> None:
    server = start_server(["--backend", "hf"], tmp_path_factory, "kill-launcher")
    pids = tree_pids(server.pid)
    assert len(pids) >= 5
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait()
    assert wait_for(lambda: not alive(pids), timeout=10), f"orphans: {alive(pids)}"


def test_port_in_use_fails_fast_with_clear_error(default_model_dir) -> None:
    import socket
    import subprocess
    import sys

    from minisgl.server_handle import REPO_ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr


def test_bad_configuration_is_one_clear_line(default_model_dir) -> None:
    import subprocess
    import sys

    from minisgl.server_handle import REPO_ROOT

    r = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "--scheduler-mode", "best_effort",
                        "--port", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "SCHEDULER_MODE" in r.stderr and "Traceback" not in r.stderr


def test_server_started_by_a_killed_caller_stops(default_model_dir, tmp_path) -> None:
    """A caller (a test run, the CLI demo, the bench) that starts a server through ServerHandle and is
    then killed outright leaves nothing running: the launcher was started with --exit-with-parent."""
    import subprocess
    import sys

    from minisgl.server_handle import REPO_ROOT

    script = ("import sys; from minisgl.server_handle import ServerHandle\n"
              "h = ServerHandle(['--backend', 'hf'], log_path=sys.argv[1]).start()\n"
              "print(h.pid, flush=True); import time; time.sleep(600)\n")
    caller = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "server.log")], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        launcher = int(caller.stdout.readline())
        pids = tree_pids(launcher)
        assert len(pids) >= 5, pids
    finally:
        caller.kill()
        caller.wait()
    assert wait_for(lambda: not alive(pids), timeout=20), f"left running: {alive(pids)}"
