"""The benchmarks: summary math, prompts, the streaming client, report consistency, and real runs.

The client and report tests use a fake gateway (fast, exact); `test_bench_suite_real_servers` runs the
bench end to end against real servers (ours with the torch backend, the hf baseline), and the offline
tests run the engine benchmark for real on tiny workloads.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench import bench_suite, offline
from bench.client import StreamResult, astream_generate, generate_payload, server_info, stream_generate
from bench.common import make_prompt, parse_int_list, percentile, summarize
from tests.fake_gateway import FakeGateway

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy(n: int) -> None:
    rng = random.Random(n)
    xs = [rng.uniform(0, 10) for _ in range(n)]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_edges() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_scales_and_counts() -> None:
    s = summarize([0.001, 0.002, 0.003, 0.004], scale=1000.0)
    assert s["count"] == 4
    assert s["mean"] == pytest.approx(2.5)
    assert s["p50"] == pytest.approx(2.5)
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(4.0)
    assert summarize([])["mean"] is None


def result(tokens: int, ttft: float, e2e: float, ok: bool = True) -> StreamResult:
    return StreamResult(ok=ok, error=None if ok else "boom", ttft_s=ttft, e2e_s=e2e, itl_s=[0.01] * (tokens - 1),
                        completion_tokens=tokens if ok else 0, prompt_tokens=5, finish_reason="length")


def test_summarize_results_throughput_counts_only_successes() -> None:
    rs = [result(10, 0.1, 1.0), result(10, 0.2, 2.0), result(0, 0.0, 0.5, ok=False)]
    s = bench_suite.summarize_results(rs, wall_s=4.0)
    assert (s["requests"], s["ok"], s["failed"]) == (3, 2, 1)
    assert s["output_tokens"] == 20
    assert s["output_tok_s"] == pytest.approx(5.0)
    assert s["e2e_s"]["mean"] == pytest.approx(1.5)
    assert s["ttft_ms"]["p50"] == pytest.approx(150.0)
    assert s["itl_ms"]["count"] == 18
    assert s["tpot_ms"]["mean"] == pytest.approx(1000 * (0.9 / 9 + 1.8 / 9) / 2)
    assert s["errors"] == ["boom"]


def test_comparison_line_in_the_seeds_form() -> None:
    assert bench_suite.comparison_line(1.234, 3.456) == "streaming faster by 1.23s with x3.46 throughput"
    assert bench_suite.comparison_line(-0.5, 0.8) == "streaming slower by 0.50s with x0.80 throughput"


# ---------------------------------------------------------------- workload


def test_prompts_are_deterministic_and_sized() -> None:
    assert make_prompt("a:3", 100) == make_prompt("a:3", 100)
    assert make_prompt("a:3", 100) != make_prompt("a:4", 100)
    assert make_prompt("a:-1", 100) != make_prompt("a:1", 100)  # unlike random.Random(-1) and Random(1)
    for words in (5, 24, 200, 800):
        n = len(make_prompt(f"w:{words}", words).split())
        assert words <= n <= words + 20  # whole sentences, so a little over


def test_parse_int_list() -> None:
    assert parse_int_list("1,4,16") == [1, 4, 16]
    assert parse_int_list(" 2 ") == [2]
    with pytest.raises(ValueError):
        parse_int_list("0")


def test_mixed_prompts_setting() -> None:
    assert bench_suite.mixed_prompts_setting("1") is True
    assert bench_suite.mixed_prompts_setting("off") is False
    assert bench_suite.mixed_prompts_setting("a||b") == ["a", "b"]
    assert bench_suite.mixed_prompts_setting('["x y", "z"]') == ["x y", "z"]


def test_levels_are_deterministic_unique_and_sized() -> None:
    argv = ["--concurrency", "1,3", "--repeat", "2", "--min-requests", "2", "--cases", "short,long,mixed"]
    a = bench_suite.build_levels(bench_suite.parse_args(argv))
    b = bench_suite.build_levels(bench_suite.parse_args(argv))
    assert [(lv.case, lv.concurrency, len(lv.payloads)) for lv in a] == [
        ("short", 1, 4), ("short", 3, 6), ("long", 1, 4), ("long", 3, 6), ("mixed", 1, 4), ("mixed", 3, 6)]
    assert [lv.payloads for lv in a] == [lv.payloads for lv in b]
    warmup = bench_suite.warmup_payloads(bench_suite.parse_args([*argv, "--warmup", "3"]))
    prompts = [p["prompt"] for lv in a for p in lv.payloads] + [p["prompt"] for p in warmup]
    assert len(set(prompts)) == len(prompts)  # no request can hit another's cache entry by accident
    assert all(p["ignore_eos"] and p["temperature"] == 0.0 and p["stream"] for lv in a for p in lv.payloads)
    assert {p["max_new_tokens"] for p in a[2].payloads} == {128}


def test_long_decode_and_overrides() -> None:
    specs = bench_suite.case_specs(bench_suite.parse_args(["--long-decode", "--prompt-scale", "0.5"]))
    assert specs["long"].max_new_tokens == 1024
    assert specs["short"].prompt_words == 12
    specs = bench_suite.case_specs(bench_suite.parse_args(["--max-new-tokens", "7"]))
    assert {s.max_new_tokens for s in specs.values()} == {7}


def test_env_vars_give_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_CONCURRENCY", "2,8")
    monkeypatch.setenv("BENCH_REPEAT", "3")
    monkeypatch.setenv("BENCH_WARMUP", "0")
    monkeypatch.setenv("BENCH_MIXED_PROMPTS", "0")
    args = bench_suite.parse_args([])
    assert (args.concurrency, args.repeat, args.warmup) == ([2, 8], 3, 0)
    assert "mixed" not in args.cases
    assert bench_suite.parse_args(["--concurrency", "4"]).concurrency == [4]


# ---------------------------------------------------------------- the client, against a fake gateway


@pytest.fixture(scope="module")
def fake_url() -> str:
    with FakeGateway() as url:
        yield url


def test_client_reads_a_stream(fake_url: str) -> None:
    seen: list[str] = []
    r = stream_generate(fake_url, generate_payload("one two three", max_new_tokens=5), on_delta=seen.append)
    assert r.ok and r.error is None
    assert seen == [" t0", " t1", " t2", " t3", " t4"]  # the empty first chunk is not a token
    assert r.text == "".join(seen)
    assert (r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.finish_reason) == (3, 5, 1, "length")
    assert r.ttft_s is not None and r.ttft_s < r.e2e_s
    assert len(r.itl_s) == 4 and all(g > 0 for g in r.itl_s)
    assert r.num_deltas == 5


def test_client_reports_errors(fake_url: str) -> None:
    mid = stream_generate(fake_url, generate_payload("error-mid", max_new_tokens=5))
    assert not mid.ok and mid.error == "worker died" and mid.status == 500
    http = stream_generate(fake_url, generate_payload("http-400"))
    assert not http.ok and http.status == 400 and "max_new_tokens must be positive" in http.error
    cut = stream_generate(fake_url, generate_payload("no-done", max_new_tokens=2))
    assert not cut.ok and "without a done event" in cut.error
    gone = stream_generate("http://127.0.0.1:9", generate_payload("x"), timeout=2)
    assert not gone.ok and gone.status == 0


def test_async_client_matches_sync(fake_url: str) -> None:
    async def go() -> list[StreamResult]:
        async with httpx.AsyncClient() as client:
            payloads = [generate_payload(f"p {i}", max_new_tokens=3) for i in range(4)]
            return await asyncio.gather(*(astream_generate(client, fake_url, p) for p in payloads))

    rs = asyncio.run(go())
    assert all(r.ok and r.completion_tokens == 3 and r.text == " t0 t1 t2" for r in rs)
    assert server_info(fake_url) == {"model": "fake-model", "backend": "fake"}


# ---------------------------------------------------------------- report consistency


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    assert img.shape[0] > 300 and img.shape[1] > 300 and float(img.std()) > 0.01


def md_run_prefix(system: str, case: str, conc: str, s: dict) -> str:
    """The leading columns of a Markdown row, formatted here independently of the bench's code."""
    return (f"| {system} | {case} | {conc} | {s['requests']} | {s['ok']} | {s['output_tokens']} "
            f"| {s['wall_s']:.2f} | {s['output_tok_s']:.1f} | {s['ttft_ms']['p50']:.1f} / ")


