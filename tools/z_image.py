"""Text-to-image with Tongyi-MAI Z-Image-Turbo through diffusers' ``ZImagePipeline``.

The command line mirrors z-image-mps (github.com/ivanfioravanti/z-image-mps) so its
users feel at home::

    python -m tools.z_image -p "A cozy neon-lit alley, raining softly" --aspect 16:9 --seed 42
    python tools/z_image.py --num-images 3 --seed 123 -o out/

Model weights come from ``--model-dir`` / ``$Z_IMAGE_MODEL_DIR`` (a local diffusers
checkpoint) or are downloaded once to ``~/.cache/mini-sglang/z-image-turbo`` (root
overridable with ``$MINISGL_CACHE_DIR``).

Aspect presets (width x height), all multiples of 16 (the pipeline needs
``vae_scale_factor * 2`` = 16 for Z-Image) and about one megapixel:

    1:1  -> 1024x1024      16:9 -> 1344x768       9:16 -> 768x1344
    4:3  -> 1152x864       3:4  -> 864x1152
    3:2  -> 1248x832       2:3  -> 832x1248
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # heavy imports stay lazy so --help and usage errors are instant
    import torch
    from diffusers import ZImagePipeline
    from PIL import Image

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
MODEL_DIR_ENV = "Z_IMAGE_MODEL_DIR"
CACHE_ENV = "MINISGL_CACHE_DIR"
# Written after a finished download so later runs need no network at all.
COMPLETE_MARKER = ".mini-sglang-complete"

# The Hanfu prompt from the Z-Image-Turbo model card.
DEFAULT_PROMPT = (
    "Young Chinese woman in red Hanfu, intricate embroidery. Impeccable makeup, red floral "
    "forehead pattern. Elaborate high bun, golden phoenix headdress, red flowers, beads. "
    "Holds round folding fan with lady, trees, bird. Neon lightning-bolt lamp (⚡️), bright "
    "yellow glow, above extended left palm. Soft-lit outdoor night background, silhouetted "
    "tiered pagoda (西安大雁塔), blurred colorful distant lights."
)

# Turbo is distilled for 8 DiT forwards: 9 scheduler steps (the last sigma is 0) and no CFG.
DEFAULT_STEPS = 9
DEFAULT_GUIDANCE = 0.0
DEFAULT_SIZE = 1024
DEFAULT_OUTDIR = "output"


class Size(NamedTuple):
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


# ~1 MP presets; every side is a multiple of 16 so the real model takes them unchanged.
ASPECT_SIZES: dict[str, Size] = {
    "1:1": Size(1024, 1024),
    "16:9": Size(1344, 768),
    "9:16": Size(768, 1344),
    "4:3": Size(1152, 864),
    "3:4": Size(864, 1152),
    "3:2": Size(1248, 832),
    "2:3": Size(832, 1248),
}

# CLI name -> diffusers AttentionBackendName value.
ATTENTION_BACKENDS: dict[str, str | None] = {
    "sdpa": None,  # diffusers' default (torch scaled_dot_product_attention)
    "flash2": "flash",
    "flash3": "_flash_3",
}
# Python module each flash backend imports; checked before the (slow) model load.
_FLASH_MODULES: dict[str, str] = {"flash2": "flash_attn", "flash3": "flash_attn_interface"}

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "mps", "cuda", "cpu")


class ZImageError(Exception):
    """An expected failure: printed as one clear message, never as a traceback."""


# --------------------------------------------------------------------------- args


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None/False ones."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _aspect_table() -> str:
    return ", ".join(f"{name} -> {size}" for name, size in ASPECT_SIZES.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="z_image",
        description=(
            "Text-to-image with Tongyi-MAI Z-Image-Turbo (diffusers ZImagePipeline) on "
            "Apple Silicon (MPS), CUDA or CPU. Flags follow z-image-mps."
        ),
        formatter_class=_HelpFormatter,
        epilog=(
            f"Model: --model-dir / ${MODEL_DIR_ENV} (a local diffusers checkpoint), otherwise "
            f"--model is downloaded once to ${CACHE_ENV} (default ~/.cache/mini-sglang)/z-image-turbo. "
            f"Aspect presets (WxH, multiples of 16, ~1 MP): {_aspect_table()}."
        ),
    )
    parser.add_argument(
        "-p",
        "--prompt",
        default=DEFAULT_PROMPT,
        help="text prompt (default: the Hanfu prompt of the Z-Image-Turbo model card)",
    )
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (only used when guidance > 0)")
    parser.add_argument("-s", "--steps", type=_positive_int, default=DEFAULT_STEPS, help="denoising steps")
    parser.add_argument(
        "--guidance-scale",
        type=_non_negative_float,
        default=DEFAULT_GUIDANCE,
        help="CFG scale; the Turbo checkpoint expects 0.0",
    )
    parser.add_argument(
        "--aspect",
        choices=list(ASPECT_SIZES),
        default=None,
        help=f"aspect preset instead of --height/--width: {_aspect_table()}",
    )
    parser.add_argument(
        "--height", type=_positive_int, default=None, help=f"image height in px ({DEFAULT_SIZE} if not given)"
    )
    parser.add_argument(
        "--width", type=_positive_int, default=None, help=f"image width in px ({DEFAULT_SIZE} if not given)"
    )
    parser.add_argument(
        "--seed",
        type=_non_negative_int,
        default=None,
        help="base seed (image i uses seed+i); random and printed when omitted",
    )
    parser.add_argument("--num-images", type=_positive_int, default=1, help="number of images")
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="output file (several images get -1, -2, ... suffixes) or folder (existing or ending in /)",
    )
    parser.add_argument(
        "--outdir", default=DEFAULT_OUTDIR, help="output folder when --output is not given"
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto picks mps, then cuda, then cpu")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on cuda/mps, float32 on cpu"
    )
    parser.add_argument(
        "--attention-backend",
        choices=list(ATTENTION_BACKENDS),
        default="sdpa",
        help="DiT attention kernel; flash2/flash3 need CUDA and flash-attn 2 / 3",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (first image slower)")
    parser.add_argument("--cpu-offload", action="store_true", help="model CPU offload to save VRAM (CUDA only)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face repo id to download")
    parser.add_argument("--revision", default=None,
                        help="Hub revision of --model: branch, tag or commit (default main; HF_TOKEN, HF_ENDPOINT "
                             "and HF_HUB_OFFLINE apply as in huggingface_hub)")
    parser.add_argument(
        "--model-dir",
        default=None,
        help=f"local diffusers checkpoint folder (overrides --model; env ${MODEL_DIR_ENV})",
    )
    # Hidden: scales the resolved size (then re-rounds it), for tiny test models and quick previews.
    parser.add_argument("--size-scale", type=_positive_float, default=1.0, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.aspect is not None and (args.height is not None or args.width is not None):
        parser.error("use either --aspect or --height/--width, not both")
    return args


# --------------------------------------------------------------------------- size


def round_to_multiple(value: float, multiple: int) -> int:
    """Nearest multiple of ``multiple`` (at least one multiple)."""
    # Half rounds up (not Python's half-to-even) so the table in --help is predictable.
    return max(multiple, int(value / multiple + 0.5) * multiple)


def resolve_size(
    aspect: str | None,
    height: int | None,
    width: int | None,
    multiple: int = 16,
    scale: float = 1.0,
) -> Size:
    """Target size: an aspect preset or --height/--width (default 1024), scaled and rounded
    to what the pipeline accepts (``multiple`` = vae_scale_factor * 2, 16 for Z-Image)."""
    if aspect is not None:
        if aspect not in ASPECT_SIZES:
            raise ZImageError(f"unknown aspect {aspect!r}; choose from {', '.join(ASPECT_SIZES)}")
        base = ASPECT_SIZES[aspect]
    else:
        base = Size(width or DEFAULT_SIZE, height or DEFAULT_SIZE)
    return Size(round_to_multiple(base.width * scale, multiple), round_to_multiple(base.height * scale, multiple))


def size_multiple(pipe: ZImagePipeline) -> int:
    # ZImagePipeline.__call__ rejects sizes that are not multiples of vae_scale_factor * 2.
    return int(pipe.vae_scale_factor) * 2


# --------------------------------------------------------------------------- device


def resolve_device(requested: str = "auto") -> str:
    import torch

    mps_ok = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    cuda_ok = torch.cuda.is_available()
    if requested == "auto":
        return "mps" if mps_ok else "cuda" if cuda_ok else "cpu"
    if requested == "mps" and not mps_ok:
        raise ZImageError("--device mps requested but MPS is not available (Apple Silicon + macOS 12.3+ only)")
    if requested == "cuda" and not cuda_ok:
        raise ZImageError("--device cuda requested but no CUDA GPU is visible to torch")
    if requested not in DEVICES:
        raise ZImageError(f"unknown device {requested!r}; choose from {', '.join(DEVICES)}")
    return requested


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    import torch

    if requested == "auto":
        # bf16 halves memory on accelerators; CPU bf16 matmuls are slow or unsupported on many chips.
        return torch.float32 if device == "cpu" else torch.bfloat16
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if requested not in table:
        raise ZImageError(f"unknown dtype {requested!r}; choose from {', '.join(DTYPES)}")
    return table[requested]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_attention_backend(backend: str, device: str) -> None:
    """Fail before the slow model load when a flash backend cannot work here."""
    if backend not in ATTENTION_BACKENDS:
        raise ZImageError(f"unknown attention backend {backend!r}; choose from {', '.join(ATTENTION_BACKENDS)}")
    if ATTENTION_BACKENDS[backend] is None:
        return
    if device != "cuda":
        raise ZImageError(
            f"--attention-backend {backend} needs a CUDA GPU (device is {device}); use --attention-backend sdpa"
        )
    module = _FLASH_MODULES[backend]
    if importlib.util.find_spec(module) is None:
        hint = "pip install flash-attn" if backend == "flash2" else "build FlashAttention 3 (hopper/) from source"
        raise ZImageError(
            f"--attention-backend {backend} needs the {module!r} package ({hint}); use --attention-backend sdpa"
        )


# --------------------------------------------------------------------------- model files


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mini-sglang").expanduser()


def model_cache_dir(repo_id: str, root: Path | None = None) -> Path:
    name = "z-image-turbo" if repo_id == DEFAULT_MODEL else repo_id.replace("/", "--").lower()
    return (root or cache_root()) / name


def _offline_help(repo_id: str, target: Path) -> str:
    return (
        f"Point at a local diffusers checkpoint of {repo_id} (the folder holding model_index.json, "
        f"transformer/, vae/, text_encoder/, tokenizer/, scheduler/) with --model-dir PATH or "
        f"{MODEL_DIR_ENV}=PATH, or copy one to {target}."
    )


def check_model_dir(path: Path) -> Path:
    path = path.expanduser()
    if not path.is_dir():
        raise ZImageError(f"model directory {path} does not exist")
    if not (path / "model_index.json").is_file():
        raise ZImageError(
            f"model directory {path} is not a diffusers checkpoint (no model_index.json); "
            "expected the layout of Tongyi-MAI/Z-Image-Turbo"
        )
    return path


def _hf_cache_snapshot(repo_id: str, hf_cache_dir: Path | None, revision: str | None = None) -> Path | None:
    """A copy already in the standard Hugging Face cache (e.g. from running diffusers), if any."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=hf_cache_dir, revision=revision))
    except Exception:  # not cached, or cached partially
        return None
    return path if (path / "model_index.json").is_file() else None


