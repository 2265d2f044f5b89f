"""MODEL_NAME=<org>/<repo> for real, without the internet: a tiny random Llama checkpoint served by a
local stand-in for the Hub's file API (tests/fake_hub.py), HF_ENDPOINT pointing at it, HF_HOME in a
temporary folder. The server downloads it once, serves a greedy request that matches transformers, and
starts again offline from the cache; an unsupported architecture is refused before any weights move;
no network gets an error that says how to use a local folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import transformers

from minisgl.server_handle import REPO_ROOT
from tests.conftest import start_server
from tests.fake_hub import FakeHub

pytestmark = pytest.mark.slow
HUB_PORT = 18310  # this suite's port range: 18300-18399
DEAD_PORT = 18311  # nothing listens here: "no network"
REPO = "tiny-org/tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def make_tiny_llama(folder: Path, tokenizer_from: Path, architecture: str = "LlamaForCausalLM") -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   initializer_range=0.2, tie_word_embeddings=True)
    cfg.architectures = ["LlamaForCausalLM"]
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, folder / name)
    if architecture != "LlamaForCausalLM":  # same files, another architecture in config.json
        import json

        conf = json.loads((folder / "config.json").read_text())
        conf["architectures"] = [architecture]
        (folder / "config.json").write_text(json.dumps(conf))
    (folder / "pytorch_model.bin").write_bytes(b"not needed: only safetensors are fetched")
    return folder


@pytest.fixture(scope="module")
def hub(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    root = tmp_path_factory.mktemp("fake-hub")
    fake = FakeHub(HUB_PORT)
    fake.add(REPO, make_tiny_llama(root / "llama", default_model_dir))
    fake.add("tiny-org/tiny-gpt2", make_tiny_llama(root / "gpt2", default_model_dir, "GPT2LMHeadModel"))
    fake.start()
    yield fake
    fake.stop()


def hub_env(hf_home: Path, endpoint: str, offline: bool = False) -> dict[str, str]:
    return {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_fake_token_for_tests"}


def launch_fails(env: dict[str, str], *args: str) -> str:
    """launch.py must stop during configuration (exit 2) with one clear message; returns its output."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "--port", "18312", *args],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def greedy_tokens(url: str, prompt: str) -> list[str]:
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def test_model_by_name_downloads_once_serves_and_restarts_offline(hub: FakeHub, tmp_path: Path,
                                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    hf_home = tmp_path / "hf-home"
    args = ["--model-name", REPO, "--revision", "main", "--dtype", "float32", "--kv-cache-tokens", "4096"]
    prompt = "The quick brown fox"
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for name, data in hub.repos[REPO].files.items():
        (ref_dir / name).write_bytes(data)
    tok = transformers.AutoTokenizer.from_pretrained(ref_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    ids = tok(prompt).input_ids
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = [tok.decode([t]) for t in out[0, len(ids):].tolist()]

    server = start_server(args, tmp_path_factory, "hub-online", env=hub_env(hf_home, hub.url))
    try:
        assert greedy_tokens(server.url, prompt) == want
        models = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
        assert models[0]["id"] == REPO and models[0]["max_model_len"] == 512
    finally:
        server.stop()
    log = Path(server.log_path).read_text()
    assert f"downloading {REPO}" in log
    assert hub.fetched("model.safetensors") == 1 and hub.fetched("config.json") == 1
    assert hub.fetched("pytorch_model.bin") == 0, "only the files a checkpoint needs are fetched"
    assert hub.auth == {"Bearer hf_fake_token_for_tests"}, "HF_TOKEN goes with every request"
    snapshots = list((hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots").iterdir())
    assert len(snapshots) == 1 and (snapshots[0] / "model.safetensors").is_file()

    # again, offline, with the Hub unreachable: everything comes from the cache
    before = len(hub.log)
    server = start_server(args, tmp_path_factory, "hub-offline", env=hub_env(hf_home, f"http://127.0.0.1:{DEAD_PORT}",
                                                                          offline=True))
    try:
        assert greedy_tokens(server.url, prompt) == want
    finally:
        server.stop()
    assert len(hub.log) == before, "offline: no request reached the Hub"


def test_unsupported_architecture_is_refused_before_the_weights(hub: FakeHub, tmp_path: Path) -> None:
    before = hub.fetched("model.safetensors")
    out = launch_fails(hub_env(tmp_path / "hf", hub.url), "--model-name", "tiny-org/tiny-gpt2")
    assert "GPT2LMHeadModel" in out and "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in out
    assert hub.fetched("model.safetensors") == before, "no weights were downloaded"


def test_unknown_repo_and_revision_are_clear_errors(hub: FakeHub, tmp_path: Path) -> None:
    out = launch_fails(hub_env(tmp_path / "hf", hub.url), "--model-name", "tiny-org/nope")
    assert "tiny-org/nope was not found" in out and "HF_TOKEN" in out
    out = launch_fails(hub_env(tmp_path / "hf", hub.url), "--model-name", REPO, "--revision", "v9")
    assert "no revision 'v9'" in out


def test_no_network_says_how_to_use_a_local_folder(tmp_path: Path) -> None:
    out = launch_fails(hub_env(tmp_path / "hf", f"http://127.0.0.1:{DEAD_PORT}"), "--model-name", REPO)
    assert "could not download" in out and "MODEL_LOCAL_DIR" in out and "HF_HUB_OFFLINE" in out
    out = launch_fails(hub_env(tmp_path / "hf", f"http://127.0.0.1:{DEAD_PORT}", offline=True), "--model-name", REPO)
    assert "not in the Hugging Face cache" in out and "MODEL_LOCAL_DIR" in out
