"""Tensor parallelism on the CPU (gloo): sharded engines give TP=1's greedy tokens, the model issues the
collectives the design says, bad requests fail at start-up, and a --tp 2 server tree answers and
restarts its TP group as a group."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from bench.dummy_model import TINY_QWEN3, make_dummy_model_dir
from minisgl.backends.tp_checks import check_tp_request, rank_device
from minisgl.models.sharding import check_tp_shape
from minisgl.models.config import ModelConfig
from minisgl.models.weights import load_config
from minisgl.server_handle import REPO_ROOT
from tests.conftest import start_server, stream_generate, wait_for


@pytest.fixture(scope="module")
def tiny_qwen3(default_model_dir, tmp_path_factory) -> Path:
    return make_dummy_model_dir(tmp_path_factory.mktemp("tiny-qwen3"), TINY_QWEN3, default_model_dir)


def run_ranks(world: int, model: Path, prompts: list[list[int]], tmp: Path, dummy: bool = False,
              max_new: int = 10, backend: str = "torch", kv_tokens: int = 1024) -> dict:
    """tests/tp_ranks.py as `world` processes (or one without a group); rank 0's JSON, with every
    other rank's step counts under "followers"."""
    out = tmp / f"tp{world}.json"
    base = [sys.executable, "-m", "tests.tp_ranks", "--world", str(world), "--store", str(tmp / f"store{world}"),
            "--model", str(model), "--prompts", json.dumps(prompts), "--max-new", str(max_new), "--out", str(out),
            "--backend", backend, "--kv-tokens", str(kv_tokens)]
    env = {**os.environ, "TRITON_INTERPRET": "1"} if backend == "sgl-cpu" else None
    procs = [subprocess.Popen(base + ["--rank", str(r)] + (["--dummy"] if dummy else []), cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True, env=env) for r in range(world)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * world, outputs
    result = json.loads(out.read_text())
    result["followers"] = [json.loads(o.strip().splitlines()[-1]) for o in outputs[1:]]
    return result


def check_collectives(result: dict, world: int) -> None:
    """Per engine step with a forward: 2 all-reduces per layer (o_proj, down_proj) + 1 (embedding), and
    one all-gather (logits); nothing else on the model group. The same on every rank."""
    layers = result["num_layers"]
    forwards = [s for s in result["steps"] if s]
    assert forwards, result["steps"]
    assert all(s == {"all_reduce": 2 * layers + 1, "all_gather": 1} for s in forwards), result["steps"]
    assert len(result["followers"]) == world - 1
    for f in result["followers"]:
        assert f["steps"] == result["steps"]


def test_tp3_embedded_model_matches_tp1(default_model_dir, tmp_path) -> None:
    """SmolLM2-135M (9 heads, 3 KV heads) split 3 ways: one KV head per rank, the same greedy tokens.
    A prompt longer than the chunk size mixes prefill chunks with decode steps."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    prompts = [tok("The capital of France is").input_ids,
               tok("Write a short poem about the sea, the wind and the light over the water. " * 3).input_ids]
    assert len(prompts[1]) > 32  # tests/tp_ranks.py's chunk size
    tp1 = run_ranks(1, default_model_dir, prompts, tmp_path)
    tp3 = run_ranks(3, default_model_dir, prompts, tmp_path)
    assert tp3["tokens"] == tp1["tokens"]
    assert tp1["pool_kv_heads"] == 3 and tp3["pool_kv_heads"] == 1  # the KV pool is split by head
    assert tp3["kv_total"] == tp1["kv_total"]
    check_collectives(tp3, 3)


def test_tp2_dummy_qwen3_matches_tp1(tiny_qwen3, tmp_path) -> None:
    """Random Qwen3 weights (q/k norms, an untied lm_head), split 2 ways. The 1,500-token prompt makes
    the Dispatch larger than the step broadcast's first block."""
    prompts = [[5, 17, 300, 4000, 12, 9], list(range(100, 140)), list(range(20000, 21500))]
    tp1 = run_ranks(1, tiny_qwen3, prompts, tmp_path, dummy=True, kv_tokens=4096)
    tp2 = run_ranks(2, tiny_qwen3, prompts, tmp_path, dummy=True, kv_tokens=4096)
    assert tp2["tokens"] == tp1["tokens"]
    assert len(set(tp1["tokens"]["r1"])) > 1, "degenerate output would hide a mismatch"
    check_collectives(tp2, 2)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_tp2_sgl_engine_path_matches_tp1(tiny_qwen3, tmp_path) -> None:
    """The CUDA backend's engine (Triton paged decode kernel, its own batch layout; eager, under the Triton
    interpreter) on 2 sharded ranks: the torch engine's TP=1 tokens."""
    prompts = [[5, 17, 300, 4000, 12, 9], list(range(100, 140))]
    tp1 = run_ranks(1, tiny_qwen3, prompts, tmp_path, dummy=True, max_new=6)
    tp2 = run_ranks(2, tiny_qwen3, prompts, tmp_path, dummy=True, max_new=6, backend="sgl-cpu")
    assert tp2["tokens"] == tp1["tokens"]
    check_collectives(tp2, 2)


# ---------------------------------------------------------------- start-up checks


def test_heads_not_divisible_is_refused(default_model_dir) -> None:
    with pytest.raises(ValueError) as e:
        check_tp_shape(load_config(default_model_dir), 2, "SmolLM2")
    msg = str(e.value)
    assert "9 attention heads" in msg and "3 KV heads" in msg and "TP sizes that work for it: 1, 3" in msg
    cfg = ModelConfig.from_dict({**TINY_QWEN3, "vocab_size": 49153})
    with pytest.raises(ValueError, match="49153 vocabulary size"):
        check_tp_shape(cfg, 2)


def test_launch_refuses_tp2_for_the_embedded_model(default_model_dir) -> None:
    r = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "--tp", "2", "--port", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "TP=2 cannot split" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bad_tp_requests(tiny_qwen3, monkeypatch) -> None:
    import torch
    import torch.distributed as dist

    with pytest.raises(ValueError, match="at least 1"):
        check_tp_request(0, 1, "torch", "cpu", tiny_qwen3)
    for backend in ("hf", "mlx"):
        with pytest.raises(ValueError, match=f"the {backend} backend cannot split"):
            check_tp_request(2, 1, backend, "cpu", tiny_qwen3)
    check_tp_request(2, 1, "torch", "cpu", tiny_qwen3)  # fine on CPU (gloo)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="2 worker\\(s\\) x TP_SIZE=2 needs 4 CUDA devices, but 2 are visible"):
        check_tp_request(2, 2, "sgl", "cuda", tiny_qwen3)
    with pytest.raises(ValueError, match="names one GPU"):
        check_tp_request(2, 1, "sgl", "cuda:1", tiny_qwen3)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs NCCL"):
        check_tp_request(2, 1, "sgl", "cuda", tiny_qwen3)


def test_rank_devices_are_fixed_by_worker_and_rank() -> None:
    """Worker w's ranks own GPUs w*TP .. w*TP+TP-1; the mapping has no state, so a restart of a worker
    (or of its TP group) lands on the same devices."""
    assert [rank_device("cuda", 2, w, r, 4) for w in (0, 1) for r in (0, 1)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [rank_device("cuda", 1, w, 0, 2) for w in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]  # TP=1: shared
    assert rank_device("cpu", 3, 1, 2, 0) == "cpu"


# ---------------------------------------------------------------- a real server tree


def tp_worker_procs(launcher_pid: int) -> dict[str, psutil.Process]:
    """worker process name (worker-0, worker-0-tp1) -> process."""
    out = {}
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:  # gone, or a zombie not yet reaped (mid-restart)
            continue
        if "procs.worker" in cmd:
            wid = cmd[cmd.index("--worker-id") + 1]
            rank = cmd[cmd.index("--tp-rank") + 1] if "--tp-rank" in cmd else "0"
            out[f"worker-{wid}" + (f"-tp{rank}" if rank != "0" else "")] = p
    return out


def test_server_with_two_tp2_workers_answers_and_restarts_one_group(tiny_qwen3, tmp_path_factory) -> None:
    """DP x TP: --workers 2 --tp 2 is two workers to the scheduler, four rank processes. Killing one
    rank restarts its worker's group (both ranks, same ids and ranks: the same devices), not the other."""
    server = start_server(["--model-local-dir", str(tiny_qwen3), "--load-format", "dummy", "--workers", "2",
                           "--tp", "2", "--kv-cache-tokens", "2048", "--max-running", "8"], tmp_path_factory,
                          "tp2-server")
    body = {"prompt": "Tell me about tensors.", "raw": True, "max_new_tokens": 12, "ignore_eos": True}
    try:
        text, events = stream_generate(server.url, body)
        done = events[-1]
        assert done["event"] == "done" and done["usage"]["completion_tokens"] == 12
        metrics = httpx.get(server.url + "/metrics", headers={"Accept": "application/json"}, timeout=10).json()
        assert len(metrics["scheduler"]["workers"]) == 2  # four ranks, two workers to the scheduler
        before = tp_worker_procs(server.pid)
        assert sorted(before) == ["worker-0", "worker-0-tp1", "worker-1", "worker-1-tp1"]
        old_cmds = {name: p.cmdline() for name, p in before.items()}
        os.kill(before["worker-0-tp1"].pid, signal.SIGKILL)  # rank 0 would wait on it forever

        def restarted() -> dict[str, psutil.Process] | None:
            now = tp_worker_procs(server.pid)
            ok = sorted(now) == sorted(before) and all(now[k].pid != before[k].pid for k in ("worker-0", "worker-0-tp1"))
            return now if ok else None

        after = wait_for(restarted, timeout=60)
        assert after, f"the TP group was not restarted as a group: {tp_worker_procs(server.pid)}"
        assert all(after[k].pid == before[k].pid for k in ("worker-1", "worker-1-tp1"))  # the other group lives on
        for name in ("worker-0", "worker-0-tp1"):  # same worker id and rank (so the same devices); a fresh rendezvous
            old, new = old_cmds[name], after[name].cmdline()
            assert new[:len(old)] == old and new[len(old):][0] == "--tp-gen"
        for _ in range(2):  # one request per worker (round robin); both hold the same seeded weights
            again, events = stream_generate(server.url, body, timeout=120)
            assert events[-1]["event"] == "done" and again == text  # greedy: the same answer
    finally:
        server.stop()
