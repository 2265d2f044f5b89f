"""Engine-level log-probabilities, penalties and logit_bias, checked against transformers' logits on the
embedded model (float32 on both sides)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch
import transformers

from minisgl.models import load_model
from minisgl.models.decoder import CausalLM
from tests.test_engine import make_engine, request, run_all

PROMPT = "The capital of France is Paris. The capital of Italy is"
TOL = 2e-3


@pytest.fixture(scope="module")
def model(default_model_dir: Path) -> CausalLM:
    return load_model(default_model_dir)


@pytest.fixture(scope="module")
def hf(default_model_dir: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids(default_model_dir: Path) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(default_model_dir)(PROMPT).input_ids


def hf_logprobs(hf: torch.nn.Module, seq: list[int]) -> torch.Tensor:
    """[len(seq), V]: row p is log p(. | seq[:p + 1])."""
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), dim=-1)


def test_sampled_logprobs_and_top_logprobs_match_transformers(model, hf, ids) -> None:
    engine = make_engine(model)
    out = run_all(engine, [request("a", ids, [], max_new_tokens=6, logprobs=3),
                           request("b", ids, [], max_new_tokens=6)])  # same batch, asks nothing
    tokens = out.tokens["a"]
    ref = hf_logprobs(hf, ids + tokens)
    got, tops_ids, tops_lp = [], [], []
    # gather what every item carried (one token per item)
    engine2 = make_engine(model)
    engine2.add_request(request("a", ids, [], max_new_tokens=6, logprobs=3))
    engine2.add_request(request("b", ids, [], max_new_tokens=6))
    while engine2.has_work():
        for item in engine2.step().outputs:
            if item.rid == "b":
                assert item.logprobs is None, "a request that asks nothing gets nothing"
            elif item.token_ids:
                assert item.logprobs is not None and len(item.logprobs.logprobs) == len(item.token_ids)
                got += item.logprobs.logprobs
                tops_ids += item.logprobs.top_ids
                tops_lp += item.logprobs.top_logprobs
    assert len(got) == len(tokens)
    for step, tok in enumerate(tokens):
        row = ref[len(ids) - 1 + step]
        assert got[step] == pytest.approx(row[tok].item(), abs=TOL)
        ref_vals, ref_ids = row.topk(3)
        assert tops_ids[step][0] == ref_ids[0].item() == tok  # greedy: the top token is the chosen one
        assert tops_lp[step] == pytest.approx(ref_vals.tolist(), abs=TOL)


@pytest.mark.parametrize("chunk_size", [512, 5])
def test_prompt_logprobs_every_token_after_the_first(model, hf, ids, chunk_size) -> None:
    engine = make_engine(model, chunk_size=chunk_size)
    run_all(engine, [request("warm", ids, [], max_new_tokens=2)])  # the prompt is now cached...
    engine.add_request(request("echo", ids, [], max_new_tokens=2, prompt_logprobs=2))
    first = None
    while engine.has_work():
        for item in engine.step().outputs:
            if item.rid == "echo" and first is None:
                first = item
    assert first is not None and first.cached_tokens == 0, "...but a prompt to score runs whole"
    scores = first.prompt_logprobs
    assert scores is not None and len(scores.logprobs) == len(ids) - 1
    ref = hf_logprobs(hf, ids)
    want = [ref[p, ids[p + 1]].item() for p in range(len(ids) - 1)]
    assert scores.logprobs == pytest.approx(want, abs=TOL)
    assert [t[0] for t in scores.top_ids] == ref[:-1].argmax(-1).tolist()
    assert len(scores.top_logprobs[0]) == 2


def test_frequency_and_presence_penalties_follow_openai_formula(model, hf, ids) -> None:
    freq, pres = 1.5, 1.0
    out = run_all(make_engine(model), [request("p", ids, [], max_new_tokens=16, frequency_penalty=freq,
                                               presence_penalty=pres)])
    tokens = out.tokens["p"]
    # replay with transformers: at each step, argmax of logits - freq*count - pres*(count > 0)
    seq = list(ids)
    for tok in tokens:
        with torch.inference_mode():
            logits = hf(torch.tensor([seq])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(seq[len(ids):], dtype=torch.long), minlength=logits.shape[0]).float()
        adjusted = logits - freq * counts - pres * (counts > 0).float()
        assert tok == adjusted.argmax().item()
        seq.append(tok)
    plain = run_all(make_engine(model), [request("q", ids, [], max_new_tokens=16)]).tokens["q"]
    assert len(set(plain)) < len(plain) and plain != tokens, "without penalties tokens repeat (else this proves nothing)"


def test_logit_bias_forces_and_bans_tokens(model, ids) -> None:
    plain = run_all(make_engine(model), [request("q", ids, [], max_new_tokens=4)]).tokens["q"]
    forced = 42
    out = run_all(make_engine(model), [request("f", ids, [], max_new_tokens=4, logit_bias={forced: 100.0}),
                                       request("b", ids, [], max_new_tokens=4, logit_bias={plain[0]: -100.0}),
                                       request("n", ids, [], max_new_tokens=4)])
    assert out.tokens["f"] == [forced] * 4
    assert out.tokens["b"][0] != plain[0]
    assert out.tokens["n"] == plain, "a row without a bias in the same batch is unchanged"


def test_n_choices_share_the_prompt_prefix(model, ids) -> None:
    engine = make_engine(model)
    for i in range(3):
        r = request(f"g-{i}", ids, [], max_new_tokens=3, temperature=1.0, seed=i)
        engine.add_request(msgspec.structs.replace(r, group="g"))
    out = final_items(engine)
    cached = sorted(out[f"g-{i}"].cached_tokens for i in range(3))
    assert cached == [0, len(ids) - 1, len(ids) - 1], "one choice prefills, the others reuse its prompt"


def final_items(engine) -> dict:  # noqa: ANN001
    finals = {}
    while engine.has_work():
        for item in engine.step().outputs:
            if item.finish_reason is not None:
                finals[item.rid] = item
    return finals
