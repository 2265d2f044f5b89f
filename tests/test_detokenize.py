"""Incremental detokenization: whole characters only, and stop strings held back then cut."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from minisgl.tokenizer.detokenize import RequestDetokenizer


@pytest.fixture(scope="module")
def tokenizer(default_model_dir) -> Tokenizer:  # noqa: ANN001
    return Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))


TEXTS = ["Héllo wörld — ünïcode ✓ 漢字テスト 🚀🎉 done.", "plain ascii text, with 123 numbers", "emoji 👩‍👩‍👧 family"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_are_whole_characters_and_add_up(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    rng = random.Random(0)
    d = RequestDetokenizer(tokenizer)
    deltas, i = [], 0
    while i < len(ids):  # feed in random chunk sizes, like engine steps of varying batches
        n = rng.randint(1, 3)
        deltas.append(d.feed(ids[i:i + n]).text)
        i += n
    deltas.append(d.flush())
    assert all("\ufffd" not in x for x in deltas), deltas
    assert "".join(deltas) == tokenizer.decode(ids)


def test_stop_string_across_token_boundaries(tokenizer: Tokenizer) -> None:
    text = "The answer is 42. END OF ANSWER and more text"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    d = RequestDetokenizer(tokenizer, stop=["END OF"])
    out, stopped = [], False
    for tid in ids:
        r = d.feed([tid])
        out.append(r.text)
        if r.stopped:
            stopped = True
            break
    assert stopped
    assert "".join(out) == "The answer is 42. "
    assert d.feed([ids[-1]]).text == "" and d.flush() == ""


def test_partial_stop_is_released_when_it_does_not_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("one ENDING two", add_special_tokens=False).ids
    d = RequestDetokenizer(tokenizer, stop=["END."])
    text = "".join(d.feed([t]).text for t in ids) + d.flush()
    assert text == "one ENDING two"


def test_special_tokens_are_not_streamed(tokenizer: Tokenizer) -> None:
    eos = tokenizer.token_to_id("<|im_end|>")
    d = RequestDetokenizer(tokenizer)
    ids = tokenizer.encode("Paris", add_special_tokens=False).ids + [eos]
    assert d.feed(ids).text + d.flush() == "Paris"
