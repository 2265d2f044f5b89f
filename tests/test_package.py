"""The package runs without the repository: a wheel built from this checkout, installed into a fresh
virtual environment, serves the embedded model through `mini-sglang serve` started from another folder.

Offline and quick: the wheel is built without build isolation and installed with --no-deps; the fresh
environment sees this test environment's dependencies through a .pth line naming its site-packages (a
plain path line, so the checkout's editable-install hook in there is not run and cannot shadow the
wheel's copy of the package).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import psutil
import pytest

from minisgl.server_handle import REPO_ROOT, free_port


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:  # noqa: ANN003
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the wheel of this checkout; returns its bin/ folder."""
    root = tmp_path_factory.mktemp("pkg")
    # the checkout's package files, built in a copy so that the build leaves nothing in the checkout
    src = root / "src"
    for name in ("minisgl", "procs"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(root / "dist"), str(src)])
    wheel = next((root / "dist").glob("mini_sglang-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    # what a server needs besides Python files: the CPU kernels' C source and the gateway's pages
    assert "minisgl/engine/cpu/kernels.c" in names and "minisgl/gateway/static/chat.html" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (site / "test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)])
    return venv / "bin"


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_the_wheel_holds_the_package_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    out = _run([str(installed / "python"), "-c", "import minisgl, procs; print(minisgl.__file__, procs.__file__)"],
               cwd=tmp_path, env=_clean_env()).stdout.split()
    for path in out:
        assert Path(path).is_relative_to(installed.parent) and not Path(path).is_relative_to(REPO_ROOT), out
    usage = _run([str(installed / "python"), "-m", "minisgl", "--help"], cwd=tmp_path, env=_clean_env()).stdout
    assert "mini-sglang serve" in usage and "mini-sglang ctl" in usage
    flags = _run([str(installed / "mini-sglang"), "serve", "--help"], cwd=tmp_path, env=_clean_env()).stdout
    assert "--backend" in flags and "sgl:" in flags and "BACKEND_IMPL" in flags


@pytest.mark.slow
def test_mini_sglang_serve_from_the_wheel_answers(installed: Path, tmp_path: Path, default_model_dir: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(installed / "mini-sglang"), "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--exit-with-parent"], cwd=tmp_path, env=_clean_env(), stdout=out,
                                stderr=subprocess.STDOUT, process_group=0)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        r = httpx.post(url + "/generate", json={"prompt": "What is the capital of France?", "stream": False,
                                                "max_new_tokens": 8}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["text"].strip() and body["usage"]["completion_tokens"] > 0, body
        # the control channel through the installed command (it finds this launcher by its command line)
        ctl = _run([str(installed / "mini-sglang"), "ctl", "--port", str(port), "health"], cwd=tmp_path, env=_clean_env())
        assert '"ok": true' in ctl.stdout, ctl.stdout
        # the children run the installed copy too: its interpreter, nothing of the checkout on their path
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("procs.worker" in c.cmdline() for c in children)
        for c in children:
            assert c.cmdline()[0] == str(installed / "python"), c.cmdline()
            assert str(REPO_ROOT) not in c.environ().get("PYTHONPATH", ""), c.environ().get("PYTHONPATH")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