def fetch_model(
    repo_id: str,
    root: Path | None = None,
    endpoint: str | None = None,
    hf_cache_dir: Path | None = None,
    revision: str | None = None,
) -> Path:
    """Local folder of ``repo_id``: reuse a finished download, else snapshot_download it.

    Offline, a snapshot in the standard Hugging Face cache (``hf_cache_dir``, default
    $HF_HOME/hub) is used as a fallback; otherwise the error says how to pass a local copy.
    """
    target = model_cache_dir(repo_id, root)
    if revision:
        target = target.with_name(f"{target.name}@{revision}")
    if (target / COMPLETE_MARKER).is_file() and (target / "model_index.json").is_file():
        return target
    from huggingface_hub import HfApi, snapshot_download

    try:
        # Probe first: offline, snapshot_download would silently hand back a partial folder.
        HfApi(endpoint=endpoint).repo_info(repo_id, revision=revision)
        print(f"Downloading {repo_id} to {target} (resumable; first run only)...", file=sys.stderr)
        path = Path(snapshot_download(repo_id, local_dir=target, endpoint=endpoint, revision=revision))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # any hub / connection / auth error means "not reachable"
        cached = _hf_cache_snapshot(repo_id, hf_cache_dir, revision)
        if cached is not None:
            print(f"note: the Hub is unreachable; using {repo_id} from the Hugging Face cache", file=sys.stderr)
            return cached
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        raise ZImageError(
            f"could not download {repo_id} from the Hugging Face Hub ({reason}).\n" + _offline_help(repo_id, target)
        ) from None
    (target / COMPLETE_MARKER).write_text(repo_id + "\n")
    return check_model_dir(path)


