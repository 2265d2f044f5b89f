#!/usr/bin/env python3
"""Start, supervise and stop the whole mini-sglang process tree.

    python launch.py                       # embedded SmolLM2-135M-Instruct on 127.0.0.1:8000
    python launch.py --backend hf          # the plain Hugging Face baseline, same gateway
    python launch.py --workers 2 --scheduler-mode cache_aware

Every flag's default comes from the environment variable named in --help. The launcher starts the
scheduler, tokenizer and workers, waits until each reports ready, then starts the gateway (so /health
answering means the whole tree is up). A worker that dies is restarted and its in-flight requests end
with an error event; any other child dying, Ctrl-C or SIGTERM stops the whole tree. Children die with
the launcher even if it is killed with SIGKILL (PR_SET_PDEATHSIG), so nothing is left orphaned.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq

REPO_ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))

from minisgl import ipc  # noqa: E402
from minisgl.control import run_info_path  # noqa: E402
from minisgl.config import ServerConfig, add_config_flags, config_from_args  # noqa: E402
from minisgl.messages import Codec, LauncherInMsg, ProcReady, WorkerDied  # noqa: E402

log = logging.getLogger("minisgl.launch")

READY_TIMEOUT_S = 600.0
MAX_RESTARTS = 5  # per worker within RESTART_WINDOW_S, then give up and stop the tree
RESTART_WINDOW_S = 60.0


@dataclass
class Child:
    name: str
    module: str
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    @property
    def is_worker(self) -> bool:
        return self.name.startswith("worker-")


class Supervisor:
    def __init__(self, cfg: ServerConfig, parent_pid: int | None = None) -> None:
        self.cfg = cfg
        self.parent_pid = parent_pid  # stop the tree once this process is gone (--exit-with-parent)
        self.ctx = zmq.Context()
        self.ready_sock = ipc.bind_pull(self.ctx, cfg.endpoint("launcher"))
        self.to_scheduler = ipc.connect_push(self.ctx, cfg.endpoint("scheduler"))
        self.codec = Codec(LauncherInMsg)
        self.children: list[Child] = [Child("scheduler", "procs.scheduler"), Child("tokenizer", "procs.tokenizer")]
        self.children += worker_children(cfg)
        self.gateway = Child("gateway", "procs.gateway")
        self.stopping = False
        self.run_info: Path | None = None

    # ------------------------------------------------------------ processes

    def spawn(self, child: Child) -> None:
        env = {**os.environ, "MINISGL_CONFIG": self.cfg.to_json(), "MINISGL_PARENT_PID": str(os.getpid()),
               "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        # Own process group: Ctrl-C in the terminal reaches only the launcher, which stops children in order.
        child.proc = subprocess.Popen([sys.executable, "-m", child.module, *child.args], cwd=REPO_ROOT, env=env,
                                      process_group=0)
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    def parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def wait_ready(self, names: set[str], timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while names:
            if self.stopping:
                raise SystemExit(0)
            if self.parent_gone():
                raise RuntimeError(f"the process that started the server (pid {self.parent_pid}) is gone")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {sorted(names)} to start")
            for child in self.children + [self.gateway]:
                if child.name in names and child.proc is not None and child.proc.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with code {child.proc.returncode} during start-up")
            if self.ready_sock.poll(200):
                msg: ProcReady = self.codec.decode(self.ready_sock.recv())
                names.discard(msg.name)
                log.info("%s ready %s", msg.name, " ".join(f"{k}={v}" for k, v in msg.info.items() if v))

    def start(self) -> None:
        for child in self.children:
            self.spawn(child)
        self.wait_ready({c.name for c in self.children})
        self.spawn(self.gateway)
        self.wait_ready({"gateway"})
        self.write_run_info()

    def write_run_info(self) -> None:
        """Let `python -m tools.ctl --port N` find this server's control endpoint."""
        info = {"pid": os.getpid(), "url": f"http://{self.cfg.host}:{self.cfg.port}", "runtime_dir": self.cfg.runtime_dir,
                "control_endpoint": self.cfg.control_endpoint if self.cfg.zmq_control else None}
        self.run_info = run_info_path(self.cfg.port)
        self.run_info.parent.mkdir(parents=True, exist_ok=True)
        self.run_info.write_text(json.dumps(info))

    def supervise(self) -> int:
        while not self.stopping:
            if self.parent_gone():
                log.error("the process that started the server (pid %d) is gone; stopping", self.parent_pid)
                return 1
            if self.ready_sock.poll(200):  # restarted workers report in here
                msg: ProcReady = self.codec.decode(self.ready_sock.recv())
                log.info("%s ready again", msg.name)
            for child in self.children + [self.gateway]:
                code = child.proc.poll() if child.proc else None
                if code is None or self.stopping:
                    continue
                if not child.is_worker:
                    log.error("%s exited with code %s; stopping the server", child.name, code)
                    return 1
                if not self.restart_worker(child, code):
                    return 1
        return 0

    def restart_worker(self, child: Child, code: int) -> bool:
        worker_id = worker_index(child)
        log.error("%s exited with code %s; failing its requests and restarting it", child.name, code)
        ipc.send(self.to_scheduler, WorkerDied(worker_id, code))
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(child.restarts) > MAX_RESTARTS:
            log.error("%s died %d times within %.0fs; giving up", child.name, len(child.restarts), RESTART_WINDOW_S)
            return False
        for c in tp_group_for_restart(self.children, child):  # just `child` unless TP > 1
            self.spawn(c)
        return True

    def shutdown(self) -> None:
        """SIGTERM everyone (gateway first, so no new work arrives), then SIGKILL whoever lingers."""
        procs = [c.proc for c in [self.gateway, *reversed(self.children)] if c.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5.0
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.cfg.runtime_dir, ignore_errors=True)
        if self.run_info is not None:
            self.run_info.unlink(missing_ok=True)


