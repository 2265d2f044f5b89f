"""The scheduler through real process trees with two CPU workers: policies, backpressure, adaptive
max_new_tokens, warm-up, the control channel and /metrics."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from minisgl.control import ControlClient, find_control_endpoint
from tests.conftest import start_server, stream_generate, wait_for

# A long, fixed system-style prefix (~300 tokens) shared by requests that should hit the cache.
WARM_PREFIX = " ".join(
    f"Rule {i}: answer politely, cite the manual section {i * 7}, and never reveal configuration value {i * 13}."
    for i in range(1, 15)
)


def done_event(url: str, body: dict) -> dict:
    _, events = stream_generate(url, body)
    assert events[-1]["event"] == "done", events[-1]
    return events[-1]


def ask(url: str, prompt: str, max_new: int = 4, **extra: object) -> dict:
    return done_event(url, {"prompt": prompt, "max_new_tokens": max_new, "raw": True, **extra})


@pytest.fixture(scope="module")
def policy_server(request, default_model_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    servers = {}

    def get(mode: str):  # noqa: ANN202
        if mode not in servers:
            servers[mode] = start_server(["--workers", "2", "--scheduler-mode", mode, "--kv-cache-tokens", "8192"],
                                         tmp_path_factory, f"policy-{mode}")
        return servers[mode]

    yield get
    for s in servers.values():
        s.stop()


def test_round_robin(policy_server) -> None:
    url = policy_server("round_robin").url
    assert [ask(url, f"Say hi number {i}")["worker_id"] for i in range(4)] == [0, 1, 0, 1]


def test_fcfs_first_free_worker(policy_server) -> None:
    url = policy_server("fsfs").url  # the seed's spelling is accepted
    assert [ask(url, f"Say hi number {i}")["worker_id"] for i in range(3)] == [0, 0, 0]


def test_random_uses_both_workers(policy_server) -> None:
    url = policy_server("random").url
    assert {ask(url, f"Hi {i}", max_new=1)["worker_id"] for i in range(16)} == {0, 1}


def test_cache_aware_follows_the_prefix(policy_server) -> None:
    server = policy_server("cache_aware")
    url, ctl = server.url, control(server)
    shared = "You are a meticulous travel agent. " + WARM_PREFIX
    first = ask(url, shared + " Where should I go in May?")
    w = first["worker_id"]
    other = 1 - w

    def workers() -> list[dict]:
        return ctl.call("metrics").data["workers"]

    assert wait_for(lambda: workers()[w]["index_tokens"] >= 200, timeout=10), workers()
    # A long request with the same prefix follows it to worker w, which is now busier than the other...
    hold = {"prompt": shared + " Write a long story.", "max_new_tokens": 2000, "ignore_eos": True, "raw": True}
    with httpx.stream("POST", url + "/generate", json=hold, timeout=60) as r:
        next(r.iter_lines())
        state = workers()
        assert state[w]["inflight"] == 1 and state[other]["inflight"] == 0, state
        # ...and the cached prefix still beats the idle worker (least-loaded would pick `other`).
        second = ask(url, shared + " And in June?")
    assert second["worker_id"] == w
    assert second["usage"]["cached_tokens"] >= 200, second
    unrelated = ask(url, "Completely different question about cooking pasta.")
    assert unrelated["usage"]["cached_tokens"] < 50


@pytest.fixture(scope="module")
def busy_server(default_model_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    s = start_server(["--workers", "1", "--max-inflight-total", "2", "--max-inflight-per-engine", "2",
                      "--max-queue", "2"], tmp_path_factory, "busy")
    yield s
    s.stop()


def test_backpressure_429_and_adaptive_scaling(busy_server) -> None:
    url = busy_server.url
    body = {"prompt": "List many colours.", "max_new_tokens": 48, "ignore_eos": True, "raw": True}
    results: list[tuple[int, dict, dict]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(10)

    def one(_: int) -> None:
        barrier.wait()
        with httpx.stream("POST", url + "/generate", json=body, timeout=120) as r:
            events = [json.loads(line) for line in r.iter_lines() if line.strip()] if r.status_code == 200 else [json.loads(r.read())]
            with lock:
                results.append((r.status_code, dict(r.headers), events[-1]))

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(one, range(10)))
    statuses = [s for s, _, _ in results]
    assert 429 in statuses, statuses
    assert all(s in (200, 429) for s in statuses), statuses
    for status, headers, last in results:
        if status == 429:
            assert "Retry-After" in headers or "retry-after" in headers
            assert "overloaded" in last["error"]["message"]
        else:
            assert last["event"] == "done" and last["finish_reason"] == "length"
    scaled = [last for s, _, last in results if s == 200 and "max_new_tokens_scaled_from" in last]
    assert scaled, "no request was scaled down under load"
    for last in scaled:
        assert last["max_new_tokens_scaled_from"] == 48 and last["usage"]["completion_tokens"] < 48


@pytest.fixture(scope="module")
def warm_server(default_model_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    s = start_server(["--workers", "2", "--scheduler-mode", "cache_aware", "--kv-cache-tokens", "8192"],
                     tmp_path_factory, "warm", env={"WARM_PREFIXES": json.dumps([WARM_PREFIX])})
    yield s
    s.stop()


def test_warm_prefixes_hit_on_first_request(warm_server) -> None:
    first = ask(warm_server.url, WARM_PREFIX + " What is rule 3 about?")
    assert first["usage"]["cached_tokens"] >= 200, first


def control(server) -> ControlClient:  # noqa: ANN001
    return ControlClient(find_control_endpoint(server.port))


def test_control_commands(warm_server) -> None:
    ctl = control(warm_server)
    health = ctl.call("health")
    assert health.ok and health.data["workers_up"] == 2
    metrics = ctl.call("metrics")
    assert metrics.ok and len(metrics.data["workers"]) == 2
    assert all(w["index_tokens"] > 0 for w in metrics.data["workers"])  # the warm prefix, on both

    flushed = ctl.call("flush_cache")
    assert flushed.ok
    assert wait_for(lambda: all(w["index_tokens"] == 0 for w in ctl.call("metrics").data["workers"]), timeout=5)
    assert ask(warm_server.url, WARM_PREFIX + " Rule 5?")["usage"]["cached_tokens"] < 50

    other = "Glossary of terms for the support team. " + WARM_PREFIX[::-1]
    inserted = ctl.call("insert_prefix", prefixes=[other])
    assert inserted.ok and inserted.data["tokens"][0] > 100
    assert wait_for(lambda: all(w["index_tokens"] >= inserted.data["tokens"][0] - 1
                                for w in ctl.call("metrics").data["workers"]), timeout=30)
    assert ask(warm_server.url, other + " Define SLA.")["usage"]["cached_tokens"] >= 100

    third = "Catalogue of products sold in the shop, with prices. " + WARM_PREFIX.upper()
    warmed = ctl.call("warm", prefixes=[third])
    assert warmed.ok and warmed.data["queued"] == 1
    assert wait_for(lambda: all(w["index_tokens"] > 300 for w in ctl.call("metrics").data["workers"]), timeout=30)
    assert ask(warm_server.url, third + " Cheapest item?")["usage"]["cached_tokens"] >= 100


@pytest.mark.parametrize("frame", [b"not json", b'{"command": 5}', b"", b'{"prefixes": []}', b"\xff\xfe"])
def test_bad_control_frames_get_error_replies(warm_server, frame: bytes) -> None:
    reply = control(warm_server).call_raw(frame)
    assert not reply.ok and reply.error


def test_unknown_and_incomplete_control_commands(warm_server) -> None:
    ctl = control(warm_server)
    unknown = ctl.call("reboot")
    assert not unknown.ok and "unknown command" in unknown.error
    empty = ctl.call("insert_prefix")
    assert not empty.ok and "prefixes" in empty.error
    assert ctl.call("health").ok  # still serving


def _samples(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def test_metrics_counters_move_by_the_right_amounts(warm_server) -> None:
    url = warm_server.url
    before = _samples(url)
    usages = [ask(url, WARM_PREFIX + f" Question {i}?", max_new=6, ignore_eos=True)["usage"] for i in range(3)]
    after = _samples(url)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("minisgl:num_requests_total{finish_reason=length}") == 3
    assert delta("minisgl:generation_tokens_total") == sum(u["completion_tokens"] for u in usages) == 18
    assert delta("minisgl:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("minisgl:cached_tokens_total") == sum(u["cached_tokens"] for u in usages) > 0
    assert delta("minisgl:e2e_request_latency_seconds_count") == 3
    assert delta("minisgl:time_to_first_token_seconds_count") == 3
    assert after["minisgl:worker_up{worker=0}"] == 1 and after["minisgl:worker_up{worker=1}"] == 1
    assert "minisgl:token_usage{worker=0}" in after and "minisgl:cache_hit_rate{worker=1}" in after

    js = httpx.get(url + "/metrics", headers={"Accept": "application/json"}, timeout=10).json()
    assert js["rolling"]["requests"] >= 3 and js["rolling"]["ttft_s"]["p50"] is not None
    assert js["rolling"]["gen_throughput_tok_s"] > 0
    assert len(js["scheduler"]["workers"]) == 2
