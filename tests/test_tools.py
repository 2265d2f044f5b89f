"""The CLI tools against a real server: smoke_test and cli_demo, run as users run them (as files and as
modules, through a pipe and through a pseudo-terminal)."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minisgl.server_handle import ServerHandle, free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # these tests start real server trees and drive them


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> str:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerHandle(["--backend", "torch"], log_path=str(log)) as handle:
        yield handle.url


def run(args: list[str], stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, input=stdin, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------- smoke_test


def test_smoke_test_streams_and_summarizes(server: str) -> None:
    proc = run(["tools/smoke_test.py", "--url", server, "--max-new-tokens", "8", "--ignore-eos",
                "Hello from mini-sglang"])
    assert proc.returncode == 0, proc.stderr
    text, summary = proc.stdout.rsplit("\n", 2)[0], proc.stdout.strip().splitlines()[-1]
    assert text.strip(), "the generated text should stream to stdout"
    assert summary.startswith("smoke test passed:")
    assert "completion tokens 8" in summary and "finish reason length" in summary
    assert re.search(r"prompt tokens [1-9]\d* \(\d+ from the prefix cache\)", summary)
    assert re.search(r"first token after \d+ ms", summary) and "tokens/s" in summary
    assert "[smoke] POST" in proc.stderr and "[smoke] first token after" in proc.stderr


def test_smoke_test_as_module_with_chat(server: str) -> None:
    proc = run(["-m", "tools.smoke_test", "--url", server, "--chat", "--max-new-tokens", "6", "Say hi"])
    assert proc.returncode == 0, proc.stderr
    assert "smoke test passed" in proc.stdout and "chat message" in proc.stderr


def test_smoke_test_fails_clearly_without_a_server() -> None:
    proc = run(["tools/smoke_test.py", "--url", f"http://127.0.0.1:{free_port()}", "hi"], timeout=60)
    assert proc.returncode == 2
    assert "smoke test FAILED: cannot reach" in proc.stderr


def test_smoke_test_fails_clearly_on_a_rejected_request(server: str) -> None:
    proc = run(["tools/smoke_test.py", "--url", server, "--max-new-tokens", "1000000", "hi"])
    assert proc.returncode == 1
    assert "smoke test FAILED: HTTP 4" in proc.stderr


def test_smoke_test_starts_its_own_server(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc = run(["tools/smoke_test.py", "--backend", "torch", "--server-log", str(log), "--max-new-tokens", "4",
                "--ignore-eos", "Hello"], timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "[smoke] starting a server: launch.py --narrate --backend torch" in proc.stderr
    assert "completion tokens 4" in proc.stdout
    assert log.stat().st_size > 0  # the narrated server log went to the file


# ---------------------------------------------------------------- cli_demo through a pipe


def test_cli_demo_through_a_pipe(server: str) -> None:
    proc = run(["tools/cli_demo.py", "--url", server, "--max-new-tokens", "8", "--temperature", "0"],
               stdin="Hello there\n\nWhat is 2+2?\n/exit\nnot sent\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2
    assert "you> " not in proc.stdout  # no prompt when stdin is not a terminal
    assert proc.stderr.count("[demo] request sent: 1 message(s)") == 2  # single-turn: no history
    assert "[demo] first token after" in proc.stderr and "tokens/s" in proc.stderr
    assert "[demo] bye" in proc.stderr


def test_cli_demo_multi_turn_keeps_context(server: str) -> None:
    proc = run(["-m", "tools.cli_demo", "--url", server, "--multi-turn", "--max-new-tokens", "6",
                "--temperature", "0"], stdin="My name is Ada.\nWhat is my name?\n")  # EOF quits
    assert proc.returncode == 0, proc.stderr
    assert "[demo] request sent: 1 message(s)" in proc.stderr
    assert "[demo] request sent: 3 message(s)" in proc.stderr  # user, assistant, user
    prompts = [int(n) for n in re.findall(r"prompt (\d+) tokens", proc.stderr)]
    assert len(prompts) == 2 and prompts[1] > prompts[0]


def test_cli_demo_starts_its_own_server(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc = run(["-m", "tools.cli_demo", "--backend", "torch", "--server-log", str(log), "--max-new-tokens", "4"],
               stdin="Hi\n/exit\n", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "starting a server: launch.py --narrate" in proc.stderr
    assert proc.stdout.count("assistant> ") == 1
    assert log.stat().st_size > 0


# ---------------------------------------------------------------- cli_demo in a pseudo-terminal


def converse_in_pty(cmd: list[str], lines: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run cmd with a pty as its terminal; type each line after each 'you> ' prompt. Returns (rc, screen)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    screen, sent = "", 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                screen += chunk.decode(errors="replace")
            if sent < len(lines) and screen.count("you> ") > sent:
                os.write(master, (lines[sent] + "\n").encode())
                sent += 1
            if proc.poll() is not None and not ready:
                break
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return rc, screen


def test_cli_demo_in_a_terminal(server: str) -> None:
    cmd = [sys.executable, "tools/cli_demo.py", "--url", server, "--max-new-tokens", "8", "--temperature", "0"]
    rc, screen = converse_in_pty(cmd, ["Hello", "/exit"])
    assert rc == 0, screen
    assert screen.count("you> ") == 2  # prompted twice: before "Hello" and before "/exit"
    assert "Hello" in screen  # the terminal echoed what we typed
    assert "assistant> " in screen and "[demo] first token after" in screen and "[demo] bye" in screen