def resolve_model_path(model: str, model_dir: str | None, revision: str | None = None) -> Path:
    """--model-dir, then $Z_IMAGE_MODEL_DIR, then the cached/downloaded --model (at --revision)."""
    local = model_dir or os.environ.get(MODEL_DIR_ENV)
    if local:
        return check_model_dir(Path(local))
    return fetch_model(model, revision=revision)


# --------------------------------------------------------------------------- pipeline


@dataclass
class LoadOptions:
    device: str
    dtype: torch.dtype
    attention_backend: str = "sdpa"
    compile: bool = False
    cpu_offload: bool = False


def load_pipeline(model_path: Path, opts: LoadOptions) -> ZImagePipeline:
    import torch
    from diffusers import ZImagePipeline
    from diffusers.pipelines import pipeline_utils

    # Newer diffusers renamed torch_dtype -> dtype (and warns on the old name).
    dtype_kw = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    # The VAE stays float32: it overflows to NaN/black in float16 and loses detail in bf16;
    # the pipeline casts latents to the VAE's dtype before decoding.
    dtypes = {"default": opts.dtype, "vae": torch.float32}
    try:
        pipe = ZImagePipeline.from_pretrained(str(model_path), **{dtype_kw: dtypes})
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ZImageError(f"could not load a Z-Image pipeline from {model_path}: {exc}") from None

    backend = ATTENTION_BACKENDS[opts.attention_backend]
    if backend is not None:
        try:
            pipe.transformer.set_attention_backend(backend)
        except (RuntimeError, ValueError, ImportError) as exc:
            raise ZImageError(
                f"attention backend {opts.attention_backend} is not usable: {exc}; use --attention-backend sdpa"
            ) from None

    if opts.cpu_offload and opts.device == "cuda":
        pipe.enable_model_cpu_offload(device=opts.device)
    else:
        if opts.cpu_offload:
            print(f"note: --cpu-offload only applies to CUDA; ignored on {opts.device}", file=sys.stderr)
        pipe.to(opts.device)

    if opts.compile:
        # In-place nn.Module.compile keeps pipe.transformer a ZImageTransformer2DModel.
        pipe.transformer.compile()
    return pipe


