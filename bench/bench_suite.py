"""The concurrent serving benchmark: mini-sglang against the Hugging Face baseline, through the gateway.

    python bench/bench_suite.py                       # launch both, default model, default cases
    python bench/bench_suite.py --backends torch,hf --concurrency 1,4 --repeat 2
    python bench/bench_suite.py --target-url http://host:8000 --baseline-url http://host:8001
    python bench/bench_suite.py --cases prefix        # prefix-cache TTFT: cached 512-token prefix vs cold

Each system is launched with the same launcher (`launch.py --backend X`), model and device, one after
the other, and driven with the same async client and the same deterministic prompts. Each (case,
concurrency) level sends `repeat * max(concurrency, min_requests)` requests with `concurrency` in flight.
Throughput is completion tokens (as the server reported them in `usage`) over the level's wall time,
first request sent to last stream closed; latencies are client-side. `ignore_eos` keeps output lengths
fixed, so both systems generate exactly the same number of tokens.

Results go to bench/results/ (or --out-dir) as JSON, Markdown and a PNG chart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

if __package__ in (None, ""):  # run as a file: make `bench` and `minisgl` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from tqdm import tqdm

from bench.client import StreamResult, astream_generate, astream_openai, generate_payload, server_info
from bench.common import (RESULTS_DIR, command_line, env_str, gpu_names, machine_info, make_prompt, make_text,
                          parse_int_list, summarize)

# ---------------------------------------------------------------- the workload


@dataclass(frozen=True)
class CaseSpec:
    name: str
    prompt_words: int
    max_new_tokens: int


# Sized for a small model on a CPU by default; --long-decode makes the long case decode 1024 tokens.
DEFAULT_CASES = {
    "short": CaseSpec("short", 24, 32),
    "medium": CaseSpec("medium", 200, 64),
    "long": CaseSpec("long", 800, 128),
}
LONG_DECODE_TOKENS = 1024
ALL_CASE_NAMES = ("short", "medium", "long", "mixed", "prefix")


@dataclass
class Level:
    """One (case, concurrency) measurement: these payloads, this many in flight."""

    case: str
    concurrency: int
    payloads: list[dict[str, Any]]


@dataclass
class System:
    name: str  # "mini-sglang" or "hf-baseline"
    role: str  # "target" or "baseline"
    backend: str  # backend name passed to launch.py, or what the server reports
    url: str | None = None  # given: use it; None: launch one
    server_args: list[str] = field(default_factory=list)


def case_specs(args: argparse.Namespace) -> dict[str, CaseSpec]:
    """The short/medium/long specs after --prompt-scale, --max-new-tokens and --long-decode."""
    specs: dict[str, CaseSpec] = {}
    for name, spec in DEFAULT_CASES.items():
        words = max(1, round(spec.prompt_words * args.prompt_scale))
        new = args.max_new_tokens or spec.max_new_tokens
        if name == "long" and args.long_decode:
            new = LONG_DECODE_TOKENS
        specs[name] = CaseSpec(name, words, new)
    return specs


def mixed_prompts_setting(value: str) -> list[str] | bool:
    """BENCH_MIXED_PROMPTS: on/off, or custom prompts (JSON list, or separated by '||')."""
    v = value.strip()
    if v.lower() in ("", "1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    if v.startswith("["):
        prompts = json.loads(v)
    else:
        prompts = [p for p in v.split("||") if p.strip()]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("BENCH_MIXED_PROMPTS must be on/off, a JSON list of strings, or 'a||b||c'")
    return prompts


def request_params(max_new_tokens: int, seed: int, raw: bool) -> dict[str, Any]:
    # greedy and ignore_eos: identical, fixed-length work for both systems; raw skips the chat template
    return {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True, "seed": seed,
            "raw": True if raw else None}


def build_levels(args: argparse.Namespace) -> list[Level]:
    """Every measured level, in run order; each request gets its own prompt (no accidental cache hits)."""
    specs = case_specs(args)
    levels: list[Level] = []
    counter = 0
    for case in args.cases:
        if case == "prefix":
            continue  # its own experiment, see run_prefix
        for conc in args.concurrency:
            n = args.repeat * max(conc, args.min_requests)
            payloads = [case_payload(case, specs, args, counter + i) for i in range(n)]
            counter += n
            levels.append(Level(case, conc, payloads))
    return levels


def case_payload(case: str, specs: dict[str, CaseSpec], args: argparse.Namespace, index: int) -> dict[str, Any]:
    if case == "mixed":
        if isinstance(args.mixed, list):
            prompt = args.mixed[index % len(args.mixed)]
            return generate_payload(prompt, **request_params(specs["medium"].max_new_tokens, index, args.raw))
        spec = specs[random.Random(f"mixed:{args.seed}:{index}").choice(("short", "medium", "long"))]
    else:
        spec = specs[case]
    prompt = make_prompt(f"request:{args.seed}:{index}", spec.prompt_words)
    return generate_payload(prompt, **request_params(spec.max_new_tokens, index, args.raw))


def warmup_payloads(args: argparse.Namespace) -> list[dict[str, Any]]:
    spec = case_specs(args)["short"]
    return [generate_payload(make_prompt(f"warmup:{args.seed}:{i}", spec.prompt_words),
                             **request_params(spec.max_new_tokens, i, args.raw)) for i in range(args.warmup)]


# ---------------------------------------------------------------- measuring


Sender = Callable[[httpx.AsyncClient, str, dict[str, Any]], Awaitable[StreamResult]]
# How requests reach the system being measured: our /generate, or (--api openai) the equivalent
# streaming OpenAI request, which any OpenAI-compatible server (vLLM) takes. Set per system.
send: Sender = astream_generate


def openai_sender(model: str) -> Sender:
    async def one(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> StreamResult:
        return await astream_openai(client, url, payload, model)

    return one


def new_client(max_conc: int, timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0),
                             limits=httpx.Limits(max_connections=max_conc + 4, max_keepalive_connections=max_conc + 4))


async def run_level(client: httpx.AsyncClient, url: str, payloads: list[dict[str, Any]], concurrency: int,
                    bar: tqdm | None) -> tuple[list[StreamResult], float]:
    """Send every payload with at most `concurrency` in flight; returns results (in order) and wall time."""
    sem = asyncio.Semaphore(concurrency)

    async def one(payload: dict[str, Any]) -> StreamResult:
        async with sem:
            res = await send(client, url, payload)
        if bar is not None:
            bar.update(1)
        return res

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in payloads))
    return list(results), time.perf_counter() - t0


def tpot_s(r: StreamResult) -> float | None:
    """Time per output token after the first (what deltas bundling several tokens would hide)."""
    if r.ttft_s is None or r.completion_tokens < 2:
        return None
    return (r.e2e_s - r.ttft_s) / (r.completion_tokens - 1)


def summarize_results(results: list[StreamResult], wall_s: float) -> dict[str, Any]:
    """Throughput and latency of one set of requests that took `wall_s` seconds in all."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    errors = sorted({r.error for r in results if r.error})
    return {
        "requests": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors[:5],
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "wall_s": wall_s,
        "output_tok_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "ttft_ms": summarize((r.ttft_s for r in ok if r.ttft_s is not None), 1000.0),
        "itl_ms": summarize((g for r in ok for g in r.itl_s), 1000.0),
        "tpot_ms": summarize((t for r in ok if (t := tpot_s(r)) is not None), 1000.0),
        "e2e_s": summarize(r.e2e_s for r in ok),
        "finish_reasons": _count(r.finish_reason or "none" for r in results),
        "scaled_down": sum(1 for r in ok if r.max_new_tokens_scaled_from is not None),
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


async def run_levels(url: str, levels: list[Level], warmup: list[dict[str, Any]], args: argparse.Namespace,
                     label: str) -> list[dict[str, Any]]:
    """Warm up, then measure each level; one summary per level, with per-request records."""
    total = len(warmup) + sum(len(lv.payloads) for lv in levels)
    runs: list[dict[str, Any]] = []
    async with new_client(max(args.concurrency), args.request_timeout) as client:
        with tqdm(total=total, desc=label, unit="req", file=sys.stderr, dynamic_ncols=True) as bar:
            if warmup:
                bar.set_postfix_str("warmup")
                await run_level(client, url, warmup, 1, bar)
            for lv in levels:
                bar.set_postfix_str(f"{lv.case} c={lv.concurrency}")
                results, wall = await run_level(client, url, lv.payloads, lv.concurrency, bar)
                runs.append({"case": lv.case, "concurrency": lv.concurrency, **summarize_results(results, wall),
                             "_results": results})
    return runs


# ---------------------------------------------------------------- prefix-cache TTFT experiment

PREFIX_TOKENS = 512


async def calibrate_words_per_token(client: httpx.AsyncClient, url: str, seed: int, raw: bool) -> float:
    """Ask the server how many tokens our filler text makes (its tokenizer, not a guess). Two lengths,
    so that whatever the server wraps around a prompt (a chat template) cancels out."""
    counts: list[tuple[int, int]] = []
    for words in (50, 250):
        text = make_text(random.Random(f"calibrate:{seed}:{words}"), words)
        res = await send(client, url, generate_payload(text, **request_params(1, seed, raw)))
        if not res.ok or res.prompt_tokens <= 0:
            raise RuntimeError(f"calibration request failed: {res.error}")
        counts.append((len(text.split()), res.prompt_tokens))
    (w1, t1), (w2, t2) = counts
    if t2 <= t1:
        raise RuntimeError(f"calibration makes no sense: {counts} (words, tokens)")
    return (w2 - w1) / (t2 - t1)


async def run_prefix(url: str, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """TTFT with a cached ~512-token prefix (sent once first) against a fresh prefix every time.

    Requests go one at a time so TTFT is prefill time, not queueing. The suffix questions are the same
    in both arms; only whether the prefix is in the cache differs.
    """
    n = args.prefix_requests
    new_tokens = args.max_new_tokens or 8
    async with new_client(1, args.request_timeout) as client:
        wpt = await calibrate_words_per_token(client, url, args.seed, args.raw)
        words = max(1, round(PREFIX_TOKENS * wpt))
        prefix = make_text(random.Random(f"prefix:{args.seed}"), words)
        suffixes = [make_prompt(f"suffix:{args.seed}:{i}", 16) for i in range(n)]
        prime = await send(client, url, generate_payload(prefix, **request_params(1, 0, args.raw)))
        warm: list[StreamResult] = []
        cold: list[StreamResult] = []
        with tqdm(total=2 * n, desc=f"{label} prefix", unit="req", file=sys.stderr, dynamic_ncols=True) as bar:
            for i, suffix in enumerate(suffixes):
                payload = generate_payload(f"{prefix} {suffix}", **request_params(new_tokens, i, args.raw))
                warm.append(await send(client, url, payload))
                bar.update(1)
                fresh = make_text(random.Random(f"cold:{args.seed}:{i}"), words)
                payload = generate_payload(f"{fresh} {suffix}", **request_params(new_tokens, i, args.raw))
                cold.append(await send(client, url, payload))
                bar.update(1)
    return prefix_summary(prime, warm, cold)


def prefix_summary(prime: StreamResult, warm: list[StreamResult], cold: list[StreamResult]) -> dict[str, Any]:
    def arm(results: list[StreamResult]) -> dict[str, Any]:
        ok = [r for r in results if r.ok]
        return {
            "requests": len(results),
            "ok": len(ok),
            "errors": sorted({r.error for r in results if r.error})[:5],
            "prompt_tokens_mean": sum(r.prompt_tokens for r in ok) / len(ok) if ok else None,
            "cached_tokens_mean": sum(r.cached_tokens for r in ok) / len(ok) if ok else None,
            "ttft_ms": summarize((r.ttft_s for r in ok if r.ttft_s is not None), 1000.0),
        }

    out = {"prefix_tokens": prime.prompt_tokens if prime.ok else None, "prime_error": prime.error,
           "warm": arm(warm), "cold": arm(cold)}
    w, c = out["warm"]["ttft_ms"]["p50"], out["cold"]["ttft_ms"]["p50"]
    out["ttft_speedup_p50"] = c / w if w and c else None
    return out


# ---------------------------------------------------------------- running one system


def run_system(system: System, levels: list[Level], args: argparse.Namespace, log_dir: Path,
               stamp: str) -> dict[str, Any]:
    """Launch (or reach) one system, benchmark it, and return its JSON section."""
    out: dict[str, Any] = {"name": system.name, "role": system.role, "backend": system.backend,
                           "url": system.url, "server_args": system.server_args, "launched": system.url is None}
    if system.url is not None:
        return measure_system(system.url, system, levels, args, out)
    from minisgl.server_handle import ServerHandle

    log_path = log_dir / f"bench_{stamp}_{system.name}.log"
    out["server_log"] = str(log_path)
    print(f"[bench] starting {system.name}: launch.py {shlex.join(system.server_args)} (log: {log_path})",
          file=sys.stderr)
    t0 = time.perf_counter()
    srv = ServerHandle(system.server_args, log_path=str(log_path), startup_timeout=args.startup_timeout)
    try:
        srv.start()
    except (RuntimeError, TimeoutError, OSError) as exc:
        out["error"] = f"could not start {system.name}: {exc} (see {log_path})"
        print(f"[bench] {out['error']}", file=sys.stderr)
        srv.stop()
        return out
    try:
        out["startup_s"] = time.perf_counter() - t0
        print(f"[bench] {system.name} healthy after {out['startup_s']:.1f}s at {srv.url}", file=sys.stderr)
        return measure_system(srv.url, system, levels, args, out)
    finally:
        srv.stop()


def measure_system(url: str, system: System, levels: list[Level], args: argparse.Namespace,
                   out: dict[str, Any]) -> dict[str, Any]:
    global send
    info = server_info(url)
    out["model"] = info.get("model")
    out["api"] = args.api
    if args.api == "openai":
        if not out["model"]:
            raise SystemExit(f"[bench] {url}/v1/models names no model: --api openai needs one")
        send = openai_sender(out["model"])
    else:
        send = astream_generate
    out["backend"] = info.get("backend", system.backend)
    out["runs"] = asyncio.run(run_levels(url, levels, warmup_payloads(args), args, system.name)) if levels else []
    if "prefix" in args.cases:
        try:
            out["prefix"] = asyncio.run(run_prefix(url, args, system.name))
        except RuntimeError as exc:
            out["prefix"] = {"error": str(exc)}
    add_aggregates(out)
    return out


def add_aggregates(system_out: dict[str, Any]) -> None:
    """Per case (all concurrencies) and overall summaries; then drop the raw results."""
    runs = system_out.get("runs", [])
    by_case: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_case.setdefault(run["case"], []).append(run)
    system_out["cases"] = {case: merge_runs(rs) for case, rs in by_case.items()}
    system_out["overall"] = merge_runs(runs) if runs else None
    for run in runs:
        run["request_records"] = [r.record() for r in run.pop("_results")]


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several levels as one: tokens and wall times add up; latency percentiles over all requests."""
    results = [r for run in runs for r in run["_results"]]
    return summarize_results(results, sum(run["wall_s"] for run in runs))


# ---------------------------------------------------------------- comparison and reports


def comparison_line(latency_gain_s: float, ratio: float) -> str:
    """The seed's form: `streaming faster by Xs with xN throughput` (X = baseline − ours, mean e2e)."""
    word = "faster" if latency_gain_s >= 0 else "slower"
    return f"streaming {word} by {abs(latency_gain_s):.2f}s with x{ratio:.2f} throughput"


def compare(target: dict[str, Any] | None, baseline: dict[str, Any] | None) -> dict[str, Any] | None:
    """X = baseline mean e2e − ours, N = our tokens/s over the baseline's, overall and per case."""
    if not target or not baseline or not target.get("overall") or not baseline.get("overall"):
        return None

    def one(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any] | None:
        if ours["e2e_s"]["mean"] is None or theirs["e2e_s"]["mean"] is None or not theirs["output_tok_s"]:
            return None
        gain = theirs["e2e_s"]["mean"] - ours["e2e_s"]["mean"]
        ratio = ours["output_tok_s"] / theirs["output_tok_s"]
        return {"latency_gain_s": gain, "throughput_ratio": ratio, "line": comparison_line(gain, ratio)}

    per_case = {case: one(target["cases"][case], baseline["cases"][case])
                for case in target["cases"] if case in baseline.get("cases", {})}
    return {"target": target["name"], "baseline": baseline["name"],
            "overall": one(target["overall"], baseline["overall"]), "per_case": per_case}


def fmt(value: float | int | None, digits: int = 1) -> str:
    """How every number appears in the Markdown (tests format the JSON the same way)."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


RUN_HEADER = ("| system | case | conc | reqs | ok | out tokens | wall s | out tok/s | TTFT p50/p90/p99 ms "
              "| ITL p50/p90/p99 ms | E2E mean/p50/p99 s |")


def run_row(system: str, case: str, conc: str, s: dict[str, Any]) -> str:
    t, i, e = s["ttft_ms"], s["itl_ms"], s["e2e_s"]
    return (f"| {system} | {case} | {conc} | {s['requests']} | {s['ok']} | {s['output_tokens']} "
            f"| {fmt(s['wall_s'], 2)} | {fmt(s['output_tok_s'])} "
            f"| {fmt(t['p50'])} / {fmt(t['p90'])} / {fmt(t['p99'])} "
            f"| {fmt(i['p50'])} / {fmt(i['p90'])} / {fmt(i['p99'])} "
            f"| {fmt(e['mean'], 2)} / {fmt(e['p50'], 2)} / {fmt(e['p99'], 2)} |")


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# mini-sglang serving benchmark", "",
             f"- date: {report['created']}",
             f"- command: `{report['command']}`",
             f"- machine: {m['cpu']} ({m['cpu_cores']} cores); GPUs: {', '.join(m['gpus']) or 'none'}; {m['platform']}"]
    for s in report["systems"]:
        where = s.get("url") or "launched: launch.py " + shlex.join(s.get("server_args", []))
        lines.append(f"- {s['role']}: **{s['name']}**, backend `{s['backend']}`, model `{s.get('model')}` ({where})")
    st = report["settings"]
    lines.append(f"- settings: concurrency {st['concurrency']}, repeat {st['repeat']}, warmup {st['warmup']}, "
                 f"min requests {st['min_requests']}, seed {st['seed']}, greedy, ignore_eos, "
                 + ("raw prompts" if st["raw_prompts"] else "prompts through the server's chat template"))
    lines.append("- cases: " + ", ".join(f"{c['name']} ({c['prompt_words']} words, {c['max_new_tokens']} new tokens)"
                                         for c in st["case_specs"]))
    lines += ["", "## Per case and concurrency", "", RUN_HEADER, "|" + "---|" * 11]
    for s in report["systems"]:
        for run in s.get("runs", []):
            lines.append(run_row(s["name"], run["case"], str(run["concurrency"]), run))
    lines += ["", "## Per case (all concurrencies) and overall", "", RUN_HEADER, "|" + "---|" * 11]
    for s in report["systems"]:
        for case, summ in s.get("cases", {}).items():
            lines.append(run_row(s["name"], case, "all", summ))
        if s.get("overall"):
            lines.append(run_row(s["name"], "**overall**", "all", s["overall"]))
    lines += comparison_markdown(report.get("comparison"))
    lines += prefix_markdown(report["systems"])
    lines += failures_markdown(report["systems"])
    return "\n".join(lines) + "\n"


def comparison_markdown(comp: dict[str, Any] | None) -> list[str]:
    if not comp:
        return []
    out = ["", f"## {comp['target']} vs {comp['baseline']}", "",
           "X = baseline mean end-to-end latency − ours; N = our output tokens/s ÷ the baseline's.", ""]
    if comp["overall"]:
        out.append(f"- **overall: {comp['overall']['line']}**")
    out += [f"- {case}: {c['line']}" for case, c in comp["per_case"].items() if c]
    return out


def prefix_markdown(systems: list[dict[str, Any]]) -> list[str]:
    rows = [(s["name"], s["prefix"]) for s in systems if s.get("prefix") and "warm" in s["prefix"]]
    if not rows:
        return []
    out = ["", f"## Prefix cache: TTFT with a cached ~{PREFIX_TOKENS}-token prefix vs a cold one", "",
           "| system | priming request tokens | warm TTFT p50 ms | cold TTFT p50 ms | speedup "
           "| cached tokens warm / cold (mean) |",
           "|---|---|---|---|---|---|"]
    for name, p in rows:
        out.append(f"| {name} | {fmt(p['prefix_tokens'])} | {fmt(p['warm']['ttft_ms']['p50'])} "
                   f"| {fmt(p['cold']['ttft_ms']['p50'])} | {fmt(p['ttft_speedup_p50'], 2)} "
                   f"| {fmt(p['warm']['cached_tokens_mean'])} / {fmt(p['cold']['cached_tokens_mean'])} |")
    return out


def failures_markdown(systems: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for s in systems:
        if s.get("error"):
            out.append(f"- {s['name']}: {s['error']}")
        for run in s.get("runs", []):
            for err in run["errors"]:
                out.append(f"- {s['name']} {run['case']} c={run['concurrency']}: {run['failed']} failed: {err}")
    return ["", "## Failures", "", *out] if out else []


def render_chart(report: dict[str, Any], path: Path) -> None:
    """Throughput, TTFT and end-to-end latency per level, the systems side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in report["systems"] if s.get("runs")]
    keys = [(r["case"], r["concurrency"]) for r in systems[0]["runs"]] if systems else []
    panels = [("output tokens/s", lambda r: r["output_tok_s"]), ("TTFT p50 (ms)", lambda r: r["ttft_ms"]["p50"]),
              ("end-to-end latency, mean (s)", lambda r: r["e2e_s"]["mean"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.9 * len(keys) + 3), 11), squeeze=False)
    width = 0.8 / max(1, len(systems))
    for ax, (title, metric) in zip(axes[:, 0], panels):
        for j, s in enumerate(systems):
            runs = {(r["case"], r["concurrency"]): r for r in s["runs"]}
            vals = [metric(runs[k]) if k in runs and metric(runs[k]) is not None else 0.0 for k in keys]
            xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(keys))]
            ax.bar(xs, vals, width, label=f"{s['name']} ({s['backend']})")
        ax.set_xticks(range(len(keys)), [f"{c}\nc={n}" for c, n in keys])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    comp = report.get("comparison")
    if comp and comp.get("overall"):
        fig.suptitle(f"{comp['target']} vs {comp['baseline']}: {comp['overall']['line']}")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=env_str("BENCH_BACKENDS", "auto,hf"),
                   help="ours,baseline backends to launch (first is ours; one name = no baseline) [auto,hf]")
    p.add_argument("--target-url", default=None, help="benchmark this running server instead of launching ours")
    p.add_argument("--baseline-url", default=None, help="benchmark this running server as the baseline")
    p.add_argument("--baseline-name", default=None, help="label of the baseline in the results, e.g. vllm-cpu")
    p.add_argument("--api", choices=("generate", "openai"), default="generate",
                   help="generate: our /generate; openai: the same requests as streaming /v1/chat/completions "
                        "(/v1/completions with --raw) for every system, e.g. against vLLM [generate]")
    p.add_argument("--cases", "--case", default=env_str("BENCH_CASES", "short,medium,long,mixed"),
                   help=f"comma-separated, from {','.join(ALL_CASE_NAMES)} [short,medium,long,mixed]")
    p.add_argument("--concurrency", default=env_str("BENCH_CONCURRENCY", "1,4,16" if gpu_names() else "1,4"),
                   help="requests in flight, a list like 1,4,16 [env BENCH_CONCURRENCY; 1,4,16 with a GPU, else 1,4]")
    p.add_argument("--repeat", type=int, default=int(env_str("BENCH_REPEAT", "1")),
                   help="each level sends repeat*max(concurrency, min-requests) requests [env BENCH_REPEAT, 1]")
    p.add_argument("--min-requests", type=int, default=4, help="requests per level at least (per repeat) [4]")
    p.add_argument("--warmup", type=int, default=int(env_str("BENCH_WARMUP", "2")),
                   help="unmeasured requests per system first [env BENCH_WARMUP, 2]")
    p.add_argument("--mixed-prompts", default=env_str("BENCH_MIXED_PROMPTS", "1"),
                   help="mixed case: on/off, or custom prompts as a JSON list or 'a||b' [env BENCH_MIXED_PROMPTS]")
    p.add_argument("--max-new-tokens", type=int, default=0, help="override every case's max_new_tokens")
    p.add_argument("--long-decode", action="store_true", help=f"long case decodes {LONG_DECODE_TOKENS} tokens (GPUs)")
    p.add_argument("--prompt-scale", type=float, default=1.0, help="multiply every case's prompt length [1.0]")
    p.add_argument("--prefix-requests", type=int, default=8, help="prefix case: requests per arm [8]")
    p.add_argument("--raw", action="store_true", help="send prompts as plain text (no chat template)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed; change it to defeat a warm server's cache")
    p.add_argument("--model-name", default=None, help="passed to launch.py for both systems")
    p.add_argument("--model-local-dir", default=None, help="passed to launch.py for both systems")
    p.add_argument("--load-format", default=None, help="passed to launch.py for both systems (dummy: random weights)")
    p.add_argument("--server-args", default="", help="more launch.py flags for both systems, e.g. '--workers 2'")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="where JSON, Markdown and PNG go [bench/results]")
    p.add_argument("--tag", default="", help="added to the result file names")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for a server's /health")
    p.add_argument("--request-timeout", type=float, default=900.0, help="seconds one request may take")
    args = p.parse_args(argv)
    args.concurrency = parse_int_list(args.concurrency)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - set(ALL_CASE_NAMES)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}; choose from {ALL_CASE_NAMES}")
    args.mixed = mixed_prompts_setting(args.mixed_prompts)
    if args.mixed is False:
        args.cases = [c for c in args.cases if c != "mixed"]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not 1 <= len(args.backends) <= 2:
        p.error("--backends takes one or two names: ours[,baseline]")
    return args


