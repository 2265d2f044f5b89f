"""The rest of the OpenAI surface through a real server and the official `openai` client: n,
logprobs / top_logprobs, echo with prompt logprobs, penalties, logit_bias, seed, refusals by name,
/v1/models' context length, /tokenize and /detokenize. Log-probabilities are checked against
transformers on the embedded model (the server runs float32 here, so they agree to float tolerance)."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import openai
import pytest
import torch
import transformers

from minisgl.config import ServerConfig
from minisgl.gateway.requests import RequestError, parse_chat, parse_completion
from tests.conftest import start_server

pytestmark = pytest.mark.slow
TOL = 2e-3
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    handle = start_server(["--dtype", "float32"], tmp_path_factory, "openai-extras")
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf(default_model_dir: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(default_model_dir)


def log_softmax_rows(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def tokenize(url: str, **body: object) -> list[int]:
    r = httpx.post(url + "/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_n_returns_n_choices_sharing_the_prompt(client) -> None:
    # a prompt nobody sent before: the cache reuse below can only come from the choices sharing it
    messages = [{"role": "user", "content": f"Invent a name for a cat ({uuid.uuid4().hex[:8]})."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, n=3, temperature=1.0, seed=7, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1, \
        "two choices reuse the prompt the first one prefilled"
    again = client.chat.completions.create(model=MODEL, messages=messages, n=3, temperature=1.0, seed=7, max_tokens=8)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices], "seeded choices repeat"
    comp = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=4, temperature=0)
    assert len(comp.choices) == 2 and comp.choices[0].text == comp.choices[1].text  # greedy: identical
    seen: dict[int, str] = {}
    finished = set()
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, n=3, max_tokens=6, stream=True):
        for c in chunk.choices:
            seen[c.index] = seen.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
    assert sorted(seen) == [0, 1, 2] and finished == {0, 1, 2}


def test_chat_logprobs_are_log_softmax_of_the_logits(server, client, hf, tok) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    seq = tokenize(server.url, messages=messages)
    for entry in content:
        row = log_softmax_rows(hf, seq)[-1]
        chosen = int(row.argmax())  # greedy: the server chose the same token
        assert entry.token == tok.decode([chosen])
        assert entry.logprob == pytest.approx(row[chosen].item(), abs=TOL)
        vals, ids = row.topk(3)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in ids.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(vals.tolist(), abs=TOL)
        seq.append(chosen)
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6,
                                                logprobs=True, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=TOL)


def test_echo_gives_a_logprob_for_every_prompt_token_after_the_first(server, client, hf) -> None:
    prompt = "The capital of France is Paris, and the capital of Spain is"
    ids = tokenize(server.url, prompt=prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=2, temperature=0)
    choice = r.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 2 and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    ref = log_softmax_rows(hf, ids)
    want = [ref[p, ids[p + 1]].item() for p in range(len(ids) - 1)]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=TOL)
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    assert all(len(t) == 2 for t in lp.top_logprobs[1:]), "two alternatives per token"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, logprobs=0)
    assert len(plain.choices[0].logprobs.tokens) == 2 and plain.choices[0].text == choice.text[len(prompt):]


def test_penalties_logit_bias_and_seed(client, tok) -> None:
    base = dict(model=MODEL, prompt="List the numbers: one, two, three,", max_tokens=12, temperature=0)
    plain = client.completions.create(**base).choices[0].text
    penalized = client.completions.create(**base, frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert penalized != plain
    banned_first = tok(plain).input_ids[0]
    forced = client.completions.create(**base, logit_bias={str(banned_first): -100}).choices[0].text
    assert tok(forced).input_ids[0] != banned_first
    sampled = [client.completions.create(**{**base, "temperature": 1.0}, seed=s).choices[0].text for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.parametrize("body, field", [
    ({"best_of": 3}, "best_of"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
])
def test_bad_or_unsupported_fields_get_a_400_naming_them(server, body, field) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]


def test_the_openai_client_sees_the_refusal(client) -> None:
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, best_of=2)


@pytest.mark.parametrize("backend", ["hf", "mlx"])
@pytest.mark.parametrize("body, field", [
    ({"logprobs": True}, "logprobs"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
])
def test_backends_without_the_engine_refuse_its_fields(backend, body, field) -> None:
    cfg = ServerConfig(backend=backend, served_model_name=MODEL)
    with pytest.raises(RequestError) as e:
        parse_chat({"messages": [{"role": "user", "content": "hi"}], **body}, cfg, {MODEL})
    assert e.value.param == field and backend in e.value.message
    with pytest.raises(RequestError) as e:
        parse_completion({"prompt": "hi", "logprobs": 1, "echo": True}, cfg, {MODEL})
    assert e.value.param == "logprobs"
    # what they can do is still accepted: n choices, echo of the text, a seed
    parsed = parse_completion({"prompt": "hi", "n": 2, "echo": True, "seed": 3}, cfg, {MODEL})
    assert parsed.n == 2 and parsed.echo and parsed.params.seed == 3


def test_models_tokenize_and_detokenize(server, client, tok) -> None:
    m = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
    assert m["max_model_len"] == 8192
    ids = tokenize(server.url, prompt="Hello world, 123")
    assert ids == tok("Hello world, 123").input_ids
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello", "return_token_strs": True}, timeout=10).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 8192 and r["token_strs"]
    chat_ids = tokenize(server.url, messages=[{"role": "user", "content": "hi"}])
    assert chat_ids == tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    r = httpx.post(server.url + "/detokenize", json={"tokens": ids}, timeout=10)
    assert r.status_code == 200 and r.json()["prompt"] == "Hello world, 123"
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    bad = httpx.post(server.url + "/detokenize", json={"tokens": "abc"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