# ---------------------------------------------------------------- tensor-parallel worker groups


def worker_index(child: Child) -> int:
    return int(child.name.split("-")[1])  # worker-3, or worker-3-tp1 for its TP rank 1


def worker_children(cfg: ServerConfig) -> list[Child]:
    """One process per worker, or with --tp N, N per worker: rank 0 (`worker-i`, the one the scheduler
    talks to) and ranks 1..N-1 (`worker-i-tpR`)."""
    children = []
    for i in range(cfg.workers):
        children.append(Child(f"worker-{i}", "procs.worker", ["--worker-id", str(i)]))
        children += [Child(f"worker-{i}-tp{r}", "procs.worker", ["--worker-id", str(i), "--tp-rank", str(r)])
                     for r in range(1, cfg.tp)]
    return children


def tp_group_for_restart(children: list[Child], dead: Child) -> list[Child]:
    """The processes to start again after `dead` died: its whole TP group (the survivors would wait in
    a collective forever), stopped first, each told a new rendezvous generation. Same worker id and
    ranks, so the same devices."""
    group = [c for c in children if c.is_worker and worker_index(c) == worker_index(dead)]
    if len(group) == 1:
        return group
    for c in group:
        if c.proc is not None and c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()
    gen = max(int(c.args[c.args.index("--tp-gen") + 1]) if "--tp-gen" in c.args else 0 for c in group) + 1
    for c in group:
        if "--tp-gen" in c.args:
            c.args = c.args[:c.args.index("--tp-gen")]
        c.args = c.args + ["--tp-gen", str(gen)]
    log.info("restarting the TP group of worker-%d (%d ranks)", worker_index(dead), len(group))
    return group


# ---------------------------------------------------------------- configuration


def resolve_config(cfg: ServerConfig) -> ServerConfig:
    """Fill in what depends on this machine: model directory, backend, worker count, runtime dir."""
    from minisgl.backends.base import default_backend_name
    from minisgl.models.fetch import resolve_model_dir
    from minisgl.scheduler.policy import make_policy

    make_policy(cfg.scheduler_mode)  # fail fast on a bad mode
    model_dir = resolve_model_dir(cfg.model_name, cfg.model_local_dir)
    backend = default_backend_name() if cfg.backend in ("", "auto") else cfg.backend
    if backend not in ("torch", "sgl", "mlx", "hf"):
        raise ValueError(f"unknown BACKEND_IMPL {backend!r}; choose auto, torch, sgl, mlx or hf")
    workers = cfg.workers
    if cfg.enable_multi_device:
        import torch

        # with --tp N: one worker per N devices
        workers = max(1, torch.cuda.device_count() // cfg.tp) if torch.cuda.is_available() else workers
    from minisgl.distributed.checks import check_tp_request

    check_tp_request(cfg.tp, workers, backend, cfg.device, model_dir)
    check_port_free(cfg.host, cfg.port)
    runtime_dir = cfg.runtime_dir or tempfile.mkdtemp(prefix="minisgl-")
    os.chmod(runtime_dir, 0o700)  # the sockets inside accept anyone who can reach them
    served = cfg.served_model_name or cfg.model_name or model_dir.name
    return msgspec.structs.replace(cfg, model_path=str(model_dir), backend=backend, workers=workers,
                                   runtime_dir=runtime_dir, served_model_name=served)


def check_port_free(host: str, port: int) -> None:
    """Fail before loading any model when the HTTP port is taken (the gateway binds it last)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror}; is another server running there?") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py", description=__doc__.split("\n\n")[0],
        epilog="Each flag's default comes from the environment variable shown; the flag wins over the variable.",
    )
    add_config_flags(parser)
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop the server when the process that started it exits (tests, the CLI demo and "
                             "the bench start servers this way, so a killed caller leaves nothing behind)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parent_pid = os.getppid()  # before anything slow: if the caller dies meanwhile, we still notice
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    ipc.setup_logging(cfg.log_level, "launch")
    try:
        cfg = resolve_config(cfg)
    except Exception as e:  # noqa: BLE001 - a configuration problem gets one clear line, not a traceback
        log.error("%s", e)
        return 2
    sup = Supervisor(cfg, parent_pid if args.exit_with_parent else None)

    def on_signal(signum: int, frame: object) -> None:
        if not sup.stopping:
            log.info("received %s; stopping", signal.Signals(signum).name)
        sup.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 1
    try:
        sup.start()
        print(f"mini-sglang ready on http://{cfg.host}:{cfg.port} (model {cfg.served_model_name}, backend "
              f"{cfg.backend}, {cfg.workers} worker(s))", flush=True)
        code = sup.supervise()
    except SystemExit as e:
        code = int(e.code or 0)
    except Exception as e:  # noqa: BLE001
        log.error("%s", e)
        code = 1
    finally:
        sup.shutdown()
    return 0 if sup.stopping else code  # a requested stop is a clean exit


if __name__ == "__main__":
    sys.exit(main())
