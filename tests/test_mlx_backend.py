"""The mlx backend (mlx-lm's BatchGenerator) on the default model: greedy tokens equal transformers',
batching does not change them, the StepOutput contract, finish reasons, abort, sampling, prefix cache,
and one request end to end through a real server tree.

MLX runs on Linux CPU here with a reference BLAS, so it is slow: prompts are served from the prefix
cache after their first run, and generations are short.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm")

from minisgl.backends.base import Backend, BackendConfig, StepOutput  # noqa: E402
from minisgl.backends.base import create_backend
from minisgl.messages import SamplingParams, TokenizedReq, TokenOut  # noqa: E402
from tests.conftest import start_server, stream_generate  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
MAX_NEW = 12
EOS = 2  # SmolLM2's <|im_end|>


class Ref:
    """transformers' greedy continuations of the chat prompts, and the first-step logits."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        self.prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.greedy: list[list[int]] = []
        self.first_logits: list[torch.Tensor] = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matmuls on a shared box: more threads only contend (7x slower here)
        try:
            with torch.inference_mode():
                for p in self.prompts:
                    ids = torch.tensor([p])
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                         do_sample=False, eos_token_id=EOS, pad_token_id=EOS, temperature=None,
                                         top_p=None, top_k=None)
                    self.greedy.append(out[0, len(p):].tolist())
                    self.first_logits.append(model(ids).logits[0, -1])
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref(default_model_dir: Path) -> Ref:
    return Ref(default_model_dir)


@pytest.fixture(scope="module")
def backend(default_model_dir: Path) -> Iterator[Backend]:
    b = create_backend("mlx", BackendConfig(model_path=str(default_model_dir), device="cpu"))
    yield b
    b.shutdown()


def req(rid: str, prompt: list[int], **params: object) -> TokenizedReq:
    params.setdefault("max_new_tokens", MAX_NEW)
    return TokenizedReq(rid=rid, input_ids=prompt, params=SamplingParams(**params), arrival=0.0, eos_token_ids=[EOS])


class Run:
    """Steps a backend and checks the StepOutput contract on every step."""

    def __init__(self, backend: Backend) -> None:
        self.b = backend
        self.tokens: dict[str, list[int]] = {}
        self.final: dict[str, TokenOut] = {}
        self.finished: list[str] = []
        self.steps: list[StepOutput] = []

    def step(self) -> StepOutput:
        out = self.b.step()
        self.steps.append(out)
        rids = [o.rid for o in out.outputs]
        assert len(rids) == len(set(rids)), f"more than one item for a request in one step: {rids}"
        for o in out.outputs:
            assert o.rid not in self.final, f"item for {o.rid} after its final item"
            assert o.finish_reason is not None or len(o.token_ids) == 1, o
            self.tokens.setdefault(o.rid, []).extend(o.token_ids)
            if o.finish_reason is not None:
                self.final[o.rid] = o
        self.finished += out.finished
        return out

    def until_idle(self, max_steps: int = 200) -> "Run":
        for _ in range(max_steps):
            if not self.b.has_work():
                return self
            self.step()
        raise AssertionError("backend did not go idle")


def check_final(run: Run, rid: str, prompt: list[int], reason: str) -> None:
    f = run.final[rid]
    assert f.finish_reason == reason, f
    assert f.prompt_tokens == len(prompt)
    assert f.completion_tokens == len(run.tokens[rid])
    assert rid in run.finished


@pytest.fixture(scope="module")
def batched(backend: Backend, ref: Ref) -> Run:
    """The three chat prompts submitted together, with a cold prefix cache."""
    backend.flush_cache()
    for i, p in enumerate(ref.prompts):
        backend.add_request(req(f"b{i}", p))
    return Run(backend).until_idle()


def test_greedy_batch_matches_transformers(batched: Run, ref: Ref) -> None:
    for i, p in enumerate(ref.prompts):
        assert batched.tokens[f"b{i}"] == ref.greedy[i], f"prompt {i}"
        # transformers stops at eos too: "stop" exactly when its continuation ends with eos
        reason = "stop" if ref.greedy[i][-1] == EOS else "length"
        check_final(batched, f"b{i}", p, reason)
        assert batched.final[f"b{i}"].cached_tokens == 0
    assert any(g[-1] == EOS for g in ref.greedy) and any(len(g) == MAX_NEW for g in ref.greedy)
    # one decode step served every running request: the batch really was a batch
    assert max(len(s.outputs) for s in batched.steps) == len(ref.prompts)


