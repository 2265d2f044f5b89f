"""Where a GPU step's time goes: kernel tables of the sgl engine's decode steps, and the GEMVs alone.

    python bench/gpu_profile.py --out DIR      # on a CUDA machine; writes gpu_profile.json and .md

  steps   the sgl engine (Qwen3-0.6B shape, bf16 dummy weights) with batch 1 and 8 decoding at context
          ~512: wall per step over 50 steps, then torch.profiler over 20 steps (CUDA kernels inside the
          graph replay included): every kernel's count per step and time, sorted by time
  prefill a 44-token prompt alone (the TTFT's GPU part): wall of the step that prefills it
  gemv    each of the model's projections at batch 1..8 as cuBLAS does it (F.linear) and as a Triton
          GEMV does it, each timed as 200 calls inside one CUDA graph (no launch cost from Python)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from bench.gpu_check import free, make_backend
from bench.gpu_serve import VOCAB, build_model_dir, default_tokenizer_dir

RESULTS: dict = {}


def kernel_table(prof, steps: int, top: int = 40) -> list[dict]:
    from torch.autograd import DeviceType

    rows = []
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA:  # CPU-side ops and runtime calls
            continue
        dev_us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if not dev_us:
            continue
        rows.append({"kernel": e.key[:110], "per_step": e.count / steps, "us_per_step": dev_us / steps,
                     "us_each": dev_us / max(1, e.count)})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:top]


def decode_steps(model_dir: Path, batches: tuple[int, ...], variant: str, extra: dict) -> None:
    from minisgl.messages import SamplingParams, TokenizedReq
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(1)
    be = make_backend("sgl", "bfloat16", model_dir=model_dir, max_running=64, kv_cache_tokens=100_000, chunk_size=8192,
                      **extra)
    print(f"== variant {variant} {extra}", flush=True)
    out: dict = {}
    for bsz in batches:
        for i in range(bsz):
            ids = [rng.randint(3, VOCAB - 1) for _ in range(512)]
            be.add_request(TokenizedReq(rid=f"{bsz}-{i}", input_ids=ids, arrival=0.0,
                                        params=SamplingParams(max_new_tokens=200, ignore_eos=True)))
        full = 0
        while full < 3:
            o = be.step()
            full = full + 1 if sum(1 for x in o.outputs if x.token_ids) == bsz else 0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            be.step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) / 50 * 1000
        # host time of one step with the GPU idle (sync first): what overlap must hide
        host = []
        for _ in range(10):
            torch.cuda.synchronize()
            t = time.perf_counter()
            be.step()
            host.append((time.perf_counter() - t) * 1000)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                be.step()
            torch.cuda.synchronize()
        table = kernel_table(prof, 20)
        total = sum(r["us_per_step"] for r in kernel_table(prof, 20, top=10_000))
        kernels = sum(r["per_step"] for r in kernel_table(prof, 20, top=10_000))
        out[bsz] = {"wall_ms": wall_ms, "host_ms_median": sorted(host)[len(host) // 2], "kernel_us_per_step": total,
                    "kernels_per_step": kernels, "table": table}
        print(f"batch {bsz}: wall {wall_ms:.3f} ms/step, host (GPU idle) {out[bsz]['host_ms_median']:.3f} ms, "
              f"kernel time {total:.0f} us/step over {kernels:.0f} kernels", flush=True)
        for r in table[:25]:
            print(f"   {r['us_per_step']:8.1f} us  {r['per_step']:6.1f}x  {r['us_each']:6.2f} us each  {r['kernel']}", flush=True)
        while be.has_work():
            be.step()
        be.flush_cache()
    # a short prompt alone: the GPU part of TTFT
    pre = []
    for j in range(6):
        ids = [rng.randint(3, VOCAB - 1) for _ in range(44)]
        be.add_request(TokenizedReq(rid=f"p{j}", input_ids=ids, arrival=0.0,
                                    params=SamplingParams(max_new_tokens=1, ignore_eos=True)))
        torch.cuda.synchronize()
        t = time.perf_counter()
        while be.has_work():
            be.step()
        torch.cuda.synchronize()
        pre.append((time.perf_counter() - t) * 1000)
    out["prefill_44_ms"] = pre
    print(f"44-token prompt, whole request (prefill + 1 token): {[round(x, 2) for x in pre]} ms", flush=True)
    # where the host spends a short prompt's prefill
    import cProfile
    import io
    import pstats

    prof_c = cProfile.Profile()
    for j in range(3):
        ids = [rng.randint(3, VOCAB - 1) for _ in range(44)]
        be.add_request(TokenizedReq(rid=f"q{j}", input_ids=ids, arrival=0.0,
                                    params=SamplingParams(max_new_tokens=1, ignore_eos=True)))
        prof_c.enable()
        while be.has_work():
            be.step()
        torch.cuda.synchronize()
        prof_c.disable()
    buf = io.StringIO()
    pstats.Stats(prof_c, stream=buf).sort_stats("tottime").print_stats(25)
    print(buf.getvalue()[-6000:], flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ids = [rng.randint(3, VOCAB - 1) for _ in range(44)]
        be.add_request(TokenizedReq(rid="r", input_ids=ids, arrival=0.0,
                                    params=SamplingParams(max_new_tokens=1, ignore_eos=True)))
        while be.has_work():
            be.step()
        torch.cuda.synchronize()
    pt = kernel_table(prof, 1, top=10_000)
    print(f"prefill request: {sum(r['per_step'] for r in pt):.0f} kernels, {sum(r['us_per_step'] for r in pt):.0f} us of GPU", flush=True)
    for r in pt[:12]:
        print(f"   {r['us_per_step']:8.1f} us  {r['per_step']:6.1f}x  {r['kernel']}", flush=True)
    # one stream, in-process: a 44-token prompt and 128 new tokens, start to end
    one = []
    for j in range(4):
        ids = [rng.randint(3, VOCAB - 1) for _ in range(44)]
        be.add_request(TokenizedReq(rid=f"s{j}", input_ids=ids, arrival=0.0,
                                    params=SamplingParams(max_new_tokens=128, ignore_eos=True)))
        t = time.perf_counter()
        while be.has_work():
            be.step()
        torch.cuda.synchronize()
        one.append(128 / (time.perf_counter() - t))
    out["one_stream_tok_s"] = one
    out["step_kinds"] = dict(be.engine.step_kinds)
    print(f"step kinds: {out['step_kinds']}", flush=True)
    print(f"one stream in-process (44-token prompt, 128 tokens): {[round(x) for x in one]} tok/s", flush=True)
    RESULTS.setdefault("steps", {})[variant] = out
    free(be)


def triton_gemv():
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv(X, W, Y, N, K, stride_xm, stride_wn, stride_ym, M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = rn < N
        for m in tl.static_range(M):
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(X + m * stride_xm + rk).to(tl.float32)
                w = tl.load(W + rn[:, None] * stride_wn + rk[None, :], mask=mn[:, None], other=0.0).to(tl.float32)
                acc += tl.sum(w * x[None, :], axis=1)
            tl.store(Y + m * stride_ym + rn, acc.to(Y.dtype.element_ty), mask=mn)

    def run(x, w, y, block_n, block_k, warps):
        M, K = x.shape
        N = w.shape[0]
        _gemv[(triton.cdiv(N, block_n),)](x, w, y, N, K, x.stride(0), w.stride(0), y.stride(0), M=M,
                                          BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return run


def time_in_graph(fn, reps: int = 200) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(5):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1000 / (5 * reps)


def gemv_rotating() -> None:
    """The shipped kernel (engine/cuda/triton_gemv.py) against cuBLAS at batch 1 with the weights rotating over
    copies that do not fit in L2 (as in a real step, each weight comes from HBM), for each config."""
    from minisgl.engine.cuda.triton_gemv import PRO_NORM, PRO_PLAIN, PRO_SILU, gemv, gemv_config

    dev = torch.device("cuda")
    shapes = {"qkv": (4096, 1024, PRO_NORM), "o": (1024, 2048, PRO_PLAIN), "gate_up": (6144, 1024, PRO_NORM),
              "down": (1024, 3072, PRO_SILU)}
    out = {}
    for name, (n, k, pro) in shapes.items():
        copies = max(4, int(160e6 // (n * k * 2)))
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        x = torch.randn(1, 2 * k if pro == PRO_SILU else k, device=dev, dtype=torch.bfloat16)
        xk = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        kw = dict(pro=pro)
        if pro == PRO_NORM:
            kw.update(residual=torch.randn(1, k, device=dev, dtype=torch.bfloat16),
                      norm_weight=torch.ones(k, device=dev, dtype=torch.bfloat16), eps=1e-6)

        def cublas():
            for w in ws:
                F.linear(xk, w)
        t_cublas = time_in_graph(cublas, reps=4) / copies
        row = {"cublas_us": t_cublas, "default_cfg": gemv_config(n, k, pro), "configs": {}}
        cfgs = ((2, 1024, 4), (4, 1024, 4), (4, 1024, 8), (8, 1024, 4), (8, 1024, 8), (16, 1024, 8), (4, 512, 4),
                (8, 256, 8)) if pro == PRO_NORM else \
            ((1, 1024, 4), (2, 1024, 4), (2, 1024, 8), (4, 1024, 8), (2, 2048, 8), (4, 512, 4), (2, 512, 4))
        for cfg in cfgs:
            def tri():
                for w in ws:
                    gemv(x, w, **kw, config=cfg)
            try:
                row["configs"][str(cfg)] = time_in_graph(tri, reps=4) / copies
            except Exception as e:  # noqa: BLE001
                row["configs"][str(cfg)] = f"{type(e).__name__}"
        best = min((v, c) for c, v in row["configs"].items() if isinstance(v, float))
        out[name] = row
        print(f"{name:8s} HBM: cuBLAS {t_cublas:6.2f} us ({n * k * 2 / t_cublas / 1e3:5.0f} GB/s); triton best {best[0]:6.2f} us "
              f"{best[1]} ({n * k * 2 / best[0] / 1e3:5.0f} GB/s); default {gemv_config(n, k, pro)}: "
              f"{row['configs'].get(str(gemv_config(n, k, pro)))}", flush=True)
    RESULTS["gemv_rotating"] = out


def gemv_bench() -> None:
    dev = torch.device("cuda")
    shapes = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072), "lm_head": (49152, 1024)}
    run = triton_gemv()
    out = {}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        for m in (1, 2, 4, 8):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x, w)
            cublas = time_in_graph(lambda: F.linear(x, w))
            best = None
            for bn in (4, 8, 16, 32):
                for bk in (128, 256, 512):
                    for warps in (2, 4, 8):
                        if bk > k:
                            continue
                        try:
                            run(x, w, y, bn, bk, warps)
                            torch.cuda.synchronize()
                            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                            if err > 2e-2:
                                continue
                            t = time_in_graph(lambda: run(x, w, y, bn, bk, warps), reps=100)
                        except Exception as e:  # noqa: BLE001
                            print(f"  {name} m={m} bn={bn} bk={bk} w={warps}: {type(e).__name__}", flush=True)
                            continue
                        if best is None or t < best[0]:
                            best = (t, bn, bk, warps)
            gbps = (n * k * 2) / (best[0] * 1e-6) / 1e9 if best else 0
            out[f"{name}/m{m}"] = {"cublas_us": cublas, "triton_us": best[0] if best else None,
                                   "triton_cfg": best[1:] if best else None,
                                   "cublas_GBps": n * k * 2 / (cublas * 1e-6) / 1e9, "triton_GBps": gbps}
            print(f"{name:8s} m={m}: cuBLAS {cublas:6.2f} us ({n * k * 2 / (cublas * 1e-6) / 1e9:5.0f} GB/s), "
                  f"triton {best[0] if best else float('nan'):6.2f} us ({gbps:5.0f} GB/s) cfg {best[1:] if best else None}",
                  flush=True)
    RESULTS["gemv"] = out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results/gpu_profile"))
    p.add_argument("--tokenizer-dir", default=None)
    p.add_argument("--skip", default="gemv")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    tok = Path(args.tokenizer_dir) if args.tokenizer_dir else default_tokenizer_dir()
    model_dir = build_model_dir(Path(os.environ.get("TMPDIR", "/tmp")) / "minisgl_gpu_profile", tok)
    RESULTS["device"] = torch.cuda.get_device_name(0)
    stages = (("gemv_rotating", gemv_rotating), ("gemv", gemv_bench),
              ("steps", lambda: decode_steps(model_dir, (1, 8), "default", {})),
              ("steps_gemv_off", lambda: decode_steps(model_dir, (1,), "gemv-off", {"gemv": 0})))
    for name, fn in stages:
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        print(f"[{name}: {time.perf_counter() - t0:.1f}s]", flush=True)
        (out / "gpu_profile.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
