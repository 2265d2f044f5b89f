"""Tensor parallelism on ONE device: the sharded model checked against the unsharded one.

    python bench/tp_check.py [--device cuda] [--out DIR] [--worlds 2,4] [--skip forward,engine,graph]

NCCL refuses two ranks on one GPU, so the shards run as gloo ranks sharing the device (each collective
staged through host memory; slow, but the arithmetic is the sharded model's):

  forward  Qwen3-0.6B shape, dummy weights: W gloo ranks each load their shard (the sharded loader, the
           vocab-parallel embedding / logits, row-parallel o/down) and run one 64-token prompt; rank 0
           compares every row's logits with the unsharded model's on the same device (float32 and
           bfloat16): max abs diff relative to the logits' scale, and argmax agreement.
  engine   the engine end to end (tests/tp_ranks.py: scheduling, paged KV pool split by head, the
           rank-0 step broadcast, greedy sampling) on TP=2 gloo ranks vs TP=1: float32 tokens must be
           equal; bfloat16 tokens: first divergence reported (sums in a different order).
  graph    CUDA only: a 1-rank NCCL group, the model's all-reduces / all-gather captured inside the sgl
           backend's decode CUDA graphs; greedy tokens against the same engine on the unsharded model,
           and the collectives' Python calls counted during replay (0: they are in the graph).

Runs on the CPU too (--device cpu, smaller shape with --small), which is how it was tested without a GPU.
Writes tp_check.json and tp_check.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "bench" / "configs" / "qwen3-0.6b"
SUMMARY: list[str] = []
RESULTS: dict = {}


def say(line: str) -> None:
    print(line, flush=True)
    SUMMARY.append(line)


def small_config_dir(tmp: Path) -> Path:
    """--small: the tiny Qwen3 of the tests (CPU-sized), with a tokenizer-free directory."""
    from bench.dummy_model import TINY_QWEN3

    d = tmp / "tiny-qwen3"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**TINY_QWEN3, "num_attention_heads": 8, "num_key_value_heads": 4}))
    return d


# ---------------------------------------------------------------- forward: one rank


def forward_rank(args: argparse.Namespace) -> None:
    from minisgl.distributed.group import destroy_tp, init_tp
    from minisgl.models.sharding import load_sharded_model
    from minisgl.models import DenseContext, load_config
    from minisgl.models.loader import build_empty_model, init_dummy_weights

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tp = init_tp(args.rank, args.world, args.store, device, backend="gloo")
    model = load_sharded_model(args.config, device, dtype, "dummy", 0, tp)
    cfg = load_config(args.config)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (64,), generator=gen).to(device)
    pos = torch.arange(64, device=device)
    with torch.inference_mode():
        logits = model(ids, pos, DenseContext(64)).float()
    if args.rank == 0:
        full = build_empty_model(cfg, device, dtype)
        init_dummy_weights(full, 0)
        with torch.inference_mode():
            ref = full(ids, pos, DenseContext(64)).float()
        scale = ref.abs().max().item()
        out = {"max_abs": (logits - ref).abs().max().item(), "scale": scale,
               "rel": (logits - ref).abs().max().item() / scale,
               "argmax_agree": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
               "local_heads": model.config.num_heads, "local_kv_heads": model.config.num_kv_heads}
        Path(args.result).write_text(json.dumps(out))
    destroy_tp()


def spawn(argv: list[str], world: int, timeout: float = 900) -> list[str]:
    procs = [subprocess.Popen([sys.executable, *argv, "--rank", str(r)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0])
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError("a rank failed:\n" + "\n".join(o[-3000:] for o in outs))
    return outs


def check_forward(args: argparse.Namespace, config: Path, tmp: Path) -> None:
    res = RESULTS.setdefault("forward", {})
    for world in args.worlds:
        for dtype in ("float32", "bfloat16"):
            result = tmp / f"fwd-{world}-{dtype}.json"
            spawn([str(Path(__file__).resolve()), "--role", "forward", "--world", str(world), "--store",
                   str(tmp / f"fwd-{world}-{dtype}.store"), "--config", str(config), "--dtype", dtype,
                   "--device", args.device, "--result", str(result)], world)
            r = json.loads(result.read_text())
            res[f"tp{world}_{dtype}"] = r
            ok = r["argmax_agree"] == 1.0 if dtype == "float32" else r["argmax_agree"] >= 0.9
            say(f"forward TP={world} {dtype:8s}: logits max abs diff {r['max_abs']:.2e} ({r['rel']:.1e} of their "
                f"scale), argmax agrees on {r['argmax_agree'] * 100:.1f}% of 64 rows, {r['local_heads']} heads / "
                f"{r['local_kv_heads']} KV heads per rank [{'ok' if ok else 'CHECK'}]")


# ---------------------------------------------------------------- engine: tests/tp_ranks.py


def run_engine(world: int, config: Path, device: str, dtype: str, tmp: Path, prompts: list[list[int]],
               max_new: int, backend: str, extra: str) -> dict:
    out = tmp / f"eng-{world}-{dtype}.json"
    argv = ["-m", "tests.tp_ranks", "--world", str(world), "--store", str(tmp / f"eng-{world}-{dtype}.store"),
            "--model", str(config), "--dummy", "--device", device, "--dtype", dtype, "--backend", backend,
            "--extra", extra, "--comm", "gloo", "--prompts", json.dumps(prompts), "--max-new", str(max_new),
            "--kv-tokens", "8192", "--out", str(out)]
    spawn(argv, world)
    return json.loads(out.read_text())


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def check_engine(args: argparse.Namespace, config: Path, tmp: Path) -> None:
    res = RESULTS.setdefault("engine", {})
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(10, 40000, (n,), generator=gen).tolist() for n in (7, 45, 100)]
    cuda = args.device.startswith("cuda")
    # gloo ranks stage each collective through the host, which a CUDA graph cannot capture: eager sgl
    backend, extra = ("sgl", "cuda_graph=0") if cuda else ("torch", "")
    device = "cuda:0" if cuda else args.device  # both ranks on the one GPU
    for dtype in ("float32", "bfloat16"):
        one = run_engine(1, config, device, dtype, tmp, prompts, args.max_new, backend, extra)
        two = run_engine(2, config, device, dtype, tmp, prompts, args.max_new, backend, extra)
        div = {rid: first_divergence(one["tokens"][rid], two["tokens"][rid]) for rid in one["tokens"]}
        equal = all(d is None for d in div.values())
        res[dtype] = {"equal": equal, "first_divergence": div, "backend": backend,
                      "collectives_per_step": two["steps"][0], "num_layers": two["num_layers"]}
        say(f"engine TP=2 vs TP=1 {dtype:8s} ({backend}, gloo ranks): greedy tokens "
            f"{'EQUAL' if equal else 'differ, first divergence at ' + json.dumps(div)} over {len(prompts)} x "
            f"{args.max_new} tokens; per step {two['steps'][0]} on the model group")


# ---------------------------------------------------------------- graph: NCCL inside CUDA graphs


def check_graph(args: argparse.Namespace, config: Path, tmp: Path) -> None:
    """In its own process, which ends without the interpreter's teardown (NCCL after graph capture)."""
    result = tmp / "graph.json"
    spawn([str(Path(__file__).resolve()), "--role", "graph", "--config", str(config), "--store", str(tmp / "graph.store"),
           "--max-new", str(args.max_new), "--result", str(result)], 1)
    r = json.loads(result.read_text())
    RESULTS["graph"] = r
    say(f"graph: NCCL all-reduce/all-gather captured in {r['step_kinds']['graph']} decode graph replays "
        f"({r['collective_calls_in_graph_steps']} Python collective calls during them, 0 expected); greedy tokens "
        f"{'EQUAL to' if r['equal'] else 'DIFFER from'} the unsharded engine's")