def test_alone_equals_batched(default_model_dir: Path, batched: Run, ref: Ref) -> None:
    """A prompt alone (in a fresh backend whose prefill runs in 16-token chunks) gives the tokens it got
    in the batch."""
    alone = create_backend("mlx", BackendConfig(model_path=str(default_model_dir), device="cpu", chunk_size=16))
    try:
        alone.add_request(req("alone", ref.prompts[1]))
        run = Run(alone).until_idle()
    finally:
        alone.shutdown()
    assert len(ref.prompts[1]) > 2 * 16
    assert sum(1 for s in run.steps if not s.outputs) >= 3  # the prompt took several steps
    assert run.tokens["alone"] == batched.tokens["b1"]
    assert run.final["alone"].cached_tokens == 0


def test_join_while_decoding(backend: Backend, batched: Run, ref: Ref) -> None:
    """Continuous batching: a request that arrives mid-decode joins the running batch."""
    backend.add_request(req("first", ref.prompts[2]))
    run = Run(backend)
    while len(run.tokens.get("first", [])) < 3:
        run.step()
    backend.add_request(req("late", ref.prompts[0]))
    run.until_idle()
    assert run.tokens["first"] == ref.greedy[2]
    assert run.tokens["late"] == ref.greedy[0]
    assert any({o.rid for o in s.outputs} == {"first", "late"} for s in run.steps)


def test_prefix_cache_hit(backend: Backend, ref: Ref) -> None:
    backend.add_request(req("fill", ref.prompts[0], max_new_tokens=2))  # cached already, unless run alone
    Run(backend).until_idle()
    before = backend.stats().cached_tokens_total
    backend.add_request(req("hit", ref.prompts[0]))
    run = Run(backend).until_idle()
    assert run.tokens["hit"] == ref.greedy[0]
    cached = run.final["hit"].cached_tokens
    assert cached == len(ref.prompts[0]) - 1  # all but the last token, which must run for the logits
    assert backend.stats().cached_tokens_total == before + cached
    inserted = [seq for s in run.steps for seq in s.cache_inserted]
    assert ref.prompts[0] + ref.greedy[0] in inserted  # every token fed to the model, reported


def test_warmup_and_insert_prefix_emit_nothing(backend: Backend, ref: Ref) -> None:
    backend.flush_cache()
    prefix = ref.prompts[2][:-6]
    backend.insert_prefix(prefix)
    run = Run(backend).until_idle()
    assert not run.tokens and not run.finished  # internal insert_prefix requests are nobody's business
    inserted = [seq for s in run.steps for seq in s.cache_inserted]
    assert len(inserted) == 1 and inserted[0][:len(prefix)] == prefix
    backend.add_request(TokenizedReq(rid="warm", input_ids=ref.prompts[2], params=SamplingParams(), arrival=0.0,
                                     warmup=True))
    run = Run(backend).until_idle()
    assert not run.tokens and run.finished == ["warm"]  # a warm-up leaves, silently
    assert [seq[:len(ref.prompts[2])] for s in run.steps for seq in s.cache_inserted] == [ref.prompts[2]]
    backend.add_request(req("after", ref.prompts[2], max_new_tokens=4))
    run = Run(backend).until_idle()
    assert run.final["after"].cached_tokens == len(ref.prompts[2]) - 1
    assert run.tokens["after"] == ref.greedy[2][:4]


def test_finish_reasons(backend: Backend, batched: Run, ref: Ref) -> None:
    g0, g1, g2 = ref.greedy
    assert g0[-1] == EOS and len(g0) < 10
    stop_at = next(i for i in range(2, len(g1)) if g1[i] not in g1[:i])
    backend.add_request(req("ignore", ref.prompts[0], ignore_eos=True, max_new_tokens=10))
    backend.add_request(req("stopid", ref.prompts[1], stop_token_ids=[g1[stop_at]]))
    backend.add_request(req("len", ref.prompts[2], max_new_tokens=3))
    run = Run(backend).until_idle()
    assert run.tokens["ignore"][:len(g0)] == g0 and len(run.tokens["ignore"]) == 10  # ran past eos
    check_final(run, "ignore", ref.prompts[0], "length")
    assert run.tokens["stopid"] == g1[:stop_at + 1]  # the stop token is the last one sent
    check_final(run, "stopid", ref.prompts[1], "stop")
    assert run.tokens["len"] == g2[:3]
    check_final(run, "len", ref.prompts[2], "length")


