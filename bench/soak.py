#!/usr/bin/env python3
"""Soak: N rounds of many concurrent short streams with random disconnects and bad requests mixed in.

    python bench/soak.py                          # starts its own server: 3 rounds of 400 streams
    python bench/soak.py --rounds 5 --concurrency 1000 --url http://127.0.0.1:8000 --api-key KEY

Each round fires `concurrency` streaming /generate requests at once. A fraction of them hang up at a
random point (`--disconnect`), a few bad requests (`--bad`) are mixed in. Every request must end one of
the known ways: completed (done event), 429, 503, a final error event, a 4xx for the bad ones, or our
own disconnect. Anything else (a cut stream, a timeout, a 500) is "lost". After each round the server
must come back to nothing in flight (gateway entries, scheduler queue and inflight), and the RSS of
every process of the tree is printed: all but the worker (whose KV pool fills up to its size) should
stay flat after round 1. Prints one line per round and writes JSON to bench/results/soak-*.json.
This is a benchmark (it prints numbers), not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR  # noqa: E402

BAD_BODIES = [
    b'{"prompt": "a\\ud800b"}',
    b'{"prompt": "hi", "stop_token_ids": [1e20]}',
    b'{"messages": [{"role": "wizard", "content": "hi"}]}',
    b"[" * 50_000 + b"]" * 50_000,
    b'{"prompt": "hi", "tools": []}',
    b'{"prompt": ',
]


async def one_stream(client: httpx.AsyncClient, url: str, i: int, max_new: int, hang_up_after: float | None) -> str:
    body = {"prompt": f"Say something about the number {i}.", "raw": True, "max_new_tokens": max_new,
            "ignore_eos": True, "temperature": 0.8, "seed": i}

    async def consume() -> str:
        async with client.stream("POST", url + "/generate", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {429: "429", 503: "503"}.get(r.status_code, f"http_{r.status_code}")
            last = None
            async for line in r.aiter_lines():
                if line.strip():
                    last = json.loads(line)
            if last is None:
                return "lost"
            if last.get("event") == "done":
                return "completed"
            if last.get("event") == "error":
                return "error_event"
            return "lost"

    try:
        if hang_up_after is None:
            return await consume()
        try:
            return await asyncio.wait_for(consume(), hang_up_after)
        except asyncio.TimeoutError:
            return "disconnected"
    except httpx.HTTPError as e:
        return f"lost:{type(e).__name__}"


async def bad_request(client: httpx.AsyncClient, url: str, body: bytes) -> str:
    try:
        r = await client.post(url + "/generate", content=body, headers={"Content-Type": "application/json"})
        ok = 400 <= r.status_code < 500 and "error" in r.json()
        return "bad_4xx" if ok else f"bad_got_{r.status_code}"
    except (httpx.HTTPError, ValueError) as e:
        return f"lost:{type(e).__name__}"


def tree_rss(launcher_pid: int | None) -> dict[str, float]:
    """RSS in MiB of the launcher and each child, by role."""
    if launcher_pid is None:
        return {}
    out: dict[str, float] = {}
    root = psutil.Process(launcher_pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            cmd = " ".join(p.cmdline())
            name = "launcher" if p.pid == launcher_pid else next(
                (part.split(".", 1)[1] for part in cmd.split() if part.startswith("procs.")), p.name())
            if name == "worker":
                name += "-" + cmd.split("--worker-id")[-1].strip().split()[0]
            out[name] = round(p.memory_info().rss / 2**20, 1)
        except (psutil.NoSuchProcess, IndexError):
            pass
    return dict(sorted(out.items()))


async def settle(client: httpx.AsyncClient, url: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = (await client.get(url + "/metrics", headers={"Accept": "application/json"})).json()
        s = st["scheduler"] or {}
        idle = st["inflight_streams"] == 0 and s.get("inflight") == 0 and s.get("queued") == 0
        if idle or time.monotonic() > deadline:
            return {"idle": idle, "inflight_streams": st["inflight_streams"], "scheduler_inflight": s.get("inflight"),
                    "scheduler_queued": s.get("queued")}
        await asyncio.sleep(0.5)


async def soak(args: argparse.Namespace, url: str, launcher_pid: int | None) -> list[dict]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 64, max_keepalive_connections=64)
    rng = random.Random(args.seed)
    rounds = []
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, headers=headers) as client:
        for n in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            tasks = []
            for i in range(args.concurrency):
                hang = rng.uniform(0.05, args.hang_up_max_s) if rng.random() < args.disconnect else None
                tasks.append(one_stream(client, url, n * 100_000 + i, args.max_new_tokens, hang))
            tasks += [bad_request(client, url, BAD_BODIES[j % len(BAD_BODIES)]) for j in range(args.bad)]
            rng.shuffle(tasks)
            outcomes = Counter(await asyncio.gather(*tasks))
            wall = time.perf_counter() - t0
            state = await settle(client, url, timeout=60)
            lost = sum(v for k, v in outcomes.items() if k.startswith("lost") or k.startswith("http_")
                       or k.startswith("bad_got"))
            row = {"round": n, "wall_s": round(wall, 1), "completed": outcomes["completed"], "429": outcomes["429"],
                   "503": outcomes["503"], "errors": outcomes["error_event"], "disconnected": outcomes["disconnected"],
                   "bad_4xx": outcomes["bad_4xx"], "lost": lost, "outcomes": dict(outcomes), "settled": state,
                   "rss_mib": tree_rss(launcher_pid)}
            rounds.append(row)
            rss = " ".join(f"{k}={v:.0f}" for k, v in row["rss_mib"].items())
            print(f"round {n}: {wall:6.1f}s completed={row['completed']} 429={row['429']} 503={row['503']} "
                  f"errors={row['errors']} disconnected={row['disconnected']} bad_4xx={row['bad_4xx']} "
                  f"lost={lost} settled={state['idle']} | RSS MiB {rss}", flush=True)
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=400)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--disconnect", type=float, default=0.2, help="fraction of streams that hang up early")
    parser.add_argument("--hang-up-max-s", type=float, default=3.0)
    parser.add_argument("--bad", type=int, default=12, help="bad requests mixed into each round")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="an existing server (default: start one)")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--server-args", default="", help="extra launch.py flags for the server it starts")
    args = parser.parse_args()
    handle = None
    if args.url:
        url, launcher_pid = args.url.rstrip("/"), None
    else:
        from minisgl.server_handle import ServerHandle

        server_args = args.server_args.split() + (["--api-key", args.api_key] if args.api_key else [])
        log_path = str(RESULTS_DIR / "soak-server.log")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        print(f"starting a server (its log: {log_path})", flush=True)
        handle = ServerHandle(server_args, log_path=log_path).start()
        url, launcher_pid = handle.url, handle.pid
    try:
        rounds = asyncio.run(soak(args, url, launcher_pid))
    finally:
        if handle is not None:
            handle.stop()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=2))
    print(f"wrote {out}")
    return 0 if all(r["lost"] == 0 and r["settled"]["idle"] for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