def check_report(report: dict, md: str) -> None:
    """The numbers agree with each other, with the per-request usage, and with the Markdown."""
    assert report["command"] and report["machine"]["cpu"] and report["machine"]["cpu_cores"]
    for s in report["systems"]:
        assert not s.get("error"), s.get("error")
        for run in s["runs"]:
            recs = run["request_records"]
            ok = [r for r in recs if r["ok"]]
            assert run["requests"] == len(recs) and run["ok"] == len(ok)
            assert run["output_tokens"] == sum(r["completion_tokens"] for r in ok)
            assert run["prompt_tokens"] == sum(r["prompt_tokens"] for r in ok)
            assert run["output_tok_s"] == pytest.approx(run["output_tokens"] / run["wall_s"])
            assert max(r["e2e_s"] for r in recs) <= run["wall_s"]
            ttfts = [r["ttft_s"] for r in ok]
            assert run["ttft_ms"]["p50"] == pytest.approx(1000 * float(np.percentile(ttfts, 50)))
            assert run["e2e_s"]["mean"] == pytest.approx(sum(r["e2e_s"] for r in ok) / len(ok))
            assert md_run_prefix(s["name"], run["case"], str(run["concurrency"]), run) in md
        overall = s["overall"]
        assert overall["output_tokens"] == sum(r["output_tokens"] for r in s["runs"])
        assert overall["wall_s"] == pytest.approx(sum(r["wall_s"] for r in s["runs"]))
        assert overall["output_tok_s"] == pytest.approx(overall["output_tokens"] / overall["wall_s"])
        assert md_run_prefix(s["name"], "**overall**", "all", overall) in md
    target, baseline = report["systems"][0], report["systems"][1]
    comp, ours, theirs = report["comparison"]["overall"], target["overall"], baseline["overall"]
    assert comp["latency_gain_s"] == pytest.approx(theirs["e2e_s"]["mean"] - ours["e2e_s"]["mean"])
    assert comp["throughput_ratio"] == pytest.approx(ours["output_tok_s"] / theirs["output_tok_s"])
    assert comp["line"] == bench_suite.comparison_line(comp["latency_gain_s"], comp["throughput_ratio"])
    assert comp["line"] in md


