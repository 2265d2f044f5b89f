"""The HTTP API through a real process tree (real sockets, real HTTP) on the default backend."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.conftest import scheduler_metrics, stream_generate, wait_for

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_generate_streams_paris(default_server) -> None:
    text, events = stream_generate(default_server.url, {"prompt": "What is the capital of France?", "max_new_tokens": 24})
    assert "Paris" in text
    assert sum("text_delta" in e for e in events) >= 2, "expected several streamed deltas"
    done = events[-1]
    assert done["event"] == "done" and done["finish_reason"] in ("stop", "length")
    assert done["usage"]["prompt_tokens"] > 5 and done["usage"]["completion_tokens"] >= 2


def test_generate_non_streaming_and_messages(default_server) -> None:
    r = httpx.post(default_server.url + "/generate", json={"messages": CAPITAL, "max_new_tokens": 24, "stream": False}, timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert "Paris" in body["text"] and body["event"] == "done"


def test_openai_client_chat_and_completions(default_server) -> None:
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused")
    models = [m.id for m in client.models.list()]
    assert models
    chunks = client.chat.completions.create(model=models[0], messages=CAPITAL, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in chunks:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "Paris" in "".join(parts)
    assert usage is not None and usage.completion_tokens > 0
    whole = client.chat.completions.create(model=models[0], messages=CAPITAL, temperature=0, max_tokens=24)
    assert "Paris" in whole.choices[0].message.content
    assert whole.usage.prompt_tokens > 5
    comp = client.completions.create(model=models[0], prompt="The capital of France is", temperature=0, max_tokens=8)
    assert comp.choices[0].finish_reason in ("stop", "length") and comp.usage.completion_tokens > 0


def test_stop_string_cuts_output(default_server) -> None:
    full, _ = stream_generate(default_server.url, {"messages": CAPITAL, "max_new_tokens": 24})
    assert " is " in full
    text, events = stream_generate(default_server.url, {"messages": CAPITAL, "max_new_tokens": 24, "stop": [" is"]})
    assert text == full[: full.index(" is")]
    assert events[-1]["finish_reason"] == "stop"


LONG_PROMPT = "hello " * 9000  # more tokens than the 8192-token context window

BAD_INPUTS = [
    ("malformed json", b'{"prompt": "hi", ', 400, "malformed JSON"),
    ("not an object", b'["hi"]', 400, "JSON object"),
    ("wrong type", json.dumps({"prompt": "hi", "max_new_tokens": "ten"}).encode(), 400, "max_new_tokens"),
    ("negative max_new_tokens", json.dumps({"prompt": "hi", "max_new_tokens": -5}).encode(), 400, "max_new_tokens"),
    ("absurd max_new_tokens", json.dumps({"prompt": "hi", "max_new_tokens": 10**9}).encode(), 400, "max_new_tokens"),
    ("unknown model", json.dumps({"prompt": "hi", "model": "gpt-17"}).encode(), 404, "gpt-17"),
    ("empty prompt", json.dumps({"prompt": ""}).encode(), 400, "prompt"),
    ("missing prompt", json.dumps({"max_new_tokens": 4}).encode(), 400, "prompt"),
    ("bad temperature", json.dumps({"prompt": "hi", "temperature": -1}).encode(), 400, "temperature"),
    ("bad top_p", json.dumps({"prompt": "hi", "top_p": 0}).encode(), 400, "top_p"),
    ("bad stop", json.dumps({"prompt": "hi", "stop": [1, 2]}).encode(), 400, "stop"),
    ("empty messages", json.dumps({"messages": []}).encode(), 400, "messages"),
    ("prompt too long", json.dumps({"prompt": LONG_PROMPT, "raw": True}).encode(), 400, "context window"),
]


CASES = [("/generate", *b) for b in BAD_INPUTS] + [("/v1/completions", *b) for b in BAD_INPUTS if b[0] != "empty messages"]


@pytest.mark.parametrize("path,name,body,status,needle", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_bad_input_gets_4xx_json(default_server, path: str, name: str, body: bytes, status: int, needle: str) -> None:
    if path == "/v1/completions":
        body = body.replace(b'"max_new_tokens"', b'"max_tokens"').replace(b', "raw": true', b"")  # /generate only
        needle = needle.replace("max_new_tokens", "max_tokens")
    r = httpx.post(default_server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"]


def test_chat_endpoint_rejects_bad_messages(default_server) -> None:
    r = httpx.post(default_server.url + "/v1/chat/completions", json={"messages": [{"role": "user"}]}, timeout=30)
    assert r.status_code == 400 and "content" in r.json()["error"]["message"]
    r = httpx.post(default_server.url + "/v1/chat/completions", json={"messages": CAPITAL, "n": 99}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_server_keeps_serving_after_bad_input(default_server) -> None:
    for body, _, _ in [(b"{", 0, 0), (b'{"prompt": 5}', 0, 0)]:
        assert httpx.post(default_server.url + "/generate", content=body, timeout=30).status_code == 400
    text, _ = stream_generate(default_server.url, {"messages": CAPITAL, "max_new_tokens": 16})
    assert "Paris" in text


def test_disconnect_aborts_request(default_server) -> None:
    url = default_server.url
    body = {"prompt": "Count from one to one thousand.", "max_new_tokens": 2000, "ignore_eos": True}
    with httpx.stream("POST", url + "/generate", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.strip():
                seen += 1
            if seen >= 3:
                # checked before the break: leaving iter_lines closes the response, i.e. disconnects
                assert scheduler_metrics(url)["inflight"] >= 1
                break
    # Closed after 3 chunks of 2000: the worker must drop the request long before it could finish.
    t0 = time.monotonic()
    assert wait_for(lambda: scheduler_metrics(url)["inflight"] == 0, timeout=10), "request still in flight"
    workers = scheduler_metrics(url)["workers"]
    assert wait_for(lambda: all(w["running"] == 0 for w in scheduler_metrics(url)["workers"]), timeout=5), workers
    assert time.monotonic() - t0 < 10


def test_health_models_and_unknown_route(default_server) -> None:
    assert httpx.get(default_server.url + "/health").json()["status"] == "ok"
    assert httpx.get(default_server.url + "/v1/models").json()["data"][0]["id"]
    r = httpx.get(default_server.url + "/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_gateway_connections_send_without_nagle_delay() -> None:
    """Every accepted connection has TCP_NODELAY. Without it, on a keep-alive connection each small write
    after the first (the body after the headers, every streamed chunk) waits for the client's delayed
    ACK: about 40 ms per response."""
    import asyncio
    import socket

    from procs.gateway import listen_socket

    async def accepted_nodelay() -> int:
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = listen_socket("127.0.0.1", 0)
        server = await asyncio.start_server(on_connect, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname())
            value = await asyncio.wait_for(got, 10)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0
