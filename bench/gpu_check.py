"""One GPU session for the sgl backend: checks correctness, times variants, prints a short table last.

    python bench/gpu_check.py [--out DIR] [--skip kernel,tune,greedy,full,offline,steps] [--offline-full]

  kernel   the Triton paged decode kernel against a float64 reference and the torch PagedAttention,
           random pools / tables / lengths, several head layouts, dtypes and split counts
  tune     its time and achieved bandwidth at batch 1 / 32 / 256 over BLOCK_N, warps and splits,
           against the torch backend's gather + SDPA decode
  greedy   Qwen3-0.6B with dummy weights: the sgl backend's greedy tokens against the torch backend's
           (float32: must be equal; bfloat16: first divergence reported), and graphs on vs off
  full     bench/offline.py's full default workload (nano-vllm's: 256 seqs, in/out 100-1024) in this
           process on the default backend (sgl on CUDA), its time split into decode-only and other
           steps, and into CPU scheduling / batch building / launch and the sampler's GPU wait
  offline  bench/offline.py as subprocesses: sgl (picked by default on CUDA) and torch on a small
           workload, and with --offline-full sgl on the full workload
  steps    decode step time at batch 1 / 64 / 256 for torch, sgl eager and sgl with CUDA graphs
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import logging
import math
import os
import statistics
import subprocess
import sys
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


# ---------------------------------------------------------------- kernel correctness


def rand_case(bsz: int, heads: int, kv_heads: int, d: int, max_len: int, dtype: torch.dtype, gen: torch.Generator):
    dev = "cuda"
    lens = torch.randint(1, max_len + 1, (bsz,), generator=gen)
    lens[0] = 1
    slots_total = int(lens.sum()) + 16
    k_pool = torch.randn(slots_total + 1, kv_heads, d, generator=gen).to(dev, dtype)
    v_pool = torch.randn(slots_total + 1, kv_heads, d, generator=gen).to(dev, dtype)
    table = torch.zeros(bsz + 3, max_len + 1, dtype=torch.int64)
    perm = torch.randperm(slots_total, generator=gen) + 1
    rows = torch.randperm(bsz + 3, generator=gen)[:bsz]
    off = 0
    for i in range(bsz):
        n = int(lens[i])
        table[rows[i], :n] = perm[off:off + n]
        off += n
    q = torch.randn(bsz, heads, d, generator=gen).to(dev, dtype)
    return q, k_pool, v_pool, table.to(dev), rows.to(dev), lens.to(dev)


def check_kernel() -> None:
    from minisgl.cache.kv_pool import KVPool
    from minisgl.engine.attention import PagedAttention
    from minisgl.engine.cuda.triton_attention import decode_attention, decode_attention_reference, decode_params

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator().manual_seed(0)
    worst = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for heads, kv, d in ((16, 8, 128), (32, 8, 128), (14, 2, 64)):
            for bsz, max_len in ((1, 3000), (7, 700), (64, 300)):
                q, kp, vp, table, rows, lens = rand_case(bsz, heads, kv, d, max_len, dtype, gen)
                ref = decode_attention_reference(q, kp, vp, table, rows, lens)
                splits_n, block_n = decode_params(bsz, kv, sms)
                for splits in sorted({1, 4, splits_n}):
                    out = torch.full_like(q, float("nan"))
                    decode_attention(q, kp, vp, table, rows, lens, splits, out=out, block_n=block_n)
                    torch.cuda.synchronize()
                    err = (out.double() - ref).abs().max().item()
                    rel = ((out.double() - ref).norm() / ref.norm()).item()
                    key = str(dtype).removeprefix("torch.")
                    w = worst.setdefault(key, [0.0, 0.0])
                    w[0], w[1] = max(w[0], err), max(w[1], rel)
                    assert math.isfinite(err), f"unwritten or NaN output {dtype} {heads}/{kv}/{d} b={bsz} s={splits}"
    # against the torch backend's decode on the same pool (bf16, Qwen3-0.6B heads)
    pool = KVPool(1, 8, 128, 50000, torch.bfloat16, "cuda")
    pool.k[0, 1:].normal_()
    pool.v[0, 1:].normal_()
    lens = torch.randint(1, 1500, (32,), generator=gen).cuda()
    table = torch.zeros(32, 1500, dtype=torch.int64, device="cuda")
    perm = torch.randperm(50000, device="cuda") + 1
    off = 0
    for i in range(32):
        n = int(lens[i])
        table[i, :n] = perm[off:off + n]
        off += n
    q = torch.randn(32, 16, 128, device="cuda", dtype=torch.bfloat16)
    ctx = PagedAttention(pool, torch.zeros(0, dtype=torch.int64, device="cuda"), torch.arange(32), 32,
                         table[:, :int(lens.max())], lens, [])
    want = ctx._decode(pool.k[0], pool.v[0], q)
    for k, (err, rel) in worst.items():
        say(f"kernel {k:8s} vs float64 reference: max abs diff {err:.2e}, max rel (L2) {rel:.2e}")
    splits, block_n = decode_params(32, 8, sms)
    got = decode_attention(q, pool.k[0], pool.v[0], table, torch.arange(32, device="cuda"), lens, splits,
                           block_n=block_n)
    vs_torch = (got.float() - want.float()).abs().max().item()
    RESULTS["kernel"] = {"max_abs_vs_fp64": {k: v[0] for k, v in worst.items()},
                         "rel_vs_fp64": {k: v[1] for k, v in worst.items()}, "max_abs_vs_torch_bf16": vs_torch}
    say(f"kernel bf16 vs torch PagedAttention (gather+SDPA), 32 seqs <1500: max abs diff {vs_torch:.2e}")


# ---------------------------------------------------------------- kernel timing


def tune_kernel() -> None:
    from triton.testing import do_bench

    from minisgl.engine.attention import PagedAttention
    from minisgl.cache.kv_pool import KVPool
    from minisgl.engine.cuda.triton_attention import DecodeScratch, decode_attention, decode_params

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator().manual_seed(1)
    heads, kv, d = 16, 8, 128
    rows_out = []
    best_by_b = {}
    for bsz in (1, 32, 256):
        lens = torch.randint(100, 2049, (bsz,), generator=gen)
        total = int(lens.sum())
        pool = KVPool(1, kv, d, total + 8, torch.bfloat16, "cuda")
        pool.k[0].normal_()
        pool.v[0].normal_()
        table = torch.zeros(bsz, 2049, dtype=torch.int64)
        perm = torch.randperm(total, generator=gen) + 1  # every token somewhere else: the worst case
        off = 0
        for i in range(bsz):
            n = int(lens[i])
            table[i, :n] = perm[off:off + n]
            off += n
        table, lens_d = table.cuda(), lens.cuda()
        rows = torch.arange(bsz, device="cuda")
        q = torch.randn(bsz, heads, d, device="cuda", dtype=torch.bfloat16)
        gbytes = total * kv * d * 2 * 2 / 1e9
        base, base_n = decode_params(bsz, kv, sms)
        results = []
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for splits in sorted({max(1, base // 4), max(1, base // 2), base, base * 2}):
                    scratch = DecodeScratch(bsz, heads, d, splits, q.device)
                    out = torch.empty_like(q)
                    fn = lambda: decode_attention(q, pool.k[0], pool.v[0], table, rows, lens_d, splits, scratch, out,
                                                  block_n=block_n, num_warps=warps)
                    ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
                    results.append((ms, block_n, warps, splits))
        results.sort()
        ctx = PagedAttention(pool, torch.zeros(0, dtype=torch.int64, device="cuda"), rows, bsz,
                             table[:, :int(lens.max())], lens_d, [])
        torch_ms = do_bench(lambda: ctx._decode(pool.k[0], pool.v[0], q), warmup=5, rep=40, return_mode="median")
        default = next(r for r in results if r[1:] == (base_n, 4, base))
        best = results[0]
        if bsz == 256:  # the same lengths with each sequence's slots in one run (prefill-like layout)
            contig = torch.zeros_like(table)
            off = 1
            for i in range(bsz):
                n = int(lens[i])
                contig[i, :n] = torch.arange(off, off + n, device="cuda")
                off += n
            ms = do_bench(lambda: decode_attention(q, pool.k[0], pool.v[0], contig, rows, lens_d, base,
                                                   block_n=base_n), warmup=10, rep=40, return_mode="median")
            RESULTS["contiguous_256_ms"] = ms
            say(f"decode kernel batch 256, default config, contiguous slots: {ms:.4f} ms, {gbytes / ms * 1000:.0f} GB/s")
        best_by_b[bsz] = best
        rows_out.append((bsz, total, gbytes, default, best, torch_ms))
        RESULTS.setdefault("tune", {})[bsz] = {"kv_gbytes": gbytes, "default": default, "best": best,
                                               "top5": results[:5], "torch_ms": torch_ms}
    say("decode kernel, bf16, 16 q / 8 kv heads x 128, lens U[100,2048], shuffled slots (one layer):")
    say(f"  {'batch':>5} {'ctx tok':>8} {'KV MB':>7} | {'default ms':>10} {'GB/s':>6} | {'best ms':>8} {'GB/s':>6} "
        f"{'(BLOCK_N,warps,splits)':>22} | {'torch ms':>8} {'GB/s':>6}")
    for bsz, total, gb, default, best, torch_ms in rows_out:
        say(f"  {bsz:>5} {total:>8} {gb * 1000:>7.1f} | {default[0]:>10.4f} {gb / default[0] * 1000:>6.0f} | "
            f"{best[0]:>8.4f} {gb / best[0] * 1000:>6.0f} {str(best[1:]):>22} | {torch_ms:>8.4f} "
            f"{gb / torch_ms * 1000:>6.0f}")


# ---------------------------------------------------------------- model-level checks


def make_backend(name: str, dtype: str, model_dir: Path = CONFIG, **extra):
    from minisgl.backends.base import BackendConfig
    from minisgl.backends.base import create_backend

    return create_backend(name, BackendConfig(model_path=str(model_dir), device="cuda", dtype=dtype, load_format="dummy",
                                              max_running=extra.pop("max_running", 16),
                                              kv_cache_tokens=extra.pop("kv_cache_tokens", 32768),
                                              chunk_size=extra.pop("chunk_size", 512), seed=0,
                                              extra={k: str(v) for k, v in extra.items()}))


def free(backend) -> None:
    backend.shutdown()
    del backend
    gc.collect()
    torch.cuda.empty_cache()


def generate(backend, prompts: list[list[int]], max_new: int) -> dict[str, list[int]]:
    from minisgl.messages import SamplingParams, TokenizedReq

    for i, p in enumerate(prompts):
        backend.add_request(TokenizedReq(rid=str(i), input_ids=p, arrival=0.0,
                                         params=SamplingParams(max_new_tokens=max_new, ignore_eos=True)))
    tokens: dict[str, list[int]] = {}
    while backend.has_work():
        for item in backend.step().outputs:
            tokens.setdefault(item.rid, []).extend(item.token_ids)
    return tokens


def first_divergence(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return -1 if len(a) == len(b) else min(len(a), len(b))


def check_greedy() -> None:
    import random

    rng = random.Random(0)
    prompts = [[rng.randint(0, 9999) for _ in range(n)] for n in (5, 37, 300, 700, 1100)]
    max_new = 32
    out = {}
    for dtype in ("float32", "bfloat16"):
        runs = {}
        for name, extra in (("torch", {}), ("sgl", {}), ("sgl-eager", {"cuda_graph": 0})):
            be = make_backend(name.split("-")[0], dtype, **extra)
            runs[name] = generate(be, prompts, max_new)
            free(be)
        for other in ("sgl", "sgl-eager"):
            divs = [first_divergence(runs["torch"][str(i)], runs[other][str(i)]) for i in range(len(prompts))]
            same = sum(d == -1 for d in divs)
            out[f"{dtype} {other} vs torch"] = divs
            say(f"greedy {dtype:8s} {other:9s} vs torch: {same}/{len(prompts)} prompts equal over {max_new} tokens"
                + ("" if same == len(prompts) else f" (first divergence at {divs})"))
        divs = [first_divergence(runs["sgl"][str(i)], runs["sgl-eager"][str(i)]) for i in range(len(prompts))]
        say(f"greedy {dtype:8s} sgl graphs vs eager: {sum(d == -1 for d in divs)}/{len(prompts)} equal")
        out[f"{dtype} graph vs eager"] = divs
    RESULTS["greedy"] = out


def time_steps() -> None:
    import random

    from minisgl.messages import SamplingParams, TokenizedReq

    rng = random.Random(1)
    rows = []
    for name, extra in (("torch", {}), ("sgl-eager", {"cuda_graph": 0}), ("sgl", {})):
        be = make_backend(name.split("-")[0], "bfloat16", max_running=256, kv_cache_tokens=300_000,
                          chunk_size=8192, **extra)
        for bsz in (1, 64, 256):
            for i in range(bsz):
                ids = [rng.randint(0, 9999) for _ in range(512)]
                be.add_request(TokenizedReq(rid=f"{bsz}-{i}", input_ids=ids, arrival=0.0,
                                            params=SamplingParams(max_new_tokens=48, ignore_eos=True)))
            times = []
            while be.has_work():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = be.step()
                times.append((time.perf_counter() - t0, sum(1 for o in out.outputs if o.token_ids)))
            dec = [t for t, n in times if n == bsz][2:]  # every request decoding (skip the first two)
            rows.append((name, bsz, statistics.median(dec) * 1000 if dec else float("nan")))
            be.flush_cache()
        free(be)
    RESULTS["steps"] = rows
    say("decode step time (ms, median, bf16, context 512-560, every request decoding):")
    by = {(n, b): ms for n, b, ms in rows}
    say(f"  {'batch':>5} {'torch':>8} {'sgl eager':>10} {'sgl graph':>10}")
    for b in (1, 64, 256):
        say(f"  {b:>5} {by[('torch', b)]:>8.2f} {by[('sgl-eager', b)]:>10.2f} {by[('sgl', b)]:>10.2f}")


# ---------------------------------------------------------------- offline bench


class Timers:
    """Wall time spent inside some engine methods, per step, to split a step into CPU work and the GPU
    wait, grouped by how the step ran (graph, graph+eager, eager)."""

    def __init__(self) -> None:
        self.cur: dict[str, float] = {}
        self.steps: list[tuple[str, float, dict[str, float]]] = []
        self.undo = []

    def _patch(self, cls, name: str, new) -> None:
        self.undo.append((cls, name, cls.__dict__.get(name)))
        setattr(cls, name, new)

    def wrap(self, cls, name: str, label: str) -> None:
        fn = getattr(cls, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.cur[label] = self.cur.get(label, 0.0) + time.perf_counter() - t0

        self._patch(cls, name, timed)

    def wrap_step(self, cls) -> None:
        fn = cls.step

        def step(engine, *a, **k):
            before = dict(engine.step_kinds)
            self.cur = {}
            t0 = time.perf_counter()
            out = fn(engine, *a, **k)
            dt = time.perf_counter() - t0
            kind = next((n for n, c in engine.step_kinds.items() if c != before[n]), "no forward")
            self.steps.append((kind, dt, self.cur))
            return out

        self._patch(cls, "step", step)

    def restore(self) -> None:
        for cls, name, own in reversed(self.undo):
            if own is None:
                delattr(cls, name)
            else:
                setattr(cls, name, own)

    def report(self) -> dict:
        kinds: dict[str, dict] = {}
        for kind, dt, parts in self.steps:
            k = kinds.setdefault(kind, {"n": 0, "s": 0.0, "parts": {}})
            k["n"] += 1
            k["s"] += dt
            for name, t in parts.items():
                k["parts"][name] = k["parts"].get(name, 0.0) + t
        for kind, k in kinds.items():
            say(f"  {kind:12s} steps {k['n']:5d}: {k['s']:6.2f}s, mean {1000 * k['s'] / k['n']:6.2f} ms = "
                + ", ".join(f"{n} {1000 * t / k['n']:.2f}" for n, t in k["parts"].items()))
        return kinds


def offline_breakdown(out_dir: Path, argv: list[str], label: str) -> None:
    """bench/offline.py in this process, with every engine step timed and split into its parts."""
    import bench.offline as off
    from minisgl.engine.cuda.engine import SGLEngine
    from minisgl.engine.sampler import Sampler

    timers = Timers()
    real = off.run_workload

    def run_workload(backend, work, prefix, *a):
        timers.steps.clear()
        return real(backend, work, prefix, *a)

    off.run_workload = run_workload
    timers.wrap_step(SGLEngine)
    timers.wrap(SGLEngine, "_schedule", "schedule")
    timers.wrap(SGLEngine, "_build_batch", "build")
    timers.wrap(SGLEngine, "forward", "launch")
    timers.wrap(Sampler, "sample", "sample+wait")
    try:
        rc = off.main(argv + ["--out-dir", str(out_dir), "--tag", label])
    finally:
        off.run_workload = real
        timers.restore()
    files = sorted(glob.glob(str(out_dir / f"offline_*_{label}.json")))
    if rc != 0 or not files:
        say(f"offline {label}: FAILED (rc={rc})")
        return
    r = json.loads(Path(files[-1]).read_text())
    frac = r["roofline"]["fraction"]
    say(f"offline {label} ({' '.join(argv[4:]) or 'defaults'}): {r['backend']} {r['output_tokens']} out tok in "
        f"{r['elapsed_s']:.2f}s = {r['output_tok_s']:.0f} out tok/s, roofline {100 * frac['all_steps']:.1f}% all / "
        f"{100 * (frac['decode_steps'] or 0):.1f}% decode-only, {r['steps']} steps, ok={r['ok']}")
    say("  per step kind (ms per step: CPU schedule, batch build, forward launch, sampler incl. GPU wait):")
    kinds = timers.report()
    RESULTS.setdefault("offline_breakdown", {})[label] = {
        "result": {k: r[k] for k in ("elapsed_s", "output_tok_s", "steps", "ok")}, "roofline": frac, "kinds": kinds}


def offline(out_dir: Path, full: bool) -> None:
    runs = [("sgl-small(auto)", [], "small_auto"), ("torch-small", ["--backend", "torch"], "small_torch")]
    small = ["--num-seqs", "64", "--max-input", "512", "--max-output", "256"]
    if full:
        runs.append(("sgl-full(auto)", [], "full_auto"))
    table = []
    for label, extra, tag in runs:
        args = ["--load-format", "dummy", "--config", str(CONFIG), "--out-dir", str(out_dir), "--tag", tag] + extra
        if "small" in tag:
            args += small
        cmd = [sys.executable, str(REPO / "bench" / "offline.py")] + args
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        print(proc.stdout[-2000:], proc.stderr[-3000:], flush=True)
        files = sorted(glob.glob(str(out_dir / f"offline_*_{tag}.json")))
        if proc.returncode != 0 or not files:
            say(f"offline {label}: FAILED rc={proc.returncode} after {time.perf_counter() - t0:.0f}s")
            continue
        r = json.loads(Path(files[-1]).read_text())
        frac = r["roofline"]["fraction"]
        table.append((label, r["backend"], r["device_name"], r["workload"]["output_tokens"], r["elapsed_s"],
                      r["output_tok_s"], frac["all_steps"], frac["decode_steps"], r["ok"], r["steps"]))
    RESULTS["offline"] = table
    say("bench/offline.py (Qwen3-0.6B dummy, bf16):")
    say(f"  {'run':16s} {'backend':7s} {'out tok':>8} {'time s':>7} {'out tok/s':>10} {'roof all':>8} "
        f"{'roof dec':>8} {'steps':>6} ok")
    for label, be, dev, tok, el, tps, fa, fd, ok, steps in table:
        say(f"  {label:16s} {be:7s} {tok:>8} {el:>7.1f} {tps:>10.0f} {100 * (fa or 0):>7.1f}% {100 * (fd or 0):>7.1f}% "
            f"{steps:>6} {ok}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"))
    p.add_argument("--skip", default="")
    p.add_argument("--offline-full", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (tests/test_sgl_backend.py covers the CPU side)")
        return 0
    import triton

    from minisgl.backends.sgl_backend import kernel_path

    say(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}, "
        f"kernels {kernel_path()}")
    failed = []
    cfg = ["--load-format", "dummy", "--config", str(CONFIG)]
    stages = [("kernel", check_kernel), ("tune", tune_kernel), ("greedy", check_greedy),
              ("full", lambda: offline_breakdown(out_dir, cfg, "sgl_full")),
              ("offline", lambda: offline(out_dir, args.offline_full)), ("steps", time_steps)]
    for name, fn in stages:
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:
            traceback.print_exc()
            failed.append(name)
            say(f"stage {name}: FAILED (traceback above)")
        print(f"[stage {name}: {time.perf_counter() - t0:.1f}s]", flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        (out_dir / "summary.txt").write_text("\n".join(SUMMARY) + "\n")
    print("\n===== summary =====")
    print("\n".join(SUMMARY))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
