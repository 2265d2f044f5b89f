"""Tests for tools/z_image.py against a tiny, randomly initialised Z-Image pipeline.

The pipeline (tiny ZImageTransformer2DModel, AutoencoderKL, Qwen3 text encoder, a
WordLevel tokenizer with a chat template, FlowMatchEulerDiscreteScheduler) is built
offline and saved once per session, so the CLI loads it exactly like a real checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools import z_image
from tools.z_image import ASPECT_SIZES, Size, ZImageError

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a young chinese woman in red hanfu"


def _tiny_tokenizer():  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    words = "a young chinese woman in red hanfu with intricate embroidery cat sky user assistant".split()
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    # Qwen-style template: ZImagePipeline calls apply_chat_template(..., enable_thinking=True).
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def build_tiny_pipeline(path: Path) -> Path:
    """Save a tiny random ZImagePipeline to ``path`` (runs in well under a second per image)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    # Shapes follow diffusers' tests/pipelines/z_image/test_z_image.py.
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[32, 64],  # vae_scale_factor 2 -> sizes must be multiples of 4
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    tokenizer = _tiny_tokenizer()
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=16,  # == transformer cap_feat_dim
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,  # the pipeline pads prompts to 512 tokens
        )
    )
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-z-image"))


@pytest.fixture(autouse=True)
def _no_ambient_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own Z_IMAGE_MODEL_DIR must not leak into the tests.
    monkeypatch.delenv(z_image.MODEL_DIR_ENV, raising=False)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _tiny_args(model_dir: Path, *extra: str) -> list[str]:
    return ["--model-dir", str(model_dir), "-p", PROMPT, "--steps", "2", "--device", "cpu", *extra]


# ----------------------------------------------------------------- pure functions


def test_aspect_table_is_documented_and_model_friendly(capsys: pytest.CaptureFixture[str]) -> None:
    assert ASPECT_SIZES["1:1"] == Size(1024, 1024)
    assert ASPECT_SIZES["16:9"] == Size(1344, 768)
    assert ASPECT_SIZES["9:16"] == Size(768, 1344)
    assert set(ASPECT_SIZES) == {"1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"}
    for name, size in ASPECT_SIZES.items():
        a, b = (int(x) for x in name.split(":"))
        assert size.width % 16 == 0 and size.height % 16 == 0, name
        assert abs(size.width / size.height - a / b) / (a / b) < 0.02, name
        assert 0.9 < size.width * size.height / 2**20 < 1.1, name
        assert z_image.resolve_size(name, None, None) == size
    # The table shows up in --help so users can see it.
    assert z_image.main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for name, size in ASPECT_SIZES.items():
        assert f"{name} -> {size}" in help_text


def test_resolve_size_rounds_and_scales() -> None:
    assert z_image.resolve_size(None, None, None) == Size(1024, 1024)
    assert z_image.resolve_size(None, 1000, 1500) == Size(1504, 1008)  # nearest multiples of 16
    assert z_image.resolve_size(None, 8, 8) == Size(16, 16)  # never below one multiple
    assert z_image.resolve_size(None, 30, None, multiple=4) == Size(1024, 32)
    assert z_image.resolve_size("16:9", None, None, multiple=4, scale=1 / 16) == Size(84, 48)
    with pytest.raises(ZImageError, match="unknown aspect"):
        z_image.resolve_size("5:4", None, None)


def test_resolve_device_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert z_image.resolve_device("auto") == "cpu"
    assert z_image.resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ZImageError, match="CUDA"):
        z_image.resolve_device("cuda")
    with pytest.raises(ZImageError, match="MPS"):
        z_image.resolve_device("mps")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert z_image.resolve_device("auto") == "cuda"
    assert z_image.resolve_device("cpu") == "cpu"
    assert z_image.resolve_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert z_image.resolve_device("auto") == "mps"  # mps wins over cuda
    assert z_image.resolve_dtype("auto", "mps") == torch.bfloat16
    assert z_image.resolve_dtype("float16", "cpu") == torch.float16
    assert z_image.resolve_dtype("float32", "cuda") == torch.float32


