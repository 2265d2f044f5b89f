"""The GPU numbers in one command: the sgl server with default settings, measured through the gateway.

    python bench/gpu_serve.py                    # on a CUDA machine; everything lands in --out
    python bench/gpu_serve.py --skip hf,offline  # fewer stages

Stages (each timed; a failed stage is reported and the rest still run):

  kernels  the fused Triton kernels and the paged extend attention against torch / float64 references
           at the served model's shapes, on fresh random inputs (bf16 and fp32)
  greedy   the sgl backend's greedy tokens against the torch backend's in float32 on the same dummy
           weights, for every sgl variant: default (graphs, fused kernels, extend kernel), no CUDA graphs,
           and the plain path (no fused kernels, SDPA prefill), each with overlap scheduling on and off
  steps    decode step time at batch 1 / 64 / 256 (context ~512): default, overlap off, and the plain path
  serve    `launch.py --backend sgl` with no sizing flags (device-sized defaults) on the Qwen3-0.6B shape
           with dummy bf16 weights and SmolLM2's tokenizer (vocab 49152, bos/eos/pad 1/2/2), then the
           streaming bench client (bench/bench_suite.py against it) at each --concurrency for ~45-token
           (short) and ~315-token (medium) prompts, 128 output tokens, ignore_eos; each process's CPU
           (share of one core) sampled around every level; then overlap off at c=1 and c=256 (serve_sync)
  hf       random bf16 safetensors of the same shape (transformers' from_pretrained loads them), the
           sgl and hf servers on them at concurrency 4: bench_suite's ratio
  offline  bench/offline.py (nano-vllm's workload) on the default backend, then with overlap off

Writes gpu_serve.json, gpu_serve.md, gpu_serve.png (matplotlib, when it is there) and every log into
--out, and packs all of it into gpu_serve.tar.gz beside them.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.gpu_check import free, generate, make_backend  # the same in-process helpers

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "bench" / "configs" / "qwen3-0.6b"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja")
# SmolLM2's tokenizer on the Qwen3-0.6B shape: its vocabulary and special ids
VOCAB, BOS, EOS, PAD = 49152, 1, 2, 2

RESULTS: dict[str, Any] = {}
SUMMARY: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)
    SUMMARY.append(line)


# ---------------------------------------------------------------- model folders


def build_model_dir(dest: Path, tokenizer_dir: Path) -> Path:
    """config.json of the Qwen3-0.6B shape with SmolLM2's vocabulary and ids, plus its tokenizer files."""
    dest.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((CONFIG / "config.json").read_text())
    cfg.update(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    gen = json.loads((CONFIG / "generation_config.json").read_text())
    gen.update(bos_token_id=BOS, eos_token_id=[EOS], pad_token_id=PAD)
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=1))
    found = [f for f in TOKENIZER_FILES if (tokenizer_dir / f).exists()]
    if "tokenizer.json" not in found:
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}")
    for f in found:
        shutil.copy(tokenizer_dir / f, dest / f)
    return dest