def graph_rank(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from minisgl.engine.cuda.engine import SGLEngine
    from minisgl.distributed.group import destroy_tp, exit_rank, init_tp
    from minisgl.models.sharding import shard_model
    from minisgl.engine import EngineConfig
    from minisgl.messages import SamplingParams, TokenizedReq
    from minisgl.models.loader import load_model

    config = Path(args.config)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    tp = init_tp(0, 1, args.store, device)  # NCCL, one rank
    full = load_model(config, device, torch.bfloat16, "dummy")  # world 1: the loader does not shard
    sharded = shard_model(full, tp)  # world 1: the same weights, but every collective layer in place
    calls = {"n": 0}
    for name in ("all_reduce", "all_gather_into_tensor"):
        original = getattr(dist, name)

        def wrapped(*a, _o=original, **k):  # noqa: ANN002, ANN003, ANN202
            calls["n"] += 1
            return _o(*a, **k)

        setattr(dist, name, wrapped)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 40000, (n,), generator=gen).tolist() for n in (5, 30, 60, 90)]

    def greedy(model: torch.nn.Module) -> tuple[dict[str, list[int]], int, dict[str, int]]:
        mc = model.config
        eng = SGLEngine(model, EngineConfig(num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads,
                                            head_dim=mc.head_dim, kv_tokens=8192, max_model_len=4096,
                                            max_running=8, chunk_size=512), device, torch.bfloat16, 8)
        params = SamplingParams(max_new_tokens=args.max_new, ignore_eos=True)
        for i, ids in enumerate(prompts):
            eng.add_request(TokenizedReq(rid=f"g{i}", input_ids=ids, params=params, arrival=0.0))
        toks: dict[str, list[int]] = {f"g{i}": [] for i in range(len(prompts))}
        replay_calls = 0
        while eng.has_work():
            before = calls["n"]
            graph_steps = eng.step_kinds["graph"]
            for item in eng.step().outputs:
                toks[item.rid] += item.token_ids
            if eng.step_kinds["graph"] > graph_steps:
                replay_calls += calls["n"] - before
        return toks, replay_calls, dict(eng.step_kinds)

    ref, _, _ = greedy(full)
    calls["n"] = 0
    got, replay_calls, kinds = greedy(sharded)
    out = {"equal": got == ref, "collective_calls_in_graph_steps": replay_calls, "step_kinds": kinds}
    Path(args.result).write_text(json.dumps(out))
    destroy_tp()
    exit_rank(0)


