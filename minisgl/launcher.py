"""Start, supervise and stop the whole mini-sglang process tree.

    mini-sglang serve                      # embedded SmolLM2-135M-Instruct on 127.0.0.1:8000
    mini-sglang serve --backend hf         # the plain Hugging Face baseline, same gateway
    mini-sglang serve --workers 2 --scheduler-mode cache_aware

(`python -m minisgl serve` and, in a checkout, `python launch.py` are the same.)

Every flag's default comes from the environment variable named in --help. The launcher starts the
scheduler, tokenizer and workers, waits until each reports ready, then starts the gateway (so /health
answering means the whole tree is up). Any child that dies (worker, scheduler, tokenizer, gateway) is
restarted under one rule (RestartPolicy: a growing delay, and the tree stops cleanly once a process
died MAX_RESTARTS times within RESTART_WINDOW_S); the restarted process tells its neighbours, and the
requests it held end with an error event. SIGTERM / Ctrl-C drain: the gateway stops taking requests and
gives open streams DRAIN_GRACE_S to finish, then ends each with an error event; then the rest stops.
Children die with the launcher even if it is killed with SIGKILL (PR_SET_PDEATHSIG), so nothing is left
orphaned, and what such a launcher leaves on disk (runtime dir, run/port-N.json) is removed by the next
one to start.
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

from minisgl import ipc
from minisgl.backend_registry import BACKENDS, backend_help, check_backend_name, default_backend_name
from minisgl.config import ServerConfig, add_config_flags, config_from_args, device_sized
from minisgl.control import launcher_alive, run_info_path
from minisgl.messages import LauncherInMsg, ProcReady, Shutdown, WorkerDied

# The folder holding the minisgl and procs packages: a checkout, or site-packages once installed. Children
# run `python -m procs.<name>`; a checkout that is not installed needs this folder on their path.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("minisgl.launch")

READY_TIMEOUT_S = 600.0
MAX_RESTARTS = 5  # per process within RESTART_WINDOW_S, then give up and stop the tree
RESTART_WINDOW_S = 60.0
STOP_TIMEOUT_S = 5.0  # after SIGTERM (and the gateway's drain), SIGKILL
WORKER_STOP_S = 2.0  # workers sent Shutdown get this long to leave on their own, then SIGTERM
PID_FILE = "launcher.pid"  # in the runtime dir: whose it is, so a dead launcher's dir can be told apart


class RestartPolicy:
    """The one restart rule for every process: the first restart is immediate, each further one within
    the window waits twice as long (0.5 s, 1 s, 2 s, ...), and more than max_restarts within the window
    means the process cannot run here: give up."""

    def __init__(self, max_restarts: int = MAX_RESTARTS, window_s: float = RESTART_WINDOW_S) -> None:
        self.max_restarts, self.window_s = max_restarts, window_s
        self.deaths: list[float] = []

    def on_death(self, now: float) -> float | None:
        """Seconds to wait before the restart, or None to give up."""
        self.deaths = [t for t in self.deaths if now - t < self.window_s] + [now]
        n = len(self.deaths)
        if n > self.max_restarts:
            return None
        return 0.0 if n == 1 else 0.5 * 2 ** (n - 2)


@dataclass
class Child:
    name: str
    module: str
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    restart_at: float | None = None  # dead, to be started again at this time.monotonic()
    last_pid: int = 0

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
        self.decoder = ipc.FrameDecoder(LauncherInMsg, "launcher")
        self.children: list[Child] = [Child("scheduler", "procs.scheduler"), Child("tokenizer", "procs.tokenizer")]
        self.children += worker_children(cfg)
        self.gateway = Child("gateway", "procs.gateway")
        self.stopping = False
        self.run_info: Path | None = None

    # ------------------------------------------------------------ processes

    def spawn(self, child: Child, restart: bool = False) -> None:
        env = {**os.environ, "MINISGL_CONFIG": self.cfg.to_json(), "MINISGL_PARENT_PID": str(os.getpid()),
               ipc.RESTARTED_ENV: "1" if restart else "0"}
        if PACKAGE_ROOT.name != "site-packages":
            env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        # Own process group: Ctrl-C in the terminal reaches only the launcher, which stops children in order.
        child.proc = subprocess.Popen([sys.executable, "-m", child.module, *child.args], env=env, process_group=0)
        child.last_pid = child.proc.pid
        log.info("%s %s (pid %d)", "restarted" if restart else "started", child.name, child.proc.pid)

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
                msg: ProcReady | None = self.decoder.decode(self.ready_sock.recv())
                if msg is None:
                    continue
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
            if self.ready_sock.poll(100):  # restarted processes report in here
                msg = self.decoder.decode(self.ready_sock.recv())
                if msg is not None:
                    log.info("%s ready again", msg.name)
            now = time.monotonic()
            for child in self.children + [self.gateway]:
                if self.stopping:
                    break
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        child.restart_at = None
                        self.spawn(child, restart=True)
                    continue
                code = child.proc.poll() if child.proc else None
                if code is not None and not self.on_death(child, code, now):
                    return 1
        return 0

    def on_death(self, child: Child, code: int, now: float) -> bool:
        """Schedule the restart of a dead child (a worker's whole TP group with it); False when it died
        too often (stop the tree)."""
        group = [child]
        if child.is_worker:  # fail (or re-queue) its requests now, not when the new one is up
            wid = worker_index(child)
            rank0 = next((c for c in self.children if c.name == f"worker-{wid}"), child)
            ipc.send(self.to_scheduler, WorkerDied(wid, code, pid=rank0.last_pid))  # the scheduler knows rank 0
        delay = child.policy.on_death(now)
        if delay is None:
            log.error("%s exited with code %s: %d deaths within %.0fs; giving up and stopping the server",
                      child.name, code, len(child.policy.deaths), RESTART_WINDOW_S)
            return False
        if child.is_worker:
            group = tp_group_for_restart(self.children, child)  # just `child` unless TP > 1
        log.error("%s exited with code %s; restarting it in %.1fs", child.name, code, delay)
        for c in group:
            c.proc = None
            c.restart_at = now + delay
        return True

    def shutdown(self) -> None:
        """The gateway first: SIGTERM makes it drain (no new requests, open streams get DRAIN_GRACE_S,
        then an error event each) while everything behind it still serves; then SIGTERM the rest, and
        SIGKILL whoever lingers."""
        self.stop_procs([self.gateway], self.cfg.drain_grace_s + STOP_TIMEOUT_S)
        self.stop_workers()
        self.stop_procs(list(reversed(self.children)), STOP_TIMEOUT_S)
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.cfg.runtime_dir, ignore_errors=True)
        if self.run_info is not None:
            self.run_info.unlink(missing_ok=True)

    def stop_workers(self) -> None:
        """Send each worker (rank 0 of each TP group) a Shutdown and give them WORKER_STOP_S to end their
        loops, shut their backends down and exit; whoever is still there gets SIGTERM next."""
        ranks = [c for c in self.children if c.is_worker and c.proc is not None and c.proc.poll() is None]
        for c in ranks:
            if "-tp" not in c.name:
                sock = ipc.connect_push(self.ctx, self.cfg.endpoint(c.name))
                try:
                    ipc.send(sock, Shutdown(), zmq.NOBLOCK)
                except zmq.Again:  # not reachable: SIGTERM will do
                    pass
        deadline = time.monotonic() + WORKER_STOP_S
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in ranks):
            time.sleep(0.05)

    @staticmethod
    def stop_procs(children: list[Child], timeout: float) -> None:
        procs = [c.proc for c in children if c.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


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
    from minisgl.assets.embedded import resolve_model_dir
    from minisgl.models.registry import supported_architectures
    from minisgl.scheduler.policy import make_policy

    make_policy(cfg.scheduler_mode)  # fail fast on a bad mode
    backend = default_backend_name() if cfg.backend in ("", "auto") else check_backend_name(cfg.backend)
    # our engine's architectures; hf and mlx run whatever transformers / mlx-lm can
    supported = supported_architectures() if BACKENDS[backend].engine else None
    model_dir = resolve_model_dir(cfg.model_name, cfg.model_local_dir, cfg.revision, supported)
    workers = cfg.workers
    if cfg.enable_multi_device:
        import torch

        # with --tp N: one worker per N devices
        workers = max(1, torch.cuda.device_count() // cfg.tp) if torch.cuda.is_available() else workers
    from minisgl.backends.tp_checks import check_tp_request

    check_tp_request(cfg.tp, workers, backend, cfg.device, model_dir)
    check_port_free(cfg.host, cfg.port)
    clean_stale()
    runtime_dir = cfg.runtime_dir or tempfile.mkdtemp(prefix="minisgl-")
    os.chmod(runtime_dir, 0o700)  # the sockets inside accept anyone who can reach them
    (Path(runtime_dir) / PID_FILE).write_text(str(os.getpid()))
    served = cfg.served_model_name or cfg.model_name or model_dir.name
    cfg = msgspec.structs.replace(cfg, model_path=str(model_dir), backend=backend, workers=workers,
                                  runtime_dir=runtime_dir, served_model_name=served)
    cfg, chosen = device_sized(cfg)  # GPU sizes wherever the user set nothing
    if chosen:
        log.info("device-sized defaults for %s: %s (set any of them to override)", backend,
                 ", ".join(f"{k}={v}" for k, v in chosen.items()))
    return cfg


def clean_stale() -> None:
    """Remove what launchers that died without cleaning up (SIGKILL) left behind: run/port-N.json files
    naming a dead launcher, and runtime dirs whose launcher.pid names a dead process. Only our own files:
    another user's, or a live server's, are left alone."""
    run_dir = run_info_path(0).parent
    for path in run_dir.glob("port-*.json") if run_dir.is_dir() else []:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = {}
        if launcher_alive(int(info.get("pid") or 0)):
            continue
        log.info("removing the stale %s of a launcher that is gone (pid %s)", path, info.get("pid"))
        remove_runtime_dir(str(info.get("runtime_dir") or ""))
        path.unlink(missing_ok=True)
    for d in Path(tempfile.gettempdir()).glob("minisgl-*"):
        pid_file = d / PID_FILE
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            continue  # not a runtime dir of ours (or not readable)
        if not launcher_alive(pid):
            remove_runtime_dir(str(d))


def remove_runtime_dir(path: str) -> None:
    d = Path(path)
    try:
        if d.name.startswith("minisgl-") and d.is_dir() and d.stat().st_uid == os.getuid():
            log.info("removing the stale runtime dir %s", d)
            shutil.rmtree(d, ignore_errors=True)
    except OSError:
        pass


def check_port_free(host: str, port: int) -> None:
    """Fail before loading any model when the HTTP port is taken (the gateway binds it last)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror}; is another server running there?") from None


def build_parser(prog: str = "mini-sglang serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        epilog="Each flag's default comes from the environment variable shown; the flag wins over the variable.",
    )
    add_config_flags(parser, {"backend": backend_help()})
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop the server when the process that started it exits (tests, the CLI demo and "
                             "the bench start servers this way, so a killed caller leaves nothing behind)")
    return parser


def main(argv: list[str] | None = None, prog: str = "mini-sglang serve") -> int:
    parent_pid = os.getppid()  # before anything slow: if the caller dies meanwhile, we still notice
    args = build_parser(prog).parse_args(argv)
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