def load_outputs(out_dir: Path) -> tuple[dict, str, Path]:
    [js] = list(out_dir.glob("bench_*.json"))
    report = json.loads(js.read_text())
    return report, js.with_suffix(".md").read_text(), js.with_suffix(".png")


def test_bench_suite_against_fake_gateway(fake_url: str, tmp_path: Path) -> None:
    rc = bench_suite.main(["--target-url", fake_url, "--baseline-url", fake_url, "--backends", "torch,hf",
                           "--concurrency", "1,3", "--min-requests", "2", "--max-new-tokens", "4", "--warmup", "1",
                           "--cases", "short,mixed,prefix", "--prefix-requests", "2", "--out-dir", str(tmp_path)])
    assert rc == 0
    report, md, png = load_outputs(tmp_path)
    check_report(report, md)
    check_png(png)
    for s in report["systems"]:
        assert s["model"] == "fake-model" and not s["launched"]
        assert all(r["completion_tokens"] == 4 for run in s["runs"] for r in run["request_records"])
        assert s["prefix"]["warm"]["ok"] == 2 and s["prefix"]["cold"]["ok"] == 2
    assert "## Prefix cache" in md


def test_bench_suite_exits_nonzero_on_failures(fake_url: str, tmp_path: Path) -> None:
    rc = bench_suite.main(["--target-url", fake_url, "--backends", "torch", "--concurrency", "1", "--warmup", "0",
                           "--min-requests", "1", "--mixed-prompts", "error-mid", "--cases", "mixed",
                           "--out-dir", str(tmp_path)])
    assert rc == 1
    report, md, _ = load_outputs(tmp_path)
    assert report["systems"][0]["runs"][0]["failed"] == 1
    assert report["comparison"] is None
    assert "## Failures" in md and "worker died" in md


# ---------------------------------------------------------------- the bench against real servers


