"""Hostile and careless clients against one real server tree (issue 13's probes, replayed): every bad
input gets a JSON 4xx, nothing leaks, aborts reach requests wherever they are, the control channel and
the internal sockets survive garbage, and the API key / Host / Origin checks hold.

One module-scoped tree (2 workers, cache_aware, an API key) serves every test here."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgspec
import openai
import pytest
import zmq

from minisgl.control import ControlClient, find_control_endpoint, run_info_path
from tests.conftest import start_server, wait_for

KEY = "test-key-13"
AUTH = {"Authorization": f"Bearer {KEY}"}
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    s = start_server(["--workers", "2", "--scheduler-mode", "cache_aware", "--kv-cache-tokens", "16384",
                      "--api-key", KEY, "--max-prompt-chars", "300000"], tmp_path_factory, "reliability")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):  # noqa: ANN001, ANN201
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        yield c


def gateway_state(client: httpx.Client) -> dict:
    return client.get("/metrics", headers={"Accept": "application/json"}).json()


def settled(client: httpx.Client, timeout: float = 15.0) -> dict:
    """Wait until nothing is in flight anywhere; returns the last state (the caller asserts on it)."""
    def idle() -> dict | None:
        st = gateway_state(client)
        s = st["scheduler"]
        ok = st["inflight_streams"] == 0 and s["inflight"] == 0 and s["queued"] == 0
        return st if ok else None
    return wait_for(idle, timeout) or gateway_state(client)


def assert_json_error(r: httpx.Response, status: int, needle: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert needle in err["message"], err


def assert_serving(client: httpx.Client) -> None:
    r = client.post("/generate", json={"messages": CAPITAL, "max_new_tokens": 16, "stream": False})
    assert r.status_code == 200 and "Paris" in r.json()["text"], r.text[:300]


# ---------------------------------------------------------------- item 3: no 500, no leak

RAW_PROBES = [
    ("lone surrogate in prompt", "/generate", b'{"prompt": "a\\ud800b"}', 400, "invalid Unicode"),
    ("lone surrogate in chat content", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x\\udfff"}]}', 400, "invalid Unicode"),
    ("lone surrogate in a stop string", "/generate", b'{"prompt": "hi", "stop": ["\\ud800"]}', 400, "invalid Unicode"),
    ("stop_token_ids 1e20 (float)", "/generate", b'{"prompt": "hi", "stop_token_ids": [1e20]}', 400, "stop_token_ids"),
    ("stop_token_ids 10**20", "/generate", b'{"prompt": "hi", "stop_token_ids": [100000000000000000000]}', 400,
     "stop_token_ids"),
    ("non-string text part", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', 400, "text must be a string"),
    ("image part", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', 400,
     "image_url"),
    ("100k-deep nested JSON", "/generate", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("100k-deep nested object", "/v1/completions", b'{"prompt": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001, 400,
     "nested too deeply"),
]


@pytest.mark.parametrize("name,path,body,status,needle", RAW_PROBES, ids=[p[0] for p in RAW_PROBES])
def test_probe_gets_json_4xx(client, name: str, path: str, body: bytes, status: int, needle: str) -> None:
    r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert_json_error(r, status, needle)


def test_probes_leak_no_gateway_entries_and_server_keeps_serving(client) -> None:
    def fire(i: int) -> int:
        path, body = [(p[1], p[2]) for p in RAW_PROBES if len(p[2]) < 1000][i % 6]
        return client.post(path, content=body, headers={"Content-Type": "application/json"}).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(fire, range(300)))
    assert set(statuses) == {400}, sorted(set(statuses))
    st = settled(client)
    assert st["inflight_streams"] == 0, st["inflight_streams"]
    assert_serving(client)


# ---------------------------------------------------------------- items 4, 5: honoured or refused by name

def test_tiny_temperature_is_greedy_not_nan(client) -> None:
    body = {"messages": CAPITAL, "max_new_tokens": 12, "stream": False}
    greedy = client.post("/generate", json=body).json()["text"]
    tiny = client.post("/generate", json={**body, "temperature": 1e-300}).json()["text"]
    assert greedy and tiny == greedy


UNSUPPORTED = [
    ("/v1/chat/completions", {"messages": CAPITAL, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": CAPITAL, "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": CAPITAL, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": CAPITAL, "functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "wizard"),
    ("/v1/chat/completions", {"messages": [{"role": "", "content": "hi"}]}, "role ''"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "hi", "tool_call_id": "1"}]}, "tool"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "name"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of"),
    ("/generate", {"prompt": "hi", "max_tokens_typo": 3}, "max_tokens_typo"),
]


@pytest.mark.parametrize("path,body,needle", UNSUPPORTED, ids=[p[2] for p in UNSUPPORTED])
def test_unsupported_fields_are_refused_by_name(client, path: str, body: dict, needle: str) -> None:
    assert_json_error(client.post(path, json=body), 400, needle)


def test_null_fields_count_as_absent(client) -> None:
    """What the OpenAI client (and a message echoed back from a response) sends: nulls, not features."""
    msg = {"role": "assistant", "content": "Hello.", "tool_calls": None, "refusal": None}
    r = client.post("/v1/chat/completions", json={"messages": [*CAPITAL, msg, *CAPITAL], "max_tokens": 4,
                                                  "tools": None, "user": "u1"})
    assert r.status_code == 200, r.text[:300]


# ---------------------------------------------------------------- item 6: bounded work

def test_body_over_limit_is_413(client) -> None:
    body = b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    assert_json_error(client.post("/generate", content=body, headers={"Content-Type": "application/json"}),
                      413, "MAX_BODY_BYTES")


def test_character_cap_is_checked_before_tokenizing(client) -> None:
    r = client.post("/generate", json={"prompt": "hello " * 60_000, "raw": True})  # 360k chars > 300k
    assert_json_error(r, 400, "MAX_PROMPT_CHARS")
    msgs = [{"role": "user", "content": "x" * 200_000}, {"role": "user", "content": "y" * 200_000}]
    assert_json_error(client.post("/v1/chat/completions", json={"messages": msgs}), 400, "MAX_PROMPT_CHARS")


# ---------------------------------------------------------------- items 1, 2: aborts are never lost

def test_non_streamed_request_is_aborted_on_disconnect(client) -> None:
    body = {"prompt": "x", "max_new_tokens": 4096, "ignore_eos": True, "stream": False, "raw": True}
    with pytest.raises(httpx.ReadTimeout):
        client.post("/generate", json=body, timeout=1.5)
    st = settled(client, timeout=10)
    assert st["scheduler"]["inflight"] == 0 and st["inflight_streams"] == 0, st["scheduler"]


def test_streamed_disconnect_leaves_nothing_in_flight(client) -> None:
    body = {"prompt": "Count to a thousand.", "max_new_tokens": 2000, "ignore_eos": True}
    with client.stream("POST", "/generate", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 2:
                break
    st = settled(client, timeout=10)
    assert st["scheduler"]["inflight"] == 0 and st["inflight_streams"] == 0, st["scheduler"]


def test_disconnect_while_in_the_tokenizer_reaches_the_request(client) -> None:
    """Long prompts keep the tokenizer busy (each is refused only after tokenizing: too many tokens);
    short streams queued behind them hang up at once. Their aborts must reach them: none may run its
    2000 tokens for nobody."""
    big = {"prompt": "hello world, this is text. " * 10_000, "raw": True}  # 270k chars, ~70k tokens
    results: list[int] = []

    def send_big() -> None:
        results.append(client.post("/generate", json=big).status_code)

    threads = [threading.Thread(target=send_big) for _ in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the big ones are in the tokenizer's input now

    def short(i: int) -> None:
        body = {"prompt": f"Story number {i}", "max_new_tokens": 2000, "ignore_eos": True, "raw": True}
        try:
            with client.stream("POST", "/generate", json=body, timeout=0.3) as r:
                for _ in r.iter_lines():
                    pass
        except httpx.TimeoutException:
            pass

    with ThreadPoolExecutor(5) as pool:
        list(pool.map(short, range(5)))
    for t in threads:
        t.join()
    assert results == [400] * 10
    st = settled(client, timeout=10)
    assert st["scheduler"]["inflight"] == 0 and st["inflight_streams"] == 0, st["scheduler"]
    assert wait_for(lambda: all(w["running"] == 0 for w in gateway_state(client)["scheduler"]["workers"]), 5)


# ---------------------------------------------------------------- item 7: the control channel

@pytest.fixture(scope="module")
def ctl(server) -> ControlClient:  # noqa: ANN001
    return ControlClient(find_control_endpoint(server.port), timeout_s=20)


def worker_pids(server) -> list[int]:  # noqa: ANN001
    import psutil

    return sorted(p.pid for p in psutil.Process(server.pid).children(recursive=True)
                  if "procs.worker" in " ".join(p.cmdline()))


@pytest.mark.parametrize("token_ids,needle", [
    ([[1, 2, -5]], "-5"),
    ([[1, 2, 10**9]], "1000000000"),
    ([[1] * 10_000], "context window"),
    ([[1, 2]] * 65, "at most 64"),
], ids=["negative", "beyond-vocab", "too-long", "too-many"])
def test_control_token_ids_are_validated(server, ctl, token_ids, needle) -> None:  # noqa: ANN001
    pids = worker_pids(server)
    for command in ("insert_prefix", "warm"):
        reply = ctl.call(command, token_ids=token_ids)
        assert not reply.ok and needle in (reply.error or ""), reply
    assert worker_pids(server) == pids, "a worker restarted"


def test_control_huge_text_is_refused_before_tokenizing(server, ctl, client) -> None:  # noqa: ANN001
    t0 = time.monotonic()
    reply = ctl.call("insert_prefix", prefixes=["word " * 2_000_000])  # 10 MB
    assert not reply.ok and "MAX_PROMPT_CHARS" in (reply.error or ""), reply
    assert time.monotonic() - t0 < 5
    assert_serving(client)


def test_warm_ups_are_queued_one_piece_at_a_time_and_bounded(server, ctl, client) -> None:  # noqa: ANN001
    seqs = [[(7 * i + j) % 40_000 + 100 for j in range(600)] for i in range(64)]
    assert ctl.call("warm", token_ids=seqs).ok
    more = ctl.call("warm", token_ids=[[5, 6, 7, i] for i in range(8)])
    assert not more.ok and "queue is full" in (more.error or ""), more
    # Normal traffic is served while warm-ups wait; at most one warm-up piece per worker at any time.
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(ctl.call("metrics").data["warm_running"])
            time.sleep(0.05)

    t = threading.Thread(target=sample)
    t.start()
    try:
        for _ in range(3):
            assert_serving(client)
    finally:
        stop.set()
        t.join()
    assert seen and max(seen) <= 2, seen
    assert ctl.call("metrics").data["warm_queue"] > 0  # still waiting: they yield to traffic
    assert ctl.call("flush_cache").ok  # also drops the warm-ups still waiting
    assert ctl.call("metrics").data["warm_queue"] == 0


# ---------------------------------------------------------------- item 8: malformed internal frames

def test_malformed_internal_frames_are_dropped(server, client) -> None:  # noqa: ANN001
    import psutil

    info = json.loads(run_info_path(server.port).read_text())
    before = sorted(p.pid for p in psutil.Process(server.pid).children(recursive=True))
    ctx = zmq.Context()
    try:
        for name in ("scheduler", "tokenizer", "gateway", "worker-0", "worker-1", "launcher"):
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(f"ipc://{Path(info['runtime_dir']) / (name + '.sock')}")
            for frame in (b"\x00garbage", b"", msgspec.msgpack.encode({"type": "nope"}),
                          msgspec.msgpack.encode({"type": "worker_status", "worker_id": 99}),
                          msgspec.msgpack.encode({"type": "tokens", "worker_id": 0, "items": [{"rid": 5}]})):
                sock.send(frame)
            sock.close()
    finally:
        ctx.term()
    time.sleep(1.0)
    assert_serving(client)
    after = sorted(p.pid for p in psutil.Process(server.pid).children(recursive=True))
    assert after == before, "a process died on a malformed frame"


# ---------------------------------------------------------------- item 11: API key, Host, Origin

def test_api_key_is_required_except_for_health(server) -> None:  # noqa: ANN001
    url = server.url
    assert httpx.get(url + "/health").status_code == 200
    for method, path in [("POST", "/generate"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("GET", "/metrics")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, url + path, json={"prompt": "hi"}, headers=headers)
            assert_json_error(r, 401, "API key")
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    out = client.chat.completions.create(model=client.models.list().data[0].id, messages=CAPITAL,
                                         temperature=0, max_tokens=8)
    assert "Paris" in out.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope").models.list()


def test_foreign_host_and_origin_are_refused(server, client) -> None:  # noqa: ANN001
    assert_json_error(client.get("/health", headers={"Host": "evil.example"}), 403, "Host")
    assert_json_error(client.post("/generate", json={"prompt": "hi"}, headers={"Host": f"evil.example:{server.port}"}),
                      403, "Host")
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{server.port + 1}"):
        r = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers={"Origin": origin})
        assert_json_error(r, 403, "Origin")
    # same origin (the chat page served by this gateway) and the localhost alias are fine
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}"):
        r = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2, "stream": False},
                        headers={"Host": host, "Origin": f"http://{host}"})
        assert r.status_code == 200, r.text[:200]


@pytest.mark.parametrize("ctype", ["text/plain", "text/plain;charset=UTF-8", "multipart/form-data; boundary=x"])
def test_simple_cross_site_content_types_are_refused(client, ctype: str) -> None:
    r = client.post("/generate", content=b'{"prompt": "hi", "max_new_tokens": 2}', headers={"Content-Type": ctype})
    assert_json_error(r, 415, "Content-Type")


# ---------------------------------------------------------------- item 12: seeds

def test_seeds_do_not_collide_modulo_2_32(client) -> None:
    def text(seed: int) -> str:
        body = {"prompt": "Write a random word list.", "raw": True, "max_new_tokens": 24, "temperature": 1.5,
                "seed": seed, "stream": False}
        return client.post("/generate", json=body).json()["text"]

    a = text(5)
    assert a == text(5)
    assert a != text(5 + 2**32)


# ---------------------------------------------------------------- item 13: dispatch uses our own count

def test_back_to_back_requests_see_the_idle_worker_as_idle(client) -> None:
    """Both workers idle before each request: cache_aware's least-loaded choice ties to worker 0 every
    time. A scheduler that learns of a finish only after the client did (worker status sent after the
    tokens) still counts the last request on worker 0 and sends the next one to worker 1."""
    workers = []
    for i in range(20):
        body = {"prompt": f"{i} unrelated words", "raw": True, "max_new_tokens": 2, "stream": False}
        workers.append(client.post("/generate", json=body).json()["worker_id"])
    assert workers == [0] * 20, workers