def test_attention_backend_checks() -> None:
    z_image.check_attention_backend("sdpa", "cpu")
    with pytest.raises(ZImageError, match="needs a CUDA GPU"):
        z_image.check_attention_backend("flash2", "cpu")
    with pytest.raises(ZImageError, match="needs a CUDA GPU"):
        z_image.check_attention_backend("flash3", "mps")


def test_output_paths(tmp_path: Path) -> None:
    seeds = [7, 8]
    folder = z_image.output_paths(None, str(tmp_path / "out"), "A Cat, on the Moon!", seeds)
    assert folder == [
        tmp_path / "out" / "a-cat-on-the-moon_seed7_1.png",
        tmp_path / "out" / "a-cat-on-the-moon_seed8_2.png",
    ]
    # -o naming an existing folder (or ending in /) is a folder too.
    assert z_image.output_paths(str(tmp_path), "x", "cat", [1])[0] == tmp_path / "cat_seed1_1.png"
    assert z_image.output_paths(str(tmp_path / "new") + "/", "x", "cat", [1])[0] == tmp_path / "new" / "cat_seed1_1.png"
    # -o file: exact name for one image, -1/-2 suffixes for several, .png added when missing.
    assert z_image.output_paths(str(tmp_path / "img.png"), "x", "cat", [3]) == [tmp_path / "img.png"]
    assert z_image.output_paths(str(tmp_path / "img"), "x", "cat", [3]) == [tmp_path / "img.png"]
    assert z_image.output_paths(str(tmp_path / "img.png"), "x", "cat", seeds) == [
        tmp_path / "img-1.png",
        tmp_path / "img-2.png",
    ]
    with pytest.raises(ZImageError, match="extension"):
        z_image.output_paths(str(tmp_path / "img.notanimage"), "x", "cat", [1])
    # Non-Latin prompts still give a usable name; long prompts are cut on a word boundary.
    assert z_image.slugify("西安大雁塔") == "z-image"
    slug = z_image.slugify(z_image.DEFAULT_PROMPT)
    assert slug.startswith("young-chinese-woman-in-red-hanfu") and len(slug) <= 48


def test_image_seeds() -> None:
    assert z_image.image_seeds(10, 3) == [10, 11, 12]
    random_seeds = z_image.image_seeds(None, 2)
    assert random_seeds[1] == random_seeds[0] + 1 and random_seeds[0] >= 0


# ----------------------------------------------------------------- model files


def test_fetch_model_offline_gives_clear_error(tmp_path: Path) -> None:
    # Port 9 (discard) is closed: the hub call fails at once, like having no network.
    with pytest.raises(ZImageError) as info:
        z_image.fetch_model(
            z_image.DEFAULT_MODEL, root=tmp_path, endpoint="http://127.0.0.1:9", hf_cache_dir=tmp_path / "empty-hf"
        )
    message = str(info.value)
    assert "--model-dir" in message and z_image.MODEL_DIR_ENV in message
    assert str(tmp_path / "z-image-turbo") in message


def test_fetch_model_reuses_finished_download_without_network(tmp_path: Path) -> None:
    target = z_image.model_cache_dir(z_image.DEFAULT_MODEL, tmp_path)
    assert target == tmp_path / "z-image-turbo"
    target.mkdir()
    (target / "model_index.json").write_text("{}")
    (target / z_image.COMPLETE_MARKER).write_text("done\n")
    assert z_image.fetch_model(z_image.DEFAULT_MODEL, root=tmp_path, endpoint="http://127.0.0.1:9") == target
    assert z_image.model_cache_dir("Org/Other-Model", tmp_path) == tmp_path / "org--other-model"


