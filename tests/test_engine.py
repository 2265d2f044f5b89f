"""The batching engine against transformers' greedy generate, on the real default model and on tiny
random Qwen2 / Qwen3 / Llama models: batching, chunked prefill, prefix caching, preemption, aborts,
sampling, stop conditions."""

from __future__ import annotations

import logging
from msgspec.structs import replace
from pathlib import Path

import pytest
import torch
import transformers

from minisgl.assets.checkpoint import eos_token_ids
from minisgl.engine import Engine, EngineConfig
from minisgl.messages import SamplingParams, TokenizedReq, TokenOut
from minisgl.models import load_model
from minisgl.models.decoder import CausalLM

MAX_NEW = 16


# ---------------------------------------------------------------- helpers (also used by test_kv_pool)


def make_engine(model: CausalLM, **overrides: int) -> Engine:
    mc = model.config
    cfg = EngineConfig(num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
                       kv_tokens=8192, max_model_len=2048, max_running=16, chunk_size=512)
    param = next(model.parameters())
    return Engine(model, replace(cfg, **overrides), param.device, param.dtype)


def request(rid: str, ids: list[int], eos: list[int], **params: object) -> TokenizedReq:
    params.setdefault("max_new_tokens", MAX_NEW)
    return TokenizedReq(rid=rid, input_ids=list(ids), params=SamplingParams(**params), arrival=0.0,
                        eos_token_ids=eos)


