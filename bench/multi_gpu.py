"""Two GPUs (nvidia-h200-x2): data-parallel scaling through the gateway, and TP=2 against TP=1.

    python bench/multi_gpu.py [--parts dp,tp] [--out $OUT] [--concurrency 256,512] [--budget-s 540]

Model: the Qwen3-0.6B shape (bench/configs/qwen3-0.6b) with dummy bfloat16 weights and the embedded
model's tokenizer, as in issue 14's measurement. Every request: a ~45-token raw prompt, 128 greedy
output tokens, ignore_eos.

  dp  one server on one GPU (CUDA_VISIBLE_DEVICES=0, 1 worker) and one on two GPUs (2 workers), each
      driven at every --concurrency through the gateway by --client-procs client processes (so one
      Python client is not what caps it). Per level: output tok/s, TTFT, and the CPU cores used by each
      server process (gateway, tokenizer, scheduler, workers) and by the clients, from their CPU times:
      a process near 1.0 core is the cap. Scaling = two GPUs / one GPU (issue 14's target: >= 1.9x).
  tp  (a) greedy tokens of TP=2 (NCCL, cuda:0 + cuda:1, sgl backend with its CUDA graphs) against TP=1,
      offline through tests/tp_ranks.py (the engine, the step broadcast, no sockets), in bfloat16 (first
      divergence reported: partial sums round differently) and float32 (expected equal); (b) batch-1
      decode step time offline, TP=2 vs TP=1; (c) batch-1 TPOT through the gateway, --tp 2 vs --tp 1.

Results are written after every measurement (a run cut short keeps what it had) to OUT/STEM/ (STEM.json,
STEM.md, server logs) and packed into OUT/STEM.tar.gz; STEM is multi_gpu, or multi_gpu_dp / multi_gpu_tp
with --parts dp / tp. Both parts take ~8-9 minutes together: on the device tool (600 s a command) run
them as two commands, `--parts dp` and `--parts tp`; --budget-s skips what would not fit. --device cpu
--small runs the same code on a CPU (tiny Qwen3, 2 workers / TP=2 on gloo), which is how it was tested.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench.client import StreamResult
from bench.common import command_line, machine_info, make_prompt
from bench.dummy_model import TINY_QWEN3, make_dummy_model_dir

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "bench" / "configs" / "qwen3-0.6b"
REPORT: dict[str, Any] = {"dp": {}, "tp": {}, "notes": []}
LINES: list[str] = []
STEM = ["multi_gpu"]  # multi_gpu_dp / multi_gpu_tp when --parts picks one, so two runs do not collide
_RUNS = itertools.count()


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def say(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


# ---------------------------------------------------------------- the client processes


def client_main(args: argparse.Namespace) -> None:
    """--role client: send the payloads in --payloads with --concurrency in flight; write the results
    and this process's CPU seconds."""
    import httpx

    from bench.client import astream_generate

    payloads = json.loads(Path(args.payloads).read_text())

    async def run() -> list[StreamResult]:
        sem = asyncio.Semaphore(args.concurrency)
        limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=30.0), limits=limits) as client:
            async def one(p: dict[str, Any]) -> StreamResult:
                async with sem:
                    return await astream_generate(client, args.url, p)

            return list(await asyncio.gather(*(one(p) for p in payloads)))

    results = asyncio.run(run())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"results": [{k: v for k, v in asdict(r).items() if k != "text"} for r in results],
           "cpu_s": usage.ru_utime + usage.ru_stime}
    Path(args.result).write_text(json.dumps(out))


def payloads_for(n: int, tag: str, max_new: int) -> list[dict[str, Any]]:
    # ~30 words of filler make ~45 tokens with SmolLM2's tokenizer
    return [{"prompt": make_prompt(f"{tag}:{i}", 30), "raw": True, "max_new_tokens": max_new, "temperature": 0.0,
             "ignore_eos": True, "stream": True} for i in range(n)]