def test_fetch_model_offline_falls_back_to_hf_cache(tmp_path: Path) -> None:
    # Standard HF cache layout, as left behind by ZImagePipeline.from_pretrained(repo_id).
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = tmp_path / "hf" / "models--Tongyi-MAI--Z-Image-Turbo"
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / "main").write_text(commit)
    snapshot = repo_cache / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    found = z_image.fetch_model(
        z_image.DEFAULT_MODEL, root=tmp_path / "ours", endpoint="http://127.0.0.1:9", hf_cache_dir=tmp_path / "hf"
    )
    assert found == snapshot
    # Without model_index.json the cached folder is not usable: the clear error again.
    (snapshot / "model_index.json").unlink()
    with pytest.raises(ZImageError, match="--model-dir"):
        z_image.fetch_model(
            z_image.DEFAULT_MODEL, root=tmp_path / "ours", endpoint="http://127.0.0.1:9", hf_cache_dir=tmp_path / "hf"
        )


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(z_image.CACHE_ENV, str(tmp_path))
    assert z_image.model_cache_dir(z_image.DEFAULT_MODEL) == tmp_path / "z-image-turbo"
    monkeypatch.delenv(z_image.CACHE_ENV)
    assert z_image.cache_root() == Path.home() / ".cache" / "mini-sglang"


# ----------------------------------------------------------------- end to end