class Collector:
    """Steps an engine and gathers each request's tokens and final item, checking the stream's shape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokens: dict[str, list[int]] = {}
        self.final: dict[str, TokenOut] = {}
        self.finished: list[str] = []
        self.steps = 0
        self.evicted = 0  # cache evictions reported

    def step(self) -> None:
        out = self.engine.step()
        self.steps += 1
        seen = set()
        for item in out.outputs:
            assert item.rid not in seen, "one item per request per step"
            seen.add(item.rid)
            assert item.rid not in self.final, "nothing after the final item"
            self.tokens.setdefault(item.rid, []).extend(item.token_ids)
            if item.finish_reason is not None:
                self.final[item.rid] = item
        self.finished.extend(out.finished)
        self.evicted += len(out.cache_evicted)

    def run(self, max_steps: int = 10_000) -> Collector:
        while self.engine.has_work():
            self.step()
            assert self.steps < max_steps
        return self


def run_all(engine: Engine, reqs: list[TokenizedReq]) -> Collector:
    for r in reqs:
        engine.add_request(r)
    return Collector(engine).run()


def hf_greedy(hf: torch.nn.Module, ids: list[int], max_new: int = MAX_NEW) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=max_new, do_sample=False)
    return out[0, len(ids):].tolist()


def assert_pool_clean(engine: Engine) -> None:
    """Every slot is free or cached (unlocked) once nothing runs; flushing gives every slot back."""
    assert not engine.running and not engine.reqs
    assert engine.kv.tree.protected_tokens == 0
    assert engine.pool.free_count + engine.kv.tree.evictable_tokens == engine.pool.total
    engine.flush_cache()
    assert engine.pool.free_count == engine.pool.total
    assert sorted(engine.free_rows) == list(range(engine.config.max_running))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(default_model_dir: Path) -> Path:
    return default_model_dir


@pytest.fixture(scope="module")
def model(model_dir: Path) -> CausalLM:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_model(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def eos(model_dir: Path) -> list[int]:
    return eos_token_ids(model_dir)


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Write a haiku about the sea.",
    "Q: What is 17 times 3?\nA:",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old woodcutter "
    "and his three daughters. Every morning he",
]
LONG = ("In the study of distributed systems, engineers often discuss consensus, replication, and the "
        "trade-offs between consistency and availability. ") * 8


@pytest.fixture(scope="module")
def prompts(tok: transformers.PreTrainedTokenizerBase) -> list[list[int]]:
    return [tok(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def long_ids(tok: transformers.PreTrainedTokenizerBase) -> list[int]:
    return tok(LONG).input_ids


@pytest.fixture(scope="module")
def expected(hf: torch.nn.Module, prompts: list[list[int]]) -> list[list[int]]:
    return [hf_greedy(hf, p) for p in prompts]


# ---------------------------------------------------------------- greedy correctness


def test_batched_greedy_matches_transformers(model, eos, prompts, expected) -> None:
    engine = make_engine(model)
    col = run_all(engine, [request(str(i), p, eos) for i, p in enumerate(prompts)])
    for i, want in enumerate(expected):
        assert col.tokens[str(i)] == want, f"prompt {i}"
        item = col.final[str(i)]
        assert item.finish_reason == ("stop" if want[-1] in eos else "length")
        assert item.prompt_tokens == len(prompts[i]) and item.completion_tokens == len(want)
        assert item.cached_tokens == 0 and item.status == 200
    assert sorted(col.finished) == sorted(str(i) for i in range(len(prompts)))
    assert_pool_clean(engine)


def test_same_tokens_alone_and_in_a_mixed_batch(model, eos, prompts, expected, long_ids, hf) -> None:
    engine = make_engine(model, chunk_size=64)
    col = Collector(engine)
    engine.add_request(request("a", prompts[0], eos, max_new_tokens=30))
    engine.add_request(request("b", prompts[1], eos))
    for _ in range(4):  # a and b are decoding when the others arrive
        col.step()
    engine.add_request(request("long", long_ids, eos))  # prefilled in chunks alongside a and b
    engine.add_request(request("c", prompts[2], eos))
    col.step()
    engine.add_request(request("d", prompts[3], eos))
    col.run()
    assert col.tokens["b"] == expected[1]
    assert col.tokens["c"] == expected[2]
    assert col.tokens["d"] == expected[3]
    assert col.tokens["a"] == hf_greedy(hf, prompts[0], 30)
    assert col.tokens["long"] == hf_greedy(hf, long_ids)
    assert_pool_clean(engine)


def test_chunked_prefill_matches_unchunked(model, eos, long_ids, prompts) -> None:
    reqs = [request("long", long_ids, eos), request("short", prompts[4], eos)]
    whole = run_all(make_engine(model, chunk_size=4096), reqs)
    chunked = run_all(make_engine(model, chunk_size=7), reqs)
    assert chunked.tokens == whole.tokens
    assert chunked.steps > whole.steps + len(long_ids) // 7 - 2


def test_prefix_cache_hit_gives_same_tokens(model, eos, long_ids, tok, hf) -> None:
    second = long_ids + tok(" Summarize the above in one sentence:").input_ids
    cold = run_all(make_engine(model), [request("cold", second, eos)]).tokens["cold"]
    assert cold == hf_greedy(hf, second)

    engine = make_engine(model)
    first = run_all(engine, [request("first", long_ids, eos)])
    assert first.final["first"].cached_tokens == 0
    warm = run_all(engine, [request("warm", second, eos)])
    assert warm.tokens["warm"] == cold
    assert warm.final["warm"].cached_tokens >= len(long_ids)
    # the very same prompt again: everything but its last token comes from the cache
    again = run_all(engine, [request("again", second, eos)])
    assert again.tokens["again"] == cold
    assert again.final["again"].cached_tokens == len(second) - 1
    assert engine.cached_tokens_total == warm.final["warm"].cached_tokens + len(second) - 1
    assert_pool_clean(engine)


def test_insert_prefix_warms_the_cache_silently(model, eos, long_ids, tok) -> None:
    engine = make_engine(model)
    engine.insert_prefix(long_ids)
    col = Collector(engine).run()
    assert col.tokens == {} and col.finished == []  # internal warm-ups are invisible
    assert engine.kv.tree.prefix_len(long_ids) == len(long_ids)
    ids = long_ids + tok(" And so").input_ids
    col = run_all(engine, [request("x", ids, eos, max_new_tokens=4)])
    assert col.final["x"].cached_tokens == len(long_ids)
    # a warm-up request through add_request is reported as finished but emits nothing
    engine.add_request(TokenizedReq(rid="w", input_ids=ids[:40], params=SamplingParams(), arrival=0.0,
                                    warmup=True))
    col = Collector(engine).run()
    assert col.tokens == {} and col.finished == ["w"]
    assert_pool_clean(engine)


def test_preemption_under_a_tiny_pool(model, eos, prompts, expected, caplog) -> None:
    # 6 requests of ~10-40 + 20 tokens on 100 slots: they cannot all run at once
    engine = make_engine(model, kv_tokens=100, max_model_len=100, chunk_size=16)
    with caplog.at_level(logging.INFO, logger="minisgl.engine"):
        col = run_all(engine, [request(str(i), p, eos) for i, p in enumerate(prompts)]
                      + [request("dup", prompts[0], eos)])
    assert engine.preemptions > 0
    assert "preempting" in caplog.text
    for i, want in enumerate(expected):
        assert col.tokens[str(i)] == want, f"prompt {i}"
    assert col.tokens["dup"] == expected[0]
    for item in col.final.values():  # usage counts never include recomputed tokens twice
        assert item.completion_tokens == len(col.tokens[item.rid])
    assert_pool_clean(engine)


def test_abort_frees_kv_and_emits_final_item(model, eos, prompts, long_ids) -> None:
    engine = make_engine(model, chunk_size=32)
    col = Collector(engine)
    engine.add_request(request("run", prompts[0], eos, max_new_tokens=50))
    engine.add_request(request("long", long_ids, eos))
    for _ in range(3):
        col.step()
    engine.add_request(request("queued", prompts[1], eos))
    held = engine.pool.total - engine.pool.free_count
    assert held > 0
    engine.abort("long")  # mid-prefill
    engine.abort("queued")  # still waiting
    engine.abort("nope")  # unknown ids are ignored
    assert engine.kv.tree.protected_tokens < held  # its slots went back (to the free list or cache)
    col.step()
    assert col.final["long"].finish_reason == "abort"
    assert col.final["queued"].finish_reason == "abort" and col.final["queued"].completion_tokens == 0
    assert {"long", "queued"} <= set(col.finished)
    engine.abort("run")  # mid-decode
    col.step()
    assert col.final["run"].finish_reason == "abort"
    assert col.final["run"].completion_tokens == len(col.tokens["run"]) > 0
    assert not engine.has_work()
    assert_pool_clean(engine)


# ---------------------------------------------------------------- finishing and sampling


def test_stop_token_ids_and_max_new_tokens(model, eos, prompts, expected) -> None:
    want = expected[4]
    stop_at = next(i for i in range(1, len(want)) if want[i] not in want[:i])
    engine = make_engine(model)
    col = run_all(engine, [
        request("stop", prompts[4], eos, stop_token_ids=[want[stop_at]]),
        request("len", prompts[4], eos, max_new_tokens=3),
        request("one", prompts[4], eos, max_new_tokens=1),
    ])
    assert col.tokens["stop"] == want[: stop_at + 1]  # the stop token itself is emitted
    assert col.final["stop"].finish_reason == "stop"
    assert col.tokens["len"] == want[:3] and col.final["len"].finish_reason == "length"
    assert col.final["len"].completion_tokens == 3
    assert col.tokens["one"] == want[:1] and col.final["one"].finish_reason == "length"
    assert_pool_clean(engine)


def test_ignore_eos(model, prompts, expected) -> None:
    first = expected[0][0]
    engine = make_engine(model)
    col = run_all(engine, [request("e", prompts[0], [first], max_new_tokens=4),
                           request("i", prompts[0], [first], max_new_tokens=4, ignore_eos=True)])
    assert col.final["e"].finish_reason == "stop" and col.tokens["e"] == [first]
    assert col.final["i"].finish_reason == "length" and col.tokens["i"] == expected[0][:4]


def test_seeded_sampling(model, eos, prompts) -> None:
    def sample(seed: int | None, rid: str = "s", others: bool = False, **kw: object) -> list[int]:
        engine = make_engine(model)
        reqs = [request(rid, prompts[2], eos, temperature=1.0, seed=seed, ignore_eos=True,
                        max_new_tokens=8, **kw)]
        if others:
            reqs += [request("o1", prompts[0], eos, temperature=0.7),
                     request("o2", prompts[3], eos, temperature=0.9, top_p=0.8, seed=5)]
        return run_all(engine, reqs).tokens[rid]

    a = sample(1)
    assert a == sample(1)  # reproducible
    assert a == sample(1, others=True)  # whatever else shares the batch
    assert a != sample(2)  # and it depends on the seed
    k = sample(3, top_k=5, top_p=0.9)
    assert k == sample(3, top_k=5, top_p=0.9)
    assert sample(4, top_k=1) == sample(9, top_k=1)  # top-k 1 is greedy


def test_top_k_top_p_filter() -> None:
    from minisgl.engine.sampler import _top_k_top_p

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    out = _top_k_top_p(probs, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.5, 1.0]))
    assert out[0].tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    assert out[1].tolist() == pytest.approx([0.0, 0.0, 0.3, 0.4])  # 0.4 < 0.5: keep the next one too
    assert out[2].tolist() == pytest.approx([0.25] * 4)


def test_requests_too_long_or_empty_fail_with_400(model, eos, prompts) -> None:
    engine = make_engine(model, max_model_len=64)
    col = run_all(engine, [request("long", list(range(50)), eos, max_new_tokens=20),
                           request("empty", [], eos),
                           request("ok", prompts[0], eos, max_new_tokens=2)])
    for rid in ("long", "empty"):
        assert col.final[rid].finish_reason == "error" and col.final[rid].status == 400
        assert col.final[rid].error
    assert "64" in (col.final["long"].error or "")
    assert col.final["ok"].finish_reason == "length"
    assert sorted(col.finished) == ["empty", "long", "ok"]


def test_narration(model, eos, prompts, caplog) -> None:
    engine = make_engine(model, narrate=True)
    with caplog.at_level(logging.INFO, logger="minisgl.engine"):
        run_all(engine, [request("n", prompts[0], eos, max_new_tokens=3)])
    assert f"prefill rid=n {len(prompts[0])} new tokens (0 cached), step " in caplog.text
    assert "decode step 2: batch of 1, " in caplog.text


# ---------------------------------------------------------------- other model families


TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.2)
FAMILIES = {
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32)),
    "llama-mha": (transformers.LlamaConfig, dict(num_key_value_heads=4)),
}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_families_match_transformers(tmp_path: Path, family: str, device: str) -> None:
    config_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    cfg = config_cls(**{**TINY, **extra})
    cfg.architectures = [config_cls.__name__.replace("Config", "ForCausalLM")]
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, device=device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (3, 17, 40, 9)]
    # chunks of 16 and a pool too small for all four at once: chunking, prefix reuse and preemption
    engine = make_engine(model, chunk_size=16, max_model_len=64, kv_tokens=90)
    reqs = [request(str(i), p, [], max_new_tokens=12) for i, p in enumerate(prompts)]
    reqs.append(request("again", prompts[2], [], max_new_tokens=12))
    col = run_all(engine, reqs)
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            want = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert col.tokens[str(i)] == want[0, len(p):].tolist(), f"prompt {i}"
    assert col.tokens["again"] == col.tokens["2"]
    assert engine.preemptions > 0
    assert_pool_clean(engine)


# ---------------------------------------------------------------- the torch backend and its CPU tricks


def test_torch_backend_end_to_end(model_dir, eos, prompts, expected, long_ids) -> None:
    from minisgl.backends.base import BackendConfig
    from minisgl.backends.base import create_backend

    backend = create_backend("torch", BackendConfig(model_path=str(model_dir), dtype="float32",
                                                    kv_cache_tokens=2048, max_model_len=1024))
    assert backend.name == "torch"
    assert backend.max_context_len() == 1024
    assert backend.stats().kv_total_tokens == 2048
    backend.insert_prefix(long_ids)
    while backend.has_work():
        assert backend.step().outputs == []
    backend.add_request(request("a", prompts[0], eos))
    backend.add_request(request("b", long_ids + prompts[1], eos, max_new_tokens=4))
    backend.add_request(request("gone", prompts[2], eos))
    backend.abort("gone")
    col = Collector(backend.engine).run()  # type: ignore[attr-defined]
    assert col.tokens["a"] == expected[0]
    assert col.final["gone"].finish_reason == "abort"
    assert col.final["b"].cached_tokens >= len(long_ids) - 1
    stats = backend.stats()
    assert stats.running == 0 and stats.kv_used_tokens == 0
    assert stats.prompt_tokens_total == len(prompts[0]) + len(long_ids) + len(prompts[1])
    backend.flush_cache()
    assert backend.engine.pool.free_count == 2048  # type: ignore[attr-defined]


def test_packed_bfloat16_linears_change_nothing(model_dir, eos, prompts) -> None:
    from minisgl.engine.cpu.linear import can_pack, pack_linears

    plain = load_model(model_dir, dtype=torch.bfloat16)
    if not can_pack(plain):
        pytest.skip("no oneDNN in this torch build")
    packed = load_model(model_dir, dtype=torch.bfloat16)
    assert pack_linears(packed) == 4 * packed.config.num_layers + 1  # + the logits projection
    assert packed.logits_proj is not None
    reqs = [request(str(i), p, eos, max_new_tokens=8) for i, p in enumerate(prompts[:3])]
    assert run_all(make_engine(packed), reqs).tokens == run_all(make_engine(plain), reqs).tokens


def test_mixed_amx_linears_keep_float32_quality(model, model_dir, eos, tok) -> None:
    """The torch backend's CPU default: a float32 model whose linears run as bfloat16 matmuls."""
    from minisgl.engine.cpu.linear import can_pack, pack_linears
    from minisgl.models.context import DenseContext

    mixed = load_model(model_dir)
    if not can_pack(mixed) or not pack_linears(mixed):
        pytest.skip("no oneDNN in this torch build")
    assert mixed.logits_proj is not None
    ids = list(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False))
    with torch.inference_mode():
        x = torch.tensor(ids)
        want = model(x, torch.arange(len(ids)), DenseContext(len(ids)))
        got = mixed(x, torch.arange(len(ids)), DenseContext(len(ids)))
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    answer = run_all(make_engine(mixed), [request("q", ids, eos, max_new_tokens=12)]).tokens["q"]
    assert "Paris" in tok.decode(answer)