def test_abort(backend: Backend, batched: Run, ref: Ref) -> None:
    backend.add_request(req("keep", ref.prompts[1]))
    backend.add_request(req("gone", ref.prompts[2]))
    run = Run(backend)
    while len(run.tokens.get("gone", [])) < 2:
        run.step()
    before = backend.stats()
    backend.abort("gone")
    after = backend.stats()
    assert after.running == before.running - 1
    assert after.kv_used_tokens < before.kv_used_tokens  # its KV rows left the batch at once
    backend.abort("no-such-request")  # ignored
    backend.add_request(req("queued", ref.prompts[0]))
    backend.abort("queued")  # aborted before it ever ran
    out = run.step()
    by_rid = {o.rid: o for o in out.outputs}
    assert by_rid["gone"].finish_reason == "abort" and not by_rid["gone"].token_ids
    assert by_rid["gone"].completion_tokens == len(run.tokens["gone"]) >= 2
    assert by_rid["queued"].finish_reason == "abort" and by_rid["queued"].completion_tokens == 0
    assert {"gone", "queued"} <= set(out.finished)
    run.until_idle()
    backend.abort("gone")  # already gone: no second final item
    assert not backend.has_work()
    assert run.tokens["keep"] == ref.greedy[1]
    assert run.tokens["gone"] == ref.greedy[2][:len(run.tokens["gone"])]


def test_sampling(backend: Backend, batched: Run, ref: Ref) -> None:
    p = ref.prompts[1]
    hot = dict(temperature=0.9, top_p=0.95, top_k=40, max_new_tokens=6)
    backend.add_request(req("s1", p, seed=7, **hot))
    backend.add_request(req("s1-again", p, seed=7, **hot))
    backend.add_request(req("s2", p, seed=8, temperature=50.0, max_new_tokens=6))
    backend.add_request(req("k1", p, temperature=1.5, top_k=1, max_new_tokens=6))  # top-1 is greedy
    run = Run(backend).until_idle()
    assert run.tokens["s1"] == run.tokens["s1-again"]  # a seed gives the same tokens in any batch
    assert run.tokens["s2"] != run.tokens["s1"]
    assert run.tokens["k1"] == ref.greedy[1][:6]
    backend.add_request(req("s1-alone", p, seed=7, **hot))
    assert Run(backend).until_idle().tokens["s1-alone"] == run.tokens["s1"]
    # top-k at a very high temperature: near-uniform draws, yet only among the 3 most likely tokens
    top3 = set(ref.first_logits[1].topk(3).indices.tolist())
    for i in range(10):
        backend.add_request(req(f"k3-{i}", p, seed=i, temperature=100.0, top_k=3, max_new_tokens=1))
    run = Run(backend).until_idle()
    firsts = [run.tokens[f"k3-{i}"][0] for i in range(10)]
    assert set(firsts) <= top3 and len(set(firsts)) >= 2, firsts


def test_rejects_bad_requests(backend: Backend, ref: Ref) -> None:
    backend.add_request(req("zero", ref.prompts[0], max_new_tokens=0))
    backend.add_request(req("huge", ref.prompts[0], max_new_tokens=backend.max_context_len()))
    backend.add_request(req("empty", []))
    out = backend.step()
    assert {o.rid: o.status for o in out.outputs} == {"zero": 400, "huge": 400, "empty": 400}
    assert all(o.finish_reason == "error" and o.error for o in out.outputs)
    assert set(out.finished) == {"zero", "huge", "empty"}
    assert backend.max_context_len() == 8192 and not backend.has_work()


@pytest.mark.slow
def test_server_generates_paris(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_server(["--backend", "mlx"], tmp_path_factory, "mlx-server")
    try:
        text, events = stream_generate(server.url, {"messages": [{"role": "user", "content": QUESTIONS[0]}],
                                                    "max_new_tokens": 16})
    finally:
        server.stop()
    assert "Paris" in text
    assert events[-1]["event"] == "done" and events[-1]["usage"]["completion_tokens"] >= 2