def test_main_writes_requested_images(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    extra = ["--height", "32", "--width", "48", "--num-images", "3", "--seed", "7", "-o", f"{out}/"]
    rc = z_image.main(_tiny_args(tiny_model_dir, *extra))
    assert rc == 0
    files = sorted(out.glob("*.png"))
    slug = "a-young-chinese-woman-in-red-hanfu"
    assert [f.name for f in files] == [f"{slug}_seed{s}_{i}.png" for i, s in ((1, 7), (2, 8), (3, 9))]
    for f in files:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size == (48, 32)
    stdout = capsys.readouterr().out
    assert "device=cpu dtype=float32" in stdout and "size=48x32" in stdout and "steps=2" in stdout
    assert "s/image" in stdout


def test_same_seed_same_pixels_other_seed_differs(tiny_model_dir: Path, tmp_path: Path) -> None:
    size = ["--height", "32", "--width", "32"]
    assert z_image.main(_tiny_args(tiny_model_dir, *size, "--seed", "5", "-o", str(tmp_path / "a.png"))) == 0
    assert z_image.main(_tiny_args(tiny_model_dir, *size, "--seed", "5", "-o", str(tmp_path / "b.png"))) == 0
    assert z_image.main(_tiny_args(tiny_model_dir, *size, "--seed", "6", "-o", str(tmp_path / "c.png"))) == 0
    a, b, c = (_pixels(tmp_path / n) for n in ("a.png", "b.png", "c.png"))
    assert a.std() > 1.0  # a real image, not a constant fill that would match any seed
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # Image i of a batch uses seed+i: the 2nd image of a --seed 5 run is the --seed 6 image.
    batch = ["--seed", "5", "--num-images", "2", "-o", str(tmp_path / "m.png")]
    assert z_image.main(_tiny_args(tiny_model_dir, *size, *batch)) == 0
    assert np.array_equal(_pixels(tmp_path / "m-1.png"), a)
    assert np.array_equal(_pixels(tmp_path / "m-2.png"), c)


def test_steps_and_guidance_reach_the_pipeline(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = ["--height", "32", "--width", "32", "--seed", "5"]
    runs = {
        "base.png": [],
        "steps.png": ["--steps", "1"],  # overrides the --steps 2 of _tiny_args
        "cfg.png": ["--guidance-scale", "3", "--negative-prompt", "cat sky"],
    }
    for name, extra in runs.items():
        assert z_image.main(_tiny_args(tiny_model_dir, *common, *extra, "-o", str(tmp_path / name))) == 0
    base = _pixels(tmp_path / "base.png")
    assert not np.array_equal(base, _pixels(tmp_path / "steps.png"))
    assert not np.array_equal(base, _pixels(tmp_path / "cfg.png"))


def test_aspect_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The hidden --size-scale shrinks the documented preset so the tiny model can render it.
    out = tmp_path / "wide.png"
    extra = ["--aspect", "16:9", "--size-scale", "0.0625", "--seed", "1", "-o", str(out)]
    assert z_image.main(_tiny_args(tiny_model_dir, *extra)) == 0
    with Image.open(out) as im:
        assert im.size == (1344 // 16, 768 // 16)


def test_cli_subprocess_with_env_model_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, z_image.MODEL_DIR_ENV: str(tiny_model_dir)}
    cmd = [sys.executable, "tools/z_image.py", "-p", PROMPT, "--steps", "1", "--height", "32", "--width", "32",
           "--num-images", "2", "--seed", "3", "--device", "cpu", "--outdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 2
    for f in files:
        with Image.open(f) as im:
            assert im.size == (32, 32)
    assert "Done: 2 image(s) | device=cpu dtype=float32 | size=32x32 | steps=1" in proc.stdout


def test_pipeline_options(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opts = z_image.LoadOptions(device="cpu", dtype=torch.bfloat16, compile=True, cpu_offload=True)
    pipe = z_image.load_pipeline(tiny_model_dir, opts)
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32  # VAE decodes in float32
    assert pipe.transformer._compiled_call_impl is not None  # --compile took effect (lazily)
    assert "--cpu-offload only applies to CUDA" in capsys.readouterr().err
    with pytest.raises(ZImageError, match="multiple of 4"):
        z_image.generate(pipe, PROMPT, Size(30, 32), seed=0)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("argv", "rc", "needle"),
    [
        (["--aspect", "5:4"], 2, "invalid choice: '5:4'"),
        (["--steps", "-1"], 2, "must be a positive integer, got -1"),
        (["--steps", "0"], 2, "must be a positive integer, got 0"),
        (["--num-images", "0"], 2, "must be a positive integer"),
        (["--guidance-scale", "-2"], 2, "must be >= 0"),
        (["--aspect", "1:1", "--height", "512"], 2, "either --aspect or --height/--width"),
        (["--device", "cpu", "--attention-backend", "flash2", "--model-dir", "."], 1, "needs a CUDA GPU"),
        (["--device", "cpu", "--model-dir", "/nonexistent/z-image"], 1, "does not exist"),
        (["--device", "cpu", "--model-dir", "."], 1, "no model_index.json"),
    ],
)
def test_bad_flags_clear_errors(argv: list[str], rc: int, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert z_image.main(argv) == rc
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_missing_env_model_dir(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(z_image.MODEL_DIR_ENV, "/nonexistent/from-env")
    assert z_image.main(["--device", "cpu"]) == 1
    assert "/nonexistent/from-env does not exist" in capsys.readouterr().err


def test_out_of_memory_is_a_clear_error(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def oom(*_args: object, **_kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(z_image, "load_pipeline", oom)
    assert z_image.main(_tiny_args(tiny_model_dir)) == 1
    err = capsys.readouterr().err
    assert "out of device memory" in err and "--cpu-offload" in err and "Traceback" not in err


def test_offline_without_model_subprocess(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != z_image.MODEL_DIR_ENV}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), **{z_image.CACHE_ENV: str(tmp_path / "cache")})
    proc = subprocess.run(
        [sys.executable, "-m", "tools.z_image", "--device", "cpu", "--outdir", str(tmp_path / "out")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "could not download Tongyi-MAI/Z-Image-Turbo" in proc.stderr
    assert "--model-dir" in proc.stderr and z_image.MODEL_DIR_ENV in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_fetch_model_downloads_a_revision_from_the_hub(tmp_path: Path) -> None:
    """Through a local stand-in for the Hub (tests/fake_hub.py): --revision picks the commit."""
    from tests.fake_hub import FakeHub

    src = tmp_path / "src"
    (src / "scheduler").mkdir(parents=True)
    (src / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    (src / "scheduler" / "scheduler_config.json").write_text("{}")
    hub = FakeHub(18313)
    repo = hub.add("Org/Tiny-Image", src)
    hub.start()
    try:
        got = z_image.fetch_model("Org/Tiny-Image", root=tmp_path / "ours", endpoint=hub.url, revision=repo.sha,
                                  hf_cache_dir=tmp_path / "empty-hf")
        assert got == tmp_path / "ours" / f"org--tiny-image@{repo.sha}"
        assert (got / "scheduler" / "scheduler_config.json").is_file()
        with pytest.raises(ZImageError, match="--model-dir"):
            z_image.fetch_model("Org/Tiny-Image", root=tmp_path / "ours", endpoint=hub.url, revision="no-such-branch",
                                hf_cache_dir=tmp_path / "empty-hf")
    finally:
        hub.stop()