def make_generator(seed: int) -> torch.Generator:
    import torch

    # CPU generator on every device: same seed -> same starting noise on mps, cuda and cpu.
    return torch.Generator(device="cpu").manual_seed(seed)


def generate(
    pipe: ZImagePipeline,
    prompt: str,
    size: Size,
    seed: int,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    negative_prompt: str | None = None,
) -> Image.Image:
    multiple = size_multiple(pipe)
    if size.width % multiple or size.height % multiple:
        raise ZImageError(f"size {size} is not a multiple of {multiple}, which this model needs")
    result = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt,
        height=size.height,
        width=size.width,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=make_generator(seed),
    )
    return result.images[0]


# --------------------------------------------------------------------------- output


def slugify(text: str, max_len: int = 48) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_len:
            break
        slug = candidate
    return slug or (words[0][:max_len] if words else "z-image")


def output_paths(output: str | None, outdir: str, prompt: str, seeds: list[int]) -> list[Path]:
    """One path per image.

    Folder (``--outdir``, or ``-o`` naming an existing folder or ending in ``/``):
    ``<prompt-slug>_seed<seed>_<index>.png`` with index from 1. File (``-o out.png``):
    exactly that for one image, ``out-1.png``, ``out-2.png``... for several.
    """
    from PIL import Image

    n = len(seeds)
    if output is None or output.endswith(("/", os.sep)) or Path(output).expanduser().is_dir():
        folder = Path(output if output is not None else outdir).expanduser()
        slug = slugify(prompt)
        return [folder / f"{slug}_seed{seed}_{i}.png" for i, seed in enumerate(seeds, start=1)]
    path = Path(output).expanduser()
    suffix = path.suffix.lower() or ".png"
    if suffix not in Image.registered_extensions():
        raise ZImageError(f"cannot write images with extension {suffix!r}; use .png")
    stem = path.with_suffix("") if path.suffix else path
    if n == 1:
        return [stem.with_name(stem.name + suffix)]
    return [stem.with_name(f"{stem.name}-{i}{suffix}") for i in range(1, n + 1)]


