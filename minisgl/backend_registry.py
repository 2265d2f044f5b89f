"""Every backend, named once: name -> where its class lives (imported only when it is created, so a
CPU-only machine never imports CUDA or MLX code), what it computes beyond plain sampling, and a line for
--help. create_backend (base.py), the launcher's `auto` choice and --backend, the TP checks and the gateway (which
refuses by name what a backend cannot do), the config's capacity and GPU sizing, and the scheduler's
warm-ups all read this table. It imports nothing of the project (so the config, low as it is, may read
it) and nothing heavy (the gateway and the launcher read it without loading any backend).
"""

from __future__ import annotations

from dataclasses import dataclass

# log-probabilities, prompt scoring (echo), penalties and logit_bias live in our engine (minisgl/engine)
ENGINE_FEATURES = frozenset({"logprobs", "prompt_logprobs", "penalties", "logit_bias"})


@dataclass(frozen=True)
class BackendSpec:
    module: str
    cls: str
    about: str
    features: frozenset[str] = frozenset()
    engine: bool = False  # runs our engine (so tensor parallelism and the engine's features apply)
    prefix_cache: bool = True  # keeps prompts' KV for reuse (so warm-ups mean something)
    concurrency_field: str = "max_running"  # the ServerConfig field: requests one worker runs at once
    gpu_sized: bool = False  # its sizing defaults come from the GPU (config.device_sized)


BACKENDS: dict[str, BackendSpec] = {
    "torch": BackendSpec("minisgl.backends.torch_backend", "TorchBackend",
                         "our engine with portable torch ops and the CPU kernels (CPU, MPS)", ENGINE_FEATURES, True),
    "sgl": BackendSpec("minisgl.backends.sgl_backend", "SGLBackend",
                       "our engine on CUDA: Triton kernels, CUDA graphs, overlap scheduling", ENGINE_FEATURES, True,
                       gpu_sized=True),
    "mlx": BackendSpec("minisgl.backends.mlx_backend", "MLXBackend", "mlx-lm's batch generator (Apple silicon)"),
    "hf": BackendSpec("minisgl.backends.hf", "HFBackend", "plain transformers generate(), the baseline",
                      prefix_cache=False, concurrency_field="hf_concurrency"),
}


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose auto or one of {', '.join(BACKENDS)}")
    return name


def backend_help() -> str:
    return "; ".join(f"{name}: {spec.about}" for name, spec in BACKENDS.items()) + \
        "; auto: sgl on CUDA, mlx on MPS with mlx-lm installed, else torch"


def backend_spec(name: str) -> BackendSpec:
    """The spec of a backend, or of the default one (torch) for a name not resolved yet ("auto")."""
    return BACKENDS.get(name, BACKENDS["torch"])


def backend_supports(backend: str, feature: str) -> bool:
    spec = BACKENDS.get(backend)
    return spec is not None and feature in spec.features


def default_backend_name() -> str:
    """sgl on CUDA, mlx on Apple silicon with MLX installed, else torch."""
    try:
        import torch

        if torch.cuda.is_available():
            return "sgl"
        if torch.backends.mps.is_available():
            import importlib.util

            if importlib.util.find_spec("mlx_lm") is not None:
                return "mlx"
    except ImportError:
        pass
    return "torch"
