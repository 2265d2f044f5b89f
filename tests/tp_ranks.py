"""One TP rank of an engine run without sockets, for tests/test_tp.py and bench/tp_check.py.

    python -m tests.tp_ranks --rank R --world N --store FILE --model DIR --out OUT.json [--dummy] ...

Every rank builds the real backend on its shard (the loader sees the TP group), agrees on the KV pool,
and runs the real step broadcast: rank 0 shares Dispatch / Shutdown messages through StepSync and steps
its engine, ranks 1..N-1 run FollowerLoop. Rank 0 writes the greedy tokens of each request, and every
rank counts the collectives on the model group per engine step (by wrapping torch.distributed's).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import msgspec
import torch
import torch.distributed as dist

from minisgl.backends.base import BackendConfig, EngineBackend
from minisgl.backends.base import create_backend
from minisgl.distributed.group import destroy_tp, exit_rank, get_tp, init_tp
from minisgl.backends.tp_sync import FollowerLoop, StepSync, agree_on_kv_pool, apply
from minisgl.messages import Dispatch, SamplingParams, Shutdown, TokenizedReq

COUNTS: Counter[str] = Counter()


def count_model_collectives() -> None:
    """Wrap the collectives the model may call; count only those on the model group."""
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor"):
        original = getattr(dist, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            tp = get_tp()
            if tp is not None and kwargs.get("group") is tp.group:
                COUNTS[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)


class SGLEngineOnCPU(EngineBackend):
    """--backend sgl-cpu: the sgl backend's engine (Triton decode kernel, its batch layout) on the CPU
    under TRITON_INTERPRET=1, eager, as tests/test_sgl_backend.py runs it: the CUDA backend's code path
    on sharded heads, without a GPU."""

    name = "sgl-cpu"

    def __init__(self, config: BackendConfig) -> None:
        from minisgl.engine.cuda.engine import SGLEngine
        from minisgl.engine import EngineConfig
        from minisgl.models.loader import load_model
        from tests.test_sgl_backend import _interpreter_numpy_shim

        _interpreter_numpy_shim()

        super().__init__(config)
        model = load_model(config.model_path, "cpu", torch.float32, config.load_format)
        mc = model.config
        self.engine = SGLEngine(model, EngineConfig(
            num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
            kv_tokens=config.kv_cache_tokens, max_model_len=mc.max_position_embeddings,
            max_running=config.max_running, chunk_size=config.chunk_size), torch.device("cpu"), torch.float32,
            cuda_graph_max_bs=0, warm_kernels=False)


def requests(prompts: list[list[int]], max_new: int) -> list[TokenizedReq]:
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    return [TokenizedReq(rid=f"r{i}", input_ids=ids, params=params, arrival=0.0) for i, ids in enumerate(prompts)]


def run_rank(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    if args.device == "cuda":  # one GPU per rank, as the worker does (gloo ranks may share one: cuda:0)
        args.device = f"cuda:{args.rank}"
    tp = init_tp(args.rank, args.world, args.store, args.device, backend=args.comm) if args.world > 1 else None
    count_model_collectives()
    extra = dict(kv.split("=", 1) for kv in args.extra.split(",") if kv)
    config = BackendConfig(
        model_path=args.model, device=args.device, dtype=args.dtype, load_format="dummy" if args.dummy else "auto",
        max_running=8, kv_cache_tokens=args.kv_tokens, chunk_size=args.chunk_size, extra=extra)
    backend = SGLEngineOnCPU(config) if args.backend == "sgl-cpu" else create_backend(args.backend, config)
    reqs = requests(json.loads(args.prompts), args.max_new)
    encode = msgspec.msgpack.Encoder().encode
    steps: list[dict[str, int]] = []
    if tp is not None:
        agree_on_kv_pool(backend, tp)
        if tp.rank > 0:
            original_step = backend.step

            def counted_step():  # noqa: ANN202
                before = Counter(COUNTS)
                out = original_step()
                steps.append(dict(COUNTS - before))
                return out

            backend.step = counted_step  # type: ignore[method-assign]
            FollowerLoop(backend, tp).run()
            print(json.dumps({"rank": tp.rank, "steps": steps}), flush=True)
            destroy_tp()
            exit_rank(0)
    sync = StepSync(tp) if tp is not None else None
    pending = [encode(Dispatch(reqs))]
    tokens: dict[str, list[int]] = {r.rid: [] for r in reqs}
    step_s: list[float] = []  # rank 0's wall time of each engine step (host-synced by the sampler)
    live: set[str] = set()
    while True:
        if sync is not None:
            sync.share(pending, backend)
        stop = False
        for data in pending:
            stop = not apply(backend, msgspec.msgpack.decode(data, type=Dispatch | Shutdown), live) or stop
        pending = []
        if backend.has_work():
            before = Counter(COUNTS)
            t0 = time.perf_counter()
            out = backend.step()
            step_s.append(time.perf_counter() - t0)
            steps.append(dict(COUNTS - before))
            for item in out.outputs:
                tokens[item.rid] += item.token_ids
        elif stop:
            break
        else:
            pending = [encode(Shutdown())]
    with open(args.out, "w") as f:
        json.dump({"tokens": tokens, "steps": steps, "step_s": step_s, "kv_total": backend.stats().kv_total_tokens,
                   "num_layers": backend.engine.config.num_layers,
                   "pool_kv_heads": backend.engine.pool.k.shape[2]}, f)
    if tp is not None:
        destroy_tp()
        exit_rank(0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--store", default="")
    p.add_argument("--model", required=True)
    p.add_argument("--dummy", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--extra", default="", help="backend options k=v,k=v (e.g. cuda_graph=0)")
    p.add_argument("--comm", default=None, help="model group backend (default: nccl on CUDA, gloo on CPU)")
    p.add_argument("--prompts", required=True, help="JSON list of token id lists")
    p.add_argument("--max-new", type=int, default=8)
    p.add_argument("--kv-tokens", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--out", default="")
    run_rank(p.parse_args())


if __name__ == "__main__":
    main()