def save_random_weights(dest: Path) -> None:
    """Random bf16 safetensors of the same shape, saved by transformers so from_pretrained loads them."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(dest)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def default_tokenizer_dir() -> Path:
    from minisgl.assets.embedded import resolve_model_dir

    return resolve_model_dir(None, None)


# ---------------------------------------------------------------- kernels at the model's shapes


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def check_kernels() -> None:
    import torch.nn.functional as F

    from minisgl.engine.cuda.triton_fused import (add_rmsnorm, extend_attention, extend_attention_reference,
                                             extend_meta, qk_norm_rope_store, silu_mul)
    from minisgl.models.layers import RotaryEmbedding, apply_rope

    dev = "cuda"
    out: dict[str, float] = {}
    heads, kv_heads, d, hidden, inter = 16, 8, 128, 1024, 3072
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).split(".")[-1]
        for t in (1, 300):
            x = torch.randn(t, hidden, device=dev, dtype=dtype)
            r = torch.randn(t, hidden, device=dev, dtype=dtype)
            w = torch.rand(hidden, device=dev, dtype=dtype) + 0.5
            o, s = add_rmsnorm(x, r, w, 1e-6)
            out[f"add_rmsnorm {name} T={t}"] = max(rel_err(o, F.rms_norm((x.double() + r.double()), (hidden,), w.double(), 1e-6)),
                                                   rel_err(s, x.double() + r.double()))
            gu = torch.randn(t, 2 * inter, device=dev, dtype=dtype)
            out[f"silu_mul {name} T={t}"] = rel_err(silu_mul(gu), F.silu(gu[:, :inter].double()) * gu[:, inter:].double())
            rope = RotaryEmbedding(d, 4096, 1e6, None).to(dev)
            pos = torch.randint(0, 4096, (t,), device=dev)
            cos, sin = rope(pos)
            qkv = torch.randn(t, (heads + 2 * kv_heads) * d, device=dev, dtype=dtype)
            qw, kw = torch.rand(d, device=dev) + 0.5, torch.rand(d, device=dev) + 0.5
            kp = torch.full((t + 64, kv_heads, d), float("nan"), device=dev, dtype=dtype)
            vp = torch.full_like(kp, float("nan"))
            slots = torch.randperm(t + 64, device=dev)[:t]
            q = qk_norm_rope_store(qkv, cos.to(dtype), sin.to(dtype), qw.to(dtype), kw.to(dtype), 1e-6, kp, vp, slots,
                                   heads, kv_heads, d)
            qd = qkv.double()
            q_ref = apply_rope(F.rms_norm(qd[:, :heads * d].view(t, heads, d), (d,), qw.to(dtype).double(), 1e-6),
                               cos.to(dtype).double(), sin.to(dtype).double())
            k_ref = apply_rope(F.rms_norm(qd[:, heads * d:(heads + kv_heads) * d].view(t, kv_heads, d), (d,),
                                          kw.to(dtype).double(), 1e-6), cos.to(dtype).double(), sin.to(dtype).double())
            out[f"qk_norm_rope_store {name} T={t}"] = max(rel_err(q, q_ref), rel_err(kp[slots], k_ref),
                                                          rel_err(vp[slots], qd[:, (heads + kv_heads) * d:].view(t, kv_heads, d)))
        # extend: 3 chunks with cached prefixes, one cold, lengths across block edges
        segments = [(2, 300, 0, 0), (302, 77, 1, 513), (379, 1, 2, 1000), (380, 129, 3, 64)]
        total = 509
        kp = torch.randn(4000, kv_heads, d, device=dev, dtype=dtype)
        vp = torch.randn_like(kp)
        table = torch.stack([torch.randperm(4000, device=dev)[:1200] for _ in range(4)])
        q = torch.randn(total, heads, d, device=dev, dtype=dtype)
        flat, blocks, segs = extend_meta(segments)
        o = torch.full_like(q, float("nan"))
        extend_attention(q, kp, vp, table, torch.tensor(flat, device=dev), blocks, segs, o)
        ref = extend_attention_reference(q, kp, vp, table, segments)
        out[f"extend_attention {name}"] = max(rel_err(o[s:s + n], ref[s]) for s, n, _, _ in segments)
        if o[2:].isnan().any():
            out[f"extend_attention {name}"] = float("nan")
    RESULTS["kernels"] = out
    bad = {k: v for k, v in out.items() if not (v < (1e-2 if "bfloat16" in k else 1e-4))}
    say(f"kernels: {len(out) - len(bad)}/{len(out)} within tolerance (rel L2 vs float64: bf16 < 1e-2, fp32 < 1e-4)"
        + (f"; FAILED {bad}" if bad else f"; worst bf16 {max(v for k, v in out.items() if 'bfloat16' in k):.1e}, "
           f"fp32 {max(v for k, v in out.items() if 'float32' in k):.1e}"))
    if bad:
        raise AssertionError(f"kernels out of tolerance: {bad}")


# ---------------------------------------------------------------- in-process engine checks


SGL_VARIANTS: dict[str, dict[str, Any]] = {
    "sgl": {},  # the default: CUDA graphs, fused kernels, extend kernel, overlap scheduling
    "sgl-sync": {"overlap": 0},
    "sgl-eager": {"cuda_graph": 0},
    "sgl-eager-sync": {"cuda_graph": 0, "overlap": 0},
    "sgl-plain": {"fused": 0, "extend_kernel": 0, "overlap": 0},
}


def check_greedy(model_dir: Path) -> None:
    rng = random.Random(0)
    # a shared prefix makes the later prompts extend a cached prefix (the extend kernel's other case)
    shared = [rng.randint(3, VOCAB - 1) for _ in range(200)]
    prompts = [[rng.randint(3, VOCAB - 1) for _ in range(n)] for n in (5, 37, 300, 700, 1100)]
    prompts += [shared + [rng.randint(3, VOCAB - 1) for _ in range(n)] for n in (1, 20, 90)]
    max_new = 32
    runs = {}
    for name, extra in (("torch", {}), *SGL_VARIANTS.items()):
        be = make_backend(name.split("-")[0], "float32", model_dir=model_dir, chunk_size=256, **extra)
        runs[name] = generate(be, prompts, max_new)
        free(be)
    out = {}
    for name in SGL_VARIANTS:
        same = sum(runs[name][str(i)] == runs["torch"][str(i)] for i in range(len(prompts)))
        out[name] = same
        say(f"greedy float32 {name:10s} vs torch: {same}/{len(prompts)} prompts equal over {max_new} tokens "
            "(chunks of 256, so long prompts run as chunked prefill mixed with decode)")
    RESULTS["greedy"] = {"prompts": len(prompts), "max_new_tokens": max_new, "equal": out}
    if any(v != len(prompts) for v in out.values()):
        raise AssertionError(f"greedy mismatch: {out}")


def time_steps(model_dir: Path) -> None:
    """Decode steps per second once every request decodes: wall time over 30 steps, synchronized at both
    ends (with overlap, step() returns before its GPU work is done, so one step's host time means
    nothing)."""
    from minisgl.messages import SamplingParams, TokenizedReq

    rng = random.Random(1)
    rows = []
    variants = (("sgl", {}), ("sgl-sync", {"overlap": 0}), ("sgl-unfused-sync", {"fused": 0, "extend_kernel": 0, "overlap": 0}))
    for name, extra in variants:
        be = make_backend("sgl", "bfloat16", model_dir=model_dir, max_running=256, kv_cache_tokens=300_000, chunk_size=8192,
                          **extra)
        for bsz in (1, 64, 256):
            for i in range(bsz):
                ids = [rng.randint(3, VOCAB - 1) for _ in range(512)]
                be.add_request(TokenizedReq(rid=f"{bsz}-{i}", input_ids=ids, arrival=0.0,
                                            params=SamplingParams(max_new_tokens=64, ignore_eos=True)))
            full = 0
            while full < 3:  # until every request has decoded for a few steps
                out = be.step()
                full = full + 1 if sum(1 for o in out.outputs if o.token_ids) == bsz else 0
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(30):
                be.step()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / 30 * 1000
            while be.has_work():
                be.step()
            rows.append({"variant": name, "batch": bsz, "decode_ms": ms})
            be.flush_cache()
        free(be)
    RESULTS["steps"] = rows
    say("decode step (ms, bf16, context ~520-550, every request decoding; wall over 30 steps):")
    for r in rows:
        say(f"  {r['variant']:16s} batch {r['batch']:>3}: {r['decode_ms']:.2f} ms ({1000 * r['batch'] / r['decode_ms']:,.0f} tok/s)")


# ---------------------------------------------------------------- through the gateway


class CpuSampler:
    """CPU seconds of each process of a server tree (by its module name), between two samples."""

    NAMES = ("gateway", "tokenizer", "scheduler", "worker")

    def __init__(self, root_pid: int) -> None:
        import psutil

        self.root = psutil.Process(root_pid)

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                cmd = " ".join(p.cmdline())
                t = p.cpu_times()
            except Exception:  # noqa: BLE001 - a process that just left
                continue
            name = next((n for n in self.NAMES if f"procs.{n}" in cmd), "launcher")
            out[name] = out.get(name, 0.0) + t.user + t.system
        return out


def bench_level(url: str, case: str, conc: int, args: argparse.Namespace, out_dir: Path, tag: str) -> dict[str, Any]:
    """One level through bench_suite's streaming client, split over several client processes at high
    concurrency: one Python process parsing 256 streams is slower than the server (measured: the
    single-client c=256 level ran at ~1 core and a third of the c=64 rate), and a load generator must
    not be what is measured. Throughput is all clients' tokens over the longest client's wall time;
    latency percentiles are over every request of every client."""
    from bench.common import percentile, summarize

    clients = max(1, min(args.max_clients, conc // args.conc_per_client))
    per = [conc // clients + (1 if i < conc % clients else 0) for i in range(clients)]
    procs = []
    for i, c in enumerate(per):
        argv = [sys.executable, str(REPO / "bench" / "bench_suite.py"), "--target-url", url, "--backends", "sgl",
                "--cases", case, "--concurrency", str(c), "--max-new-tokens", str(args.max_new_tokens),
                "--repeat", str(args.repeat), "--warmup", "1", "--seed", str(1000 * conc + i), "--out-dir",
                str(out_dir), "--tag", f"{tag}_p{i}", "--raw", "--prompt-scale", str(args.medium_scale if case == "medium" else args.prompt_scale)]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"bench client failed (rc {proc.returncode}): {err[-1500:]}")
    runs = []
    for i in range(clients):
        report = json.loads(sorted(out_dir.glob(f"bench_*_{tag}_p{i}.json"))[-1].read_text())
        runs.append(report["systems"][0]["runs"][0])
    recs = [rec for r in runs for rec in r.get("request_records", [])]
    ok = [rec for rec in recs if rec.get("ok", rec.get("error") is None)]
    wall = max(r["wall_s"] for r in runs)
    out_tokens = sum(r["output_tokens"] for r in runs)
    ttft = [rec["ttft_s"] for rec in ok if rec.get("ttft_s") is not None]
    tpot = [(rec["e2e_s"] - rec["ttft_s"]) / (rec["completion_tokens"] - 1) for rec in ok
            if rec.get("ttft_s") is not None and rec.get("completion_tokens", 0) > 1]
    return {
        "case": case, "concurrency": conc, "clients": clients, "requests": sum(r["requests"] for r in runs),
        "ok": sum(r["ok"] for r in runs), "failed": sum(r["failed"] for r in runs),
        "errors": sorted({e for r in runs for e in r["errors"]})[:5], "output_tokens": out_tokens,
        "prompt_tokens": sum(r["prompt_tokens"] for r in runs), "wall_s": wall,
        "output_tok_s": out_tokens / wall if wall > 0 else 0.0,
        "ttft_ms": summarize(ttft, 1000.0), "tpot_ms": summarize(tpot, 1000.0),
        # ITL percentiles per client (gaps between deltas do not merge from summaries): their median
        "itl_ms": {q: percentile([r["itl_ms"][q] for r in runs if r["itl_ms"][q] is not None], 50)
                   for q in ("p50", "p90", "p99")},
        "scaled_down": sum(r["scaled_down"] for r in runs),
        "finish_reasons": {k: sum(r["finish_reasons"].get(k, 0) for r in runs)
                           for k in {k for r in runs for k in r["finish_reasons"]}},
    }


def serve_sweep(model_dir: Path, args: argparse.Namespace, out_dir: Path, key: str = "serve",
                env_extra: dict[str, str] | None = None, cases: list[str] | None = None,
                concurrency: list[int] | None = None) -> None:
    from minisgl.server_handle import ServerHandle

    log = out_dir / f"server_{key}.log"
    env = dict(env_extra or {})
    if "kernels" in RESULTS.get("failed", []):  # still measure the server, on the kernels that were checked
        env.update(MINISGL_SGL_FUSED="0", MINISGL_SGL_EXTEND_KERNEL="0")
        say("serve: the fused kernels failed their check; serving without them (MINISGL_SGL_FUSED=0, EXTEND_KERNEL=0)")
    srv = ServerHandle(env=env, args=["--backend", args.backend, "--model-local-dir", str(model_dir), "--load-format", "dummy"],
                       port=args.port, log_path=str(log), startup_timeout=600)
    t0 = time.perf_counter()
    srv.start()
    startup = time.perf_counter() - t0
    say(f"{key}: {args.backend} server ({'default settings' + (f', {env}' if env else '')}) healthy after {startup:.0f}s; "
        + "; ".join(line.split("launch ", 1)[-1].strip() for line in log.read_text().splitlines()
                    if "device-sized" in line or "sgl backend:" in line)[:600])
    levels = []
    try:
        sampler = CpuSampler(srv.pid)
        for case in cases or args.cases:
            for conc in concurrency or args.concurrency:
                before, w0 = sampler.sample(), time.perf_counter()
                run = bench_level(srv.url, case, conc, args, out_dir / "levels", f"{key}_{case}_c{conc}")
                after, wall = sampler.sample(), time.perf_counter() - w0
                run["cpu_share"] = {k: round((after.get(k, 0) - before.get(k, 0)) / wall, 3) for k in after}
                run["cpu_wall_s"] = wall  # includes bench_suite's 2 warm-up requests
                levels.append(run)
                say(f"  {case:6s} c={conc:<3} {run['output_tok_s']:>9,.0f} out tok/s  prompt "
                    f"{run['prompt_tokens'] / max(1, run['ok']):.0f} tok  TTFT p50 {run['ttft_ms']['p50'] or 0:7.0f} ms  "
                    f"TPOT p50 {run['tpot_ms']['p50'] or 0:6.2f} ms  ITL p50 {run['itl_ms']['p50'] or 0:6.2f} ms  "
                    f"clients {run['clients']}  tokens {run['output_tokens']}/"
                    f"{run['requests'] * args.max_new_tokens}  scaled {run['scaled_down']}  failed {run['failed']}  "
                    f"cpu {run['cpu_share']}")
    finally:
        srv.stop()
    RESULTS[key] = {"startup_s": startup, "levels": levels, "max_new_tokens": args.max_new_tokens,
                    "repeat": args.repeat, "env": env}


def hf_compare(model_dir: Path, args: argparse.Namespace, out_dir: Path) -> None:
    from bench import bench_suite

    t0 = time.perf_counter()
    save_random_weights(model_dir)
    say(f"hf: random bf16 safetensors saved in {time.perf_counter() - t0:.0f}s")
    argv = ["--backends", "sgl,hf", "--model-local-dir", str(model_dir), "--cases", "short", "--concurrency", "4",
            "--max-new-tokens", str(args.max_new_tokens), "--min-requests", "8", "--warmup", "2",
            "--out-dir", str(out_dir / "hf"), "--tag", "hf_c4"]
    bench_suite.main(argv)
    report = json.loads(sorted((out_dir / "hf").glob("bench_*_hf_c4.json"))[-1].read_text())
    rows = {s["name"]: s["runs"][0] for s in report["systems"] if s.get("runs")}
    ours, theirs = rows.get("mini-sglang"), rows.get("hf-baseline")
    ratio = ours["output_tok_s"] / theirs["output_tok_s"] if ours and theirs and theirs["output_tok_s"] else None
    RESULTS["hf"] = {"sgl_tok_s": ours and ours["output_tok_s"], "hf_tok_s": theirs and theirs["output_tok_s"],
                     "ratio": ratio, "comparison": report.get("comparison")}
    say(f"hf c=4: sgl {ours and ours['output_tok_s']:,.0f} vs hf {theirs and theirs['output_tok_s']:,.0f} out tok/s: "
        f"{ratio:.1f}x" if ratio else f"hf c=4: incomplete ({list(rows)})")


def offline(out_dir: Path) -> None:
    """bench/offline.py with default settings, then with overlap scheduling off (A/B)."""
    for tag, env in (("full", {}), ("full_sync", {"MINISGL_SGL_OVERLAP": "0"})):
        cmd = [sys.executable, str(REPO / "bench" / "offline.py"), "--load-format", "dummy", "--config", str(CONFIG),
               "--out-dir", str(out_dir / "offline"), "--tag", tag]
        print("$", " ".join(cmd), env, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**os.environ, **env})
        (out_dir / f"offline_{tag}.log").write_text(proc.stdout + proc.stderr)
        files = sorted((out_dir / "offline").glob(f"offline_*_{tag}.json"))
        if proc.returncode != 0 or not files:
            raise RuntimeError(f"offline.py failed (rc {proc.returncode}): {proc.stderr[-1500:]}")
        r = json.loads(files[-1].read_text())
        RESULTS["offline" if tag == "full" else "offline_sync"] = {
            k: r.get(k) for k in ("backend", "device_name", "elapsed_s", "output_tok_s", "roofline", "workload", "steps", "ok")}
        say(f"offline (nano-vllm workload){' overlap off' if env else ''}: {r['output_tok_s']:,.0f} out tok/s in "
            f"{r['elapsed_s']:.1f}s, roofline {100 * (r['roofline']['fraction']['all_steps'] or 0):.0f}% (decode-only "
            f"steps {100 * (r['roofline']['fraction']['decode_steps'] or 0):.0f}%)")


# ---------------------------------------------------------------- report


TARGETS = "c=1 >= 1,000 out tok/s; c=256 short >= 20,000 with every token; c=256 medium >= 12,000; " \
          "TTFT p50 c=64 <= 300 ms; offline >= 21,000; hf c=4 >= 20x; greedy equal"


def serve_table(key: str) -> list[str]:
    serve = RESULTS.get(key)
    if not serve:
        return []
    title = "default settings" + (f", {serve['env']}" if serve.get("env") else "")
    lines = [f"## Through the gateway, {title} (sgl, Qwen3-0.6B shape, dummy bf16, streaming client)", "",
              f"{serve['max_new_tokens']} output tokens, ignore_eos, greedy; each level sends repeat "
              f"{serve['repeat']} x max(concurrency, 4) requests with `concurrency` in flight.", "",
              "| prompts | c | clients | out tok/s | prompt tok | TTFT p50 / p90 (ms) | TPOT p50 (ms) | ITL p50 / p90 (ms) "
              "| tokens delivered | scaled | failed | CPU share gateway / tokenizer / scheduler / worker |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in serve["levels"]:
        cpu = r.get("cpu_share", {})
        lines.append(
            f"| {r['case']} | {r['concurrency']} | {r['clients']} | {r['output_tok_s']:,.0f} "
            f"| {r['prompt_tokens'] / max(1, r['ok']):.0f} | {r['ttft_ms']['p50'] or 0:.0f} / {r['ttft_ms']['p90'] or 0:.0f} "
            f"| {r['tpot_ms']['p50'] or 0:.2f} "
            f"| {r['itl_ms']['p50'] or 0:.2f} / {r['itl_ms']['p90'] or 0:.2f} "
            f"| {r['output_tokens']} / {r['requests'] * serve['max_new_tokens']} | {r['scaled_down']} | {r['failed']} "
            f"| {' / '.join(str(cpu.get(n, '-')) for n in CpuSampler.NAMES)} |")
    lines.append("")
    return lines


def render_markdown() -> str:
    lines = [f"# GPU serve run: {RESULTS.get('device', '?')}", "", f"Command: `{RESULTS.get('command')}`", "",
             f"Created {RESULTS.get('created')}, commit {RESULTS.get('commit')}. Targets: {TARGETS}.", ""]
    for key in ("serve", "serve_sync"):
        lines += serve_table(key)
    for key, title in (("hf", "hf baseline at c=4"), ("offline", "Offline (bench/offline.py)"),
                       ("offline_sync", "Offline, overlap scheduling off"), 
                       ("greedy", "Greedy equality, float32"), ("steps", "Decode steps (in-process)"),
                       ("kernels", "Kernel checks (rel L2 vs float64)")):
        if key in RESULTS:
            lines += [f"## {title}", "", "```", json.dumps(RESULTS[key], indent=1, default=str)[:4000], "```", ""]
    lines += ["## Summary", "", "```", *SUMMARY, "```", ""]
    if RESULTS.get("failed"):
        lines += [f"Failed stages: {RESULTS['failed']}", ""]
    return "\n".join(lines)


def render_chart(path: Path) -> str | None:
    serve = RESULTS.get("serve")
    if not serve:
        return "no serve results"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for case in sorted({r["case"] for r in serve["levels"]}):
        rs = [r for r in serve["levels"] if r["case"] == case]
        cs = [r["concurrency"] for r in rs]
        a.plot(cs, [r["output_tok_s"] for r in rs], marker="o", label=case)
        b.plot(cs, [r["ttft_ms"]["p50"] or 0 for r in rs], marker="o", label=case)
    for ax, title in ((a, "output tokens/s"), (b, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"mini-sglang sgl, default settings, {RESULTS.get('device', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def publish(out: Path, extra: str | None) -> None:
    """The report so far: into --out, and into --publish too (a device call brings back few files)."""
    for d in [out] + ([Path(extra)] if extra else []):
        d.mkdir(parents=True, exist_ok=True)
        (d / "gpu_serve.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        (d / "gpu_serve.md").write_text(render_markdown())


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", str(REPO / "bench" / "results" / "gpu_serve")))
    p.add_argument("--skip", default="", help="comma list of stages to skip: kernels,greedy,steps,serve,serve_sync,hf,offline")
    p.add_argument("--tokenizer-dir", default=None, help="where SmolLM2's tokenizer files are (default: the embedded model)")
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--cases", default="short,medium")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--prompt-scale", type=float, default=1.4,
                   help="bench_suite's prompt scale for the short case, raw prompts: ~45 tokens [1.4]")
    p.add_argument("--medium-scale", type=float, default=1.4,
                   help="the same for the medium case: ~315 tokens; 1.8 gives ~400 [1.4]")
    p.add_argument("--port", type=int, default=18400)
    p.add_argument("--conc-per-client", type=int, default=32, help="streams per client process at most [32]")
    p.add_argument("--max-clients", type=int, default=8, help="client processes per level at most [8]")
    p.add_argument("--backend", default="sgl", help="the served backend (sgl; torch only to try the plumbing on a CPU)")
    p.add_argument("--serve-env", default="", help="KEY=VALUE,... set for the serve stage's server (A/B runs)")
    p.add_argument("--publish", default=None, help="also copy the report (after every stage) and the tarball here")
    p.add_argument("--commit", default=None, help="recorded in the report (default: git rev-parse)")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.cases = args.cases.split(",")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    serve_env = dict(kv.split("=", 1) for kv in args.serve_env.split(",") if kv)
    RESULTS.update(command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), commit=args.commit or git_commit(),
                   created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "minisgl_gpu_serve"
    tok = Path(args.tokenizer_dir) if args.tokenizer_dir else default_tokenizer_dir()
    dummy = build_model_dir(work / "qwen3-0.6b-smollm2-dummy", tok)
    weights = build_model_dir(work / "qwen3-0.6b-smollm2-random", tok)
    say(f"{RESULTS['device']}, torch {torch.__version__}, model folder {dummy} (vocab {VOCAB}, bos/eos/pad {BOS}/{EOS}/{PAD})")
    stages: list[tuple[str, Callable[[], None]]] = [
        ("kernels", check_kernels), ("greedy", lambda: check_greedy(dummy)), ("steps", lambda: time_steps(dummy)),
        ("serve", lambda: serve_sweep(dummy, args, out, env_extra=serve_env)),
        ("serve_sync", lambda: serve_sweep(dummy, args, out, "serve_sync", {"MINISGL_SGL_OVERLAP": "0"}, ["short"],
                                           [1, 256])),
        ("hf", lambda: hf_compare(weights, args, out)),
        ("offline", lambda: offline(out))]
    failed = []
    for name, fn in stages:
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 - report and go on: one device call must bring back everything
            traceback.print_exc()
            failed.append(name)
            say(f"stage {name}: FAILED (traceback in the log)")
        RESULTS.setdefault("stage_s", {})[name] = round(time.perf_counter() - t0, 1)
        print(f"[stage {name}: {time.perf_counter() - t0:.1f}s]", flush=True)
        RESULTS["failed"] = failed
        publish(out, args.publish)
    note = render_chart(out / "gpu_serve.png")
    if note:
        say(f"chart: {note}")
    publish(out, None)
    with tarfile.open(out / "gpu_serve.tar.gz", "w:gz") as tar:
        for f in sorted(out.rglob("*")):
            if f.is_file() and f.name != "gpu_serve.tar.gz":
                tar.add(f, arcname=str(f.relative_to(out)))
    if args.publish:
        for name in ("gpu_serve.tar.gz", "gpu_serve.png"):
            if (out / name).exists():
                shutil.copy(out / name, Path(args.publish) / name)
    print("\n===== summary =====")
    print("\n".join(SUMMARY))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