# ---------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", default="driver", choices=["driver", "forward", "graph"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT", str(REPO / "bench" / "results")))
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--skip", default="")
    p.add_argument("--small", action="store_true", help="a tiny Qwen3 instead of the Qwen3-0.6B shape (CPU)")
    p.add_argument("--max-new", type=int, default=32)
    # --role forward
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--store", default="")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--result", default="")
    args = p.parse_args()
    if args.role == "forward":
        forward_rank(args)
        return 0
    if args.role == "graph":
        graph_rank(args)
        return 0
    args.worlds = [int(w) for w in args.worlds.split(",") if w]
    skip = set(args.skip.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    with tempfile.TemporaryDirectory(prefix="tp-check-") as t:
        tmp = Path(t)
        config = small_config_dir(tmp) if args.small else CONFIG
        RESULTS["setup"] = {"device": args.device, "config": str(config), "torch": torch.__version__,
                            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
        checks = [("forward", check_forward), ("engine", check_engine)]
        if args.device.startswith("cuda"):
            checks.append(("graph", check_graph))
        for name, fn in checks:
            if name in skip:
                continue
            t0 = time.perf_counter()
            try:
                fn(args, config, tmp)
            except Exception:  # noqa: BLE001 - report and go on with the other checks
                failed.append(name)
                say(f"{name}: FAILED\n{traceback.format_exc()[-3000:]}")
            RESULTS.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
    (out / "tp_check.json").write_text(json.dumps(RESULTS, indent=1))
    (out / "tp_check.md").write_text("# bench/tp_check.py\n\n" + "\n".join(f"- {line}" for line in SUMMARY) + "\n")
    print(f"wrote {out / 'tp_check.json'} and tp_check.md", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