def image_seeds(base_seed: int | None, num_images: int) -> list[int]:
    # z-image-mps convention: image i uses base+i, so any image can be regenerated on its own.
    base = secrets.randbits(32) if base_seed is None else base_seed
    return [base + i for i in range(num_images)]


# --------------------------------------------------------------------------- main


def _is_out_of_memory(exc: BaseException) -> bool:
    # CUDA raises torch.cuda.OutOfMemoryError; MPS a RuntimeError "MPS backend out of memory".
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except RuntimeError as exc:
        if not _is_out_of_memory(exc):
            raise
        hint = "try --cpu-offload, " if not args.cpu_offload else ""
        raise ZImageError(
            f"out of device memory ({str(exc).splitlines()[0]}); {hint}a smaller --aspect/--height/--width, "
            "or --dtype bfloat16"
        ) from None


def _run(args: argparse.Namespace) -> int:
    if args.negative_prompt and args.guidance_scale == 0.0:
        print("note: --negative-prompt has no effect with --guidance-scale 0 (the Turbo default)", file=sys.stderr)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_attention_backend(args.attention_backend, device)
    seeds = image_seeds(args.seed, args.num_images)
    paths = output_paths(args.output, args.outdir, args.prompt, seeds)  # fail on a bad -o before loading
    model_path = resolve_model_path(args.model, args.model_dir, args.revision)

    print(f"Loading {model_path} on {device} ({dtype_name(dtype)})...", file=sys.stderr)
    t0 = time.perf_counter()
    pipe = load_pipeline(
        model_path,
        LoadOptions(device, dtype, args.attention_backend, args.compile, args.cpu_offload),
    )
    load_s = time.perf_counter() - t0

    multiple = size_multiple(pipe)
    size = resolve_size(args.aspect, args.height, args.width, multiple, args.size_scale)
    requested = (args.width, args.height)
    rounded = any(v is not None and v != got for v, got in zip(requested, size))
    if args.aspect is None and args.size_scale == 1.0 and rounded:
        print(f"note: size rounded to {size} (multiples of {multiple})", file=sys.stderr)

    times: list[float] = []
    for i, (seed, path) in enumerate(zip(seeds, paths), start=1):
        print(f"[{i}/{len(seeds)}] seed={seed} size={size} steps={args.steps} guidance={args.guidance_scale}")
        t0 = time.perf_counter()
        image = generate(pipe, args.prompt, size, seed, args.steps, args.guidance_scale, args.negative_prompt)
        times.append(time.perf_counter() - t0)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"Saved: {path}")

    per_image = sum(times) / len(times)
    print(
        f"Done: {len(times)} image(s) | device={device} dtype={dtype_name(dtype)} | size={size} | "
        f"steps={args.steps} | {per_image:.2f} s/image (load {load_s:.1f} s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage / help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return run(args)
    except ZImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
