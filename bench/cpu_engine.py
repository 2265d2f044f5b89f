"""In-process timings of the `torch` backend on a CPU: each CPU path side by side, and the idle effect.

No HTTP, no processes: one backend per CPU path (engine/cpu/isa.py: amx, avx512, avx2, and torch, the
model's own float32 torch ops) on the default model in one process, stepped in alternating rounds so
that the machine's drift hits all alike. The paths default to every one this CPU can run (amx too:
oneDNN runs its bfloat16 matmuls without AMX tiles, slower); speed-ups are against `torch`.

  decode   median step time with B sequences decoding (~100-token prompts), B in --batches
  prefix   a 549-token prompt cold, then the same 522-token prefix with a new 27-token suffix (the
           cached-prefix TTFT experiment of bench_suite.py, without the server)
  idle     the first step after the process sat idle for --idle-s seconds, against the step before
           it: on some virtual machines memory untouched for a fraction of a second is slow to read
           again (see bench/RESULTS.md), which no engine can hide

    python bench/cpu_engine.py                       # decode at 1, 4, 16; prefix; idle 0.4 s
    python bench/cpu_engine.py --batches 4 --rounds 12 --paths avx512,torch
    python bench/cpu_engine.py --paths amx,avx512,avx512:f32     # path:dot sets MINISGL_CPU_DOT for one

Prints a table and saves JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` and `minisgl` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, command_line, machine_info

def default_paths() -> list[str]:
    from minisgl.engine.cpu import isa as cpu_isa

    paths = cpu_isa.supported()
    if "amx" not in paths and cpu_isa._can_force("amx"):
        paths.insert(0, "amx")
    return paths


def make_backends(seed: int, paths: list[str]) -> dict[str, Any]:
    from minisgl.backends.base import BackendConfig
    from minisgl.backends.base import create_backend
    from minisgl.engine.cpu import isa as cpu_isa
    from minisgl.assets.embedded import ensure_default_model

    model_dir = ensure_default_model(quiet=True)
    backends = {}
    for path in paths:
        isa, _, dot = path.partition(":")  # avx512:f32 = the avx512 path with MINISGL_CPU_DOT=f32
        be = create_backend("torch", BackendConfig(model_path=str(model_dir), device="cpu", seed=seed,
                                                   kv_cache_tokens=8192, extra={"cpu_isa": isa, "cpu_dot": dot}))
        if be.cpu_path != isa:  # type: ignore[attr-defined]
            raise SystemExit(f"[cpu_engine] this CPU cannot run the {isa} path (it ran {be.cpu_path})")
        backends[path] = be
        cpu_isa.choose.cache_clear()
    return backends


def add(backend: Any, rid: str, ids: list[int], max_new: int) -> None:
    from minisgl.messages import SamplingParams, TokenizedReq

    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    backend.add_request(TokenizedReq(rid=rid, input_ids=ids, params=params, arrival=time.time()))


def timed_step(backend: Any) -> float:
    t = time.perf_counter()
    backend.step()
    return (time.perf_counter() - t) * 1e3


def decode(backends: dict[str, Any], batch: int, rounds: int, steps: int, rng: random.Random) -> dict[str, float]:
    for name, be in backends.items():
        for i in range(batch):
            add(be, f"d{batch}-{i}", [rng.randint(10, 10000) for _ in range(100)], 10 * rounds * steps)
        for _ in range(batch * 100 // 512 + 3):  # the prompts' prefill chunks, then a few decode steps
            be.step()
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(rounds):
        for name, be in backends.items():
            times[name] += [timed_step(be) for _ in range(steps)]
    for be in backends.values():
        for i in range(batch):
            be.abort(f"d{batch}-{i}")
        while be.has_work():
            be.step()
        be.flush_cache()
    return {name: statistics.median(t) for name, t in times.items()}


def run_to_end(backend: Any, rid: str, ids: list[int]) -> float:
    """One prompt, one output token: the time of its prefill (its TTFT in-process)."""
    add(backend, rid, ids, 1)
    t = time.perf_counter()
    while backend.has_work():
        backend.step()
    return (time.perf_counter() - t) * 1e3


def prefix(backends: dict[str, Any], rounds: int, rng: random.Random) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, list[float]]] = {name: {"cold": [], "warm": []} for name in backends}
    for r in range(rounds):
        for name, be in backends.items():
            shared = [rng.randint(10, 10000) for _ in range(522)]
            out[name]["cold"].append(run_to_end(be, f"c{r}", shared + [rng.randint(10, 10000) for _ in range(27)]))
            out[name]["warm"].append(run_to_end(be, f"w{r}", shared + [rng.randint(10, 10000) for _ in range(27)]))
    return {name: {k: statistics.median(v) for k, v in d.items()} for name, d in out.items()}


def idle(backend: Any, idle_s: float, repeats: int, rng: random.Random) -> dict[str, float]:
    """Decode steps of one sequence: the step before an idle pause and the first one after it."""
    add(backend, "idle", [rng.randint(10, 10000) for _ in range(100)], 10 * repeats + 20)
    for _ in range(3):
        backend.step()
    before, after = [], []
    for _ in range(repeats):
        before.append(timed_step(backend))
        time.sleep(idle_s)
        after.append(timed_step(backend))
    backend.abort("idle")
    while backend.has_work():
        backend.step()
    return {"step_before_ms": statistics.median(before), "first_step_after_ms": statistics.median(after)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,4,16", help="decode batch sizes")
    p.add_argument("--paths", default="", help="CPU paths to compare [every one this CPU runs]")
    p.add_argument("--rounds", type=int, default=8, help="alternating rounds per measurement")
    p.add_argument("--steps", type=int, default=10, help="decode steps per backend per round")
    p.add_argument("--idle-s", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    import torch

    rng = random.Random(args.seed)
    paths = [x for x in args.paths.split(",") if x] or default_paths()
    backends = make_backends(args.seed, paths)
    result: dict[str, Any] = {"command": command_line(), "machine": machine_info(), "threads": torch.get_num_threads(),
                              "paths": paths, "decode_step_ms": {}, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for b in [int(x) for x in args.batches.split(",") if x]:
        result["decode_step_ms"][str(b)] = decode(backends, b, args.rounds, args.steps, rng)
    result["prefix_ttft_ms"] = prefix(backends, max(3, args.rounds // 2), rng)
    result["idle"] = {"idle_s": args.idle_s, **idle(backends[paths[0]], args.idle_s, max(3, args.rounds // 2), rng)}
    for be in backends.values():
        be.shutdown()

    base = "torch" if "torch" in paths else None
    print(f"threads {result['threads']}; medians, ms" + (" (speed-up over torch)" if base else ""))
    print("| measurement | " + " | ".join(paths) + " |\n| --- |" + " --- |" * len(paths))
    rows = [(f"decode step, batch {b}", d) for b, d in result["decode_step_ms"].items()]
    rows += [(f"prefix {k} (549 tokens, {'522 cached' if k == 'warm' else 'none cached'})",
              {n: result["prefix_ttft_ms"][n][k] for n in paths}) for k in ("cold", "warm")]
    for label, d in rows:
        cells = [f"{d[n]:.1f}" + (f" ({d[base] / d[n]:.2f}x)" if base and n != base else "") for n in paths]
        print(f"| {label} | " + " | ".join(cells) + " |")
    i = result["idle"]
    print(f"idle {i['idle_s']} s ({paths[0]}): decode step before {i['step_before_ms']:.1f} ms, first after "
          f"{i['first_step_after_ms']:.1f} ms")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"cpu_engine_{time.strftime('%Y%m%d-%H%M%S')}" + (f"_{args.tag}" if args.tag else "") + ".json")
    path.write_text(json.dumps(result, indent=2))
    print(f"[cpu_engine] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