def proc_label(p: psutil.Process) -> str:
    cmd = p.cmdline()
    for mod in ("procs.gateway", "procs.tokenizer", "procs.scheduler", "procs.worker"):
        if mod in cmd:
            name = mod.split(".")[1]
            if mod == "procs.worker":
                name += "-" + cmd[cmd.index("--worker-id") + 1]
                if "--tp-rank" in cmd:
                    name += "-tp" + cmd[cmd.index("--tp-rank") + 1]
            return name
    return "launcher" if "launch.py" in " ".join(cmd) else p.name()


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each process of a server tree, by role."""
    out: dict[str, float] = {}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[proc_label(p)] = out.get(proc_label(p), 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return out


def drive(url: str, server_pid: int, payloads: list[dict[str, Any]], concurrency: int, client_procs: int,
          tmp: Path) -> dict[str, Any]:
    """One load level: the payloads split over client processes, concurrency split likewise."""
    from bench.bench_suite import summarize_results

    procs_n = max(1, min(client_procs, concurrency))
    shares = [payloads[i::procs_n] for i in range(procs_n)]
    concs = [concurrency // procs_n + (1 if i < concurrency % procs_n else 0) for i in range(procs_n)]
    files = []
    for i, share in enumerate(shares):
        f = tmp / f"payloads-{i}.json"
        f.write_text(json.dumps(share))
        files.append((f, tmp / f"results-{i}.json"))
    cpu0 = tree_cpu(server_pid)
    t0 = time.perf_counter()
    clients = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--role", "client", "--url", url,
                                 "--payloads", str(f), "--result", str(r), "--concurrency", str(c)], cwd=REPO)
               for (f, r), c in zip(files, concs)]
    for c in clients:
        c.wait()
    wall = time.perf_counter() - t0
    cpu1 = tree_cpu(server_pid)
    results: list[StreamResult] = []
    client_cpu = 0.0
    for (_, r), c in zip(files, clients):
        if c.returncode != 0 or not r.exists():
            raise RuntimeError(f"a client process failed (code {c.returncode})")
        data = json.loads(r.read_text())
        results += [StreamResult(**d) for d in data["results"]]
        client_cpu += data["cpu_s"]
    summary = summarize_results(results, wall)
    tokens = max(1, summary["output_tokens"])
    cores = {k: round((cpu1.get(k, 0.0) - cpu0.get(k, 0.0)) / wall, 3) for k in cpu1}
    summary["cores"] = {**cores, f"clients_x{procs_n}": round(client_cpu / wall, 3)}
    summary["cpu_us_per_token"] = {k: round((cpu1.get(k, 0.0) - cpu0.get(k, 0.0)) / tokens * 1e6, 1) for k in cpu1}
    summary["concurrency"] = concurrency
    return summary


# ---------------------------------------------------------------- servers


def server_args(model_dir: Path, extra: list[str], small: bool, device: str) -> list[str]:
    base = ["--model-local-dir", str(model_dir), "--load-format", "dummy", "--max-queue", "8192"]
    if device == "cpu":
        base += ["--device", "cpu", "--kv-cache-tokens", "16384"]
    return base + extra


def start(args_list: list[str], env: dict[str, str], log: Path):  # noqa: ANN201
    from minisgl.server_handle import ServerHandle

    return ServerHandle(args_list, env=env, log_path=str(log), startup_timeout=600).start()


# ---------------------------------------------------------------- dp


def run_dp(args: argparse.Namespace, model_dir: Path, out: Path, tmp: Path, budget: Budget) -> None:
    caps = ["--max-running", str(args.max_running), "--max-inflight-per-engine", str(args.max_running),
            "--max-inflight-total", str(4 * args.max_running), "--no-adaptive-max-new-tokens"]
    if args.defaults:
        caps = []
    systems = [("one_gpu", ["--workers", "1"], {"CUDA_VISIBLE_DEVICES": "0"} if args.device == "cuda" else {}),
               ("two_gpus", ["--workers", "2"], {"CUDA_VISIBLE_DEVICES": "0,1"} if args.device == "cuda" else {})]
    for name, extra, env in systems:
        if budget.left() < 120:
            REPORT["notes"].append(f"dp {name}: skipped, {budget.left():.0f}s of the budget left")
            say(REPORT["notes"][-1])
            continue
        server = start(server_args(model_dir, caps + extra + args.server_args.split(), args.small, args.device), env,
                       out / f"server-dp-{name}.log")
        try:
            drive(server.url, server.pid, payloads_for(args.warmup, f"warm-{name}", args.max_new), min(args.warmup, 64),
                  args.client_procs, tmp)
            for conc in args.concurrency:
                if budget.left() < 60:
                    REPORT["notes"].append(f"dp {name} c={conc}: skipped, budget")
                    break
                n = args.requests_factor * conc
                s = drive(server.url, server.pid, payloads_for(n, f"{name}-{conc}", args.max_new), conc,
                          args.client_procs, tmp)
                REPORT["dp"].setdefault(name, {})[str(conc)] = s
                say(f"dp {name:8s} c={conc}: {s['output_tok_s']:,.0f} out tok/s, TTFT p50 "
                    f"{(s['ttft_ms'].get('p50') or 0) / 1000:.2f}s, {s['failed']} failed; cores "
                    + ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["cores"].items())))
                save(out)
        finally:
            server.stop()
    one, two = REPORT["dp"].get("one_gpu", {}), REPORT["dp"].get("two_gpus", {})
    for conc in map(str, args.concurrency):
        if conc in one and conc in two and one[conc]["output_tok_s"] > 0:
            ratio = two[conc]["output_tok_s"] / one[conc]["output_tok_s"]
            REPORT["dp"].setdefault("scaling", {})[conc] = round(ratio, 3)
            say(f"dp scaling c={conc}: {ratio:.2f}x ({'meets' if ratio >= 1.9 else 'BELOW'} the 1.9x target)")
    save(out)


# ---------------------------------------------------------------- tp


def offline_tp(world: int, model_dir: Path, dtype: str, device: str, prompts: list[list[int]], max_new: int,
               tmp: Path, backend: str) -> dict[str, Any]:
    tag = f"tp{world}-{dtype}-{next(_RUNS)}"  # a fresh rendezvous file each run: a used one holds stale keys
    res = tmp / f"{tag}.json"
    argv = [sys.executable, "-m", "tests.tp_ranks", "--world", str(world), "--store", str(tmp / f"{tag}.store"),
            "--model", str(model_dir), "--dummy", "--device", device, "--dtype", dtype, "--backend", backend,
            "--prompts", json.dumps(prompts), "--max-new", str(max_new), "--kv-tokens", "16384", "--chunk-size", "512",
            "--out", str(res)]
    procs = [subprocess.Popen(argv + ["--rank", str(r)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(world)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("tp_ranks failed:\n" + "\n".join(o[-3000:] for o in outs))
    return json.loads(res.read_text())


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def run_tp(args: argparse.Namespace, model_dir: Path, out: Path, tmp: Path, budget: Budget) -> None:
    import random

    rng = random.Random(0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = [[rng.randrange(10, min(vocab, 49000)) for _ in range(n)] for n in (45, 45, 7, 200)]
    backend = "sgl" if args.device == "cuda" else "torch"
    rep = REPORT["tp"]
    for dtype in ("bfloat16", "float32"):
        if budget.left() < 150:
            rep.setdefault("skipped", []).append(f"greedy {dtype}")
            continue
        one = offline_tp(1, model_dir, dtype, args.device, prompts, args.max_new, tmp, backend)
        two = offline_tp(2, model_dir, dtype, args.device, prompts, args.max_new, tmp, backend)
        div = {rid: first_divergence(one["tokens"][rid], two["tokens"][rid]) for rid in one["tokens"]}
        equal = all(d is None for d in div.values())
        rep[f"greedy_{dtype}"] = {"equal": equal, "first_divergence": div, "backend": backend,
                                  "collectives_per_step_tp2": two["steps"][0]}
        say(f"tp greedy {dtype}: TP=2 tokens {'EQUAL to' if equal else 'differ from'} TP=1's over "
            f"{len(prompts)} x {args.max_new} tokens" + ("" if equal else f" (first divergence {div})"))
        save(out)
    # batch-1 decode step: one 45-token prompt, the median of its decode steps (the first steps prefill)
    if budget.left() > 150:
        lat = {}
        for world in (1, 2):
            r = offline_tp(world, model_dir, "bfloat16", args.device, [prompts[0]], 128, tmp, backend)
            lat[f"tp{world}_ms"] = round(statistics.median(r["step_s"][2:]) * 1000, 3)
        rep["batch1_decode_step_offline"] = lat
        say(f"tp batch-1 decode step (offline, bf16): TP=1 {lat['tp1_ms']:.2f} ms, TP=2 {lat['tp2_ms']:.2f} ms")
        save(out)
    # batch-1 through the gateway
    for world in (1, 2):
        if budget.left() < 120:
            rep.setdefault("skipped", []).append(f"gateway batch-1 tp{world}")
            continue
        env = {"CUDA_VISIBLE_DEVICES": "0" if world == 1 else "0,1"} if args.device == "cuda" else {}
        server = start(server_args(model_dir, ["--tp", str(world), "--max-running", "16"] + args.server_args.split(),
                                   args.small, args.device), env, out / f"server-tp{world}.log")
        try:
            drive(server.url, server.pid, payloads_for(2, f"tpwarm{world}", 32), 1, 1, tmp)
            s = drive(server.url, server.pid, payloads_for(args.latency_requests, f"tp{world}", 128), 1, 1, tmp)
            rep.setdefault("batch1_gateway", {})[f"tp{world}"] = {
                "tpot_ms_p50": s["tpot_ms"].get("p50"), "ttft_ms_p50": s["ttft_ms"].get("p50"),
                "output_tok_s": s["output_tok_s"], "failed": s["failed"]}
            say(f"tp batch-1 through the gateway, TP={world}: TPOT p50 {s['tpot_ms'].get('p50') or 0:.2f} ms, "
                f"TTFT p50 {s['ttft_ms'].get('p50') or 0:.1f} ms")
            save(out)
        finally:
            server.stop()


# ---------------------------------------------------------------- report


def save(out: Path) -> None:
    (out / f"{STEM[0]}.json").write_text(json.dumps(REPORT, indent=1, default=str))
    md = [f"# bench/multi_gpu.py ({STEM[0]})", "", f"`{REPORT.get('command', '')}`", "", *[f"- {line}" for line in LINES]]
    dp = REPORT["dp"]
    if dp.get("one_gpu") or dp.get("two_gpus"):
        md += ["", "| system | c | out tok/s | TTFT p50 (s) | failed | gateway | tokenizer | scheduler | workers | clients |",
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name in ("one_gpu", "two_gpus"):
            for conc, s in dp.get(name, {}).items():
                c = s["cores"]
                workers = sum(v for k, v in c.items() if k.startswith("worker"))
                clients = sum(v for k, v in c.items() if k.startswith("clients"))
                md.append(f"| {name} | {conc} | {s['output_tok_s']:,.0f} | {(s['ttft_ms'].get('p50') or 0) / 1000:.2f} | "
                          f"{s['failed']} | {c.get('gateway', 0):.2f} | {c.get('tokenizer', 0):.2f} | "
                          f"{c.get('scheduler', 0):.2f} | {workers:.2f} | {clients:.2f} |")
        md += ["", "Cores: CPU seconds of the process during the level / its wall time."]
    (out / f"{STEM[0]}.md").write_text("\n".join(md) + "\n")


def pack(out: Path) -> Path:
    tar = out.parent / f"{STEM[0]}.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(out, arcname=STEM[0])
    return tar


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", default="driver", choices=["driver", "client"])
    p.add_argument("--parts", default="dp,tp")
    p.add_argument("--out", default=os.environ.get("OUT", str(REPO / "bench" / "results")))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny Qwen3 (CPU runs of this script)")
    p.add_argument("--concurrency", default="256,512")
    p.add_argument("--requests-factor", type=int, default=3, help="requests per level = factor x concurrency [3]")
    p.add_argument("--warmup", type=int, default=64)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--defaults", action="store_true", help="dp: no explicit caps (the GPU defaults of the server)")
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--latency-requests", type=int, default=8)
    p.add_argument("--server-args", default="", help="more launch.py flags for every server")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip what no longer fits (a device command has 600 s)")
    # --role client
    p.add_argument("--url", default="")
    p.add_argument("--payloads", default="")
    p.add_argument("--result", default="")
    args, _ = p.parse_known_args()
    if args.role == "client":
        args.concurrency = int(args.concurrency)
        client_main(args)
        return 0
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    budget = Budget(args.budget_s)
    parts = [x for x in args.parts.split(",") if x]
    STEM[0] = "multi_gpu" if sorted(parts) == ["dp", "tp"] else "multi_gpu_" + "_".join(parts)
    out = Path(args.out) / STEM[0]
    out.mkdir(parents=True, exist_ok=True)
    from minisgl.assets.embedded import ensure_default_model

    REPORT.update(command=command_line(), machine=machine_info(), settings={k: v for k, v in vars(args).items()})
    failed = False
    with tempfile.TemporaryDirectory(prefix="multi-gpu-") as t:
        tmp = Path(t)
        tok_dir = ensure_default_model(quiet=True)
        config: dict[str, Any] | Path = TINY_QWEN3 if args.small else CONFIG
        model_dir = make_dummy_model_dir(tmp / "model", config, tok_dir)
        for part, fn in (("dp", run_dp), ("tp", run_tp)):
            if part not in args.parts.split(","):
                continue
            try:
                fn(args, model_dir, out, tmp, budget)
            except Exception:  # noqa: BLE001 - keep the other part and what was measured
                failed = True
                say(f"{part}: FAILED\n{traceback.format_exc()[-4000:]}")
            save(out)
    print(f"wrote {pack(out)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