def resolve_backend(name: str) -> str:
    if name != "auto":
        return name
    from minisgl.backend_registry import default_backend_name

    return default_backend_name()


def shared_server_args(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for flag, value in (("--model-name", args.model_name), ("--model-local-dir", args.model_local_dir),
                        ("--load-format", args.load_format)):
        if value:
            out += [flag, value]
    return out + shlex.split(args.server_args)


def plan_systems(args: argparse.Namespace) -> list[System]:
    shared = shared_server_args(args)
    systems: list[System] = []
    ours = resolve_backend(args.backends[0])
    systems.append(System("mini-sglang", "target", ours, args.target_url, ["--backend", ours, *shared]))
    if len(args.backends) == 2 or args.baseline_url:
        base = resolve_backend(args.backends[1]) if len(args.backends) == 2 else "unknown"
        name = args.baseline_name or (f"{base}-baseline" if base != "unknown" else "baseline")
        systems.append(System(name, "baseline", base, args.baseline_url, ["--backend", base, *shared]))
    return systems


def settings(args: argparse.Namespace) -> dict[str, Any]:
    specs = case_specs(args)
    listed = [vars(specs[c]) for c in ("short", "medium", "long")]
    return {"cases": args.cases, "case_specs": listed, "concurrency": args.concurrency, "repeat": args.repeat,
            "min_requests": args.min_requests, "warmup": args.warmup, "seed": args.seed,
            "mixed_prompts": args.mixed if isinstance(args.mixed, list) else bool(args.mixed),
            "long_decode": args.long_decode, "prompt_scale": args.prompt_scale, "raw_prompts": args.raw,
            "prefix_requests": args.prefix_requests if "prefix" in args.cases else None,
            "sampling": {"temperature": 0.0, "ignore_eos": True}}


def write_reports(report: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    report["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["markdown"].write_text(render_markdown(report))
    render_chart(report, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = f"bench_{stamp}" + (f"_{args.tag}" if args.tag else "")
    levels = build_levels(args)
    systems = [run_system(s, levels, args, out_dir, stamp) for s in plan_systems(args)]
    by_role = {s["role"]: s for s in systems}
    report = {"schema": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command_line(),
              "machine": machine_info(), "settings": settings(args), "systems": systems,
              "comparison": compare(by_role.get("target"), by_role.get("baseline"))}
    paths = write_reports(report, out_dir, stem)
    print(paths["markdown"].read_text())
    print("[bench] wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return exit_code(systems)


def exit_code(systems: list[dict[str, Any]]) -> int:
    """Non-zero when a system did not start or any request failed (the reports are written anyway)."""
    failed = [s["name"] for s in systems
              if s.get("error") or any(r["failed"] for r in s.get("runs", []))
              or (s.get("prefix") or {}).get("error")]
    if failed:
        print(f"[bench] failures in: {', '.join(failed)} (see the Failures section)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