@pytest.mark.slow
def test_bench_suite_real_servers(tmp_path: Path) -> None:
    """Ours (torch backend) and the hf baseline, launched one after the other, tiny workload."""
    cmd = [sys.executable, "bench/bench_suite.py", "--backends", "torch,hf", "--concurrency", "1,2",
           "--repeat", "1", "--min-requests", "1", "--warmup", "1", "--cases", "short,mixed",
           "--prompt-scale", "0.25", "--max-new-tokens", "8", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report, md, png = load_outputs(tmp_path)
    check_report(report, md)
    check_png(png)
    assert [(s["name"], s["backend"], s["launched"]) for s in report["systems"]] == [
        ("mini-sglang", "torch", True), ("hf-baseline", "hf", True)]
    assert report["systems"][0]["model"] == report["systems"][1]["model"] is not None
    for s in report["systems"]:
        recs = [r for run in s["runs"] for r in run["request_records"]]
        assert len(recs) == 2 * 3  # two cases, levels of 1 and 2 requests
        assert all(r["ok"] and r["completion_tokens"] == 8 and r["prompt_tokens"] > 0 for r in recs)
        assert all(r["finish_reason"] == "length" for r in recs)
        # distinct prompts: at most a shared head (the chat template) is ever found in the prefix cache
        assert all(r["cached_tokens"] < r["prompt_tokens"] - 2 for r in recs)
    assert "streaming " in proc.stdout and " throughput" in proc.stdout  # the Markdown is printed too
    assert "bench/bench_suite.py --backends torch,hf" in report["command"]


# ---------------------------------------------------------------- offline benchmark


def test_roofline_math() -> None:
    from minisgl.models.weights import load_config

    cfg = load_config(REPO / "bench" / "configs" / "qwen3-0.6b")
    params = offline.decode_weight_params(cfg)
    assert 590e6 < params < 600e6  # Qwen3-0.6B: 0.6B with its tied embedding / lm_head
    assert offline.kv_bytes_per_token(cfg, 2) == 2 * 28 * 8 * 128 * 2
    assert offline.roofline_step_bytes(1000, 10, 7) == 1070
    assert offline.device_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350
    assert offline.device_bandwidth_gbs("NVIDIA H100 PCIe") == 2000
    assert offline.device_bandwidth_gbs("NVIDIA H200") == 4800
    assert offline.device_bandwidth_gbs("NVIDIA A100-SXM4-80GB") == 2000
    assert offline.device_bandwidth_gbs("NVIDIA GH200 480GB") is None
    assert offline.device_bandwidth_gbs("Intel(R) Xeon(R) Processor") is None
    stats = offline.RunStats(elapsed_s=2.0, step_bytes=[100, 300], step_times=[1.5, 0.5], decode_only=[False, True])
    frac = offline.roofline_fraction(stats, bandwidth_gbs=1e-7)  # 100 bytes/s
    assert frac == {"all_steps": pytest.approx(4 / 2.0), "decode_steps": pytest.approx(3 / 0.5)}
    assert offline.roofline_fraction(stats, None) == {"all_steps": None, "decode_steps": None}


def test_workload_is_deterministic_and_in_range() -> None:
    a = offline.make_workload(20, 5, 9, 3, 4, seed=1, vocab_size=500)
    assert a == offline.make_workload(20, 5, 9, 3, 4, seed=1, vocab_size=500)
    assert all(5 <= len(x) <= 9 and max(x) < 500 for x in a.inputs)
    assert all(3 <= n <= 4 for n in a.output_lens)


TINY_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "vocab_size": 1000, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32", "eos_token_id": 0,
              "hidden_act": "silu"}


def run_offline(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.offline", "--num-seqs", "6", "--min-input", "5", "--max-input", "40",
           "--min-output", "2", "--max-output", "9", "--out-dir", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [js] = list(out.glob("offline_*.json"))
    result = json.loads(js.read_text())
    assert "Throughput:" in proc.stdout
    return result


def check_offline(r: dict) -> None:
    w = r["workload"]
    assert r["ok"] and r["errors"] == []
    assert r["output_tokens"] == r["completion_tokens_reported"] == w["output_tokens"]
    assert r["finish_reasons"] == {"length": 6}
    assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["elapsed_s"])
    assert r["total_tok_s"] == pytest.approx((w["input_tokens"] + w["output_tokens"]) / r["elapsed_s"])


@pytest.mark.slow
def test_offline_torch_dummy_weights(tmp_path: Path) -> None:
    cfg_dir = tmp_path / "tiny"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps(TINY_QWEN3))
    r = run_offline(tmp_path, "--backend", "torch", "--config", str(cfg_dir), "--bandwidth-gbs", "20")
    check_offline(r)
    assert (r["backend"], r["load_format"], r["device"]) == ("torch", "dummy", "cpu")
    roof = r["roofline"]
    assert roof["bandwidth_gbs"] == 20
    assert roof["fraction"]["all_steps"] > 0 and roof["decode_steps"] > 0


@pytest.mark.slow
def test_offline_hf_baseline_same_loop(tmp_path: Path) -> None:
    r = run_offline(tmp_path, "--backend", "hf", "--model-dir", "default")
    check_offline(r)
    assert r["backend"] == "hf" and r["roofline"]["fraction"]["all_steps"] is None  # CPU: bandwidth unknown


# ---------------------------------------------------------------- in-process CPU engine timings


def test_cpu_engine_bench_runs_and_saves(default_model_dir, tmp_path) -> None:
    from minisgl.engine.cpu import isa as cpu_isa

    paths = [p for p in cpu_isa.supported() if p != "amx"][:1] + ["torch"]  # the best vector path, if any
    paths = list(dict.fromkeys(paths))
    cmd = [sys.executable, "bench/cpu_engine.py", "--batches", "2", "--rounds", "1", "--steps", "2", "--idle-s",
           "0.01", "--paths", ",".join(paths), "--out-dir", str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = tmp_path.glob("cpu_engine_*.json")
    result = json.loads(path.read_text())
    assert result["paths"] == paths
    assert set(result["decode_step_ms"]["2"]) == set(paths)
    assert all(v > 0 for v in result["decode_step_ms"]["2"].values())
    assert set(result["prefix_ttft_ms"][paths[0]]) == {"cold", "warm"}
    assert result["idle"]["first_step_after_ms"] > 0
    assert "| decode step, batch 2 |" in r.stdout
